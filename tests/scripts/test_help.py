"""``--help`` on every command of the repository: exit status 0 and a usage line on stdout.

Each command is one interpreter start and its imports (one to three seconds), so the file is
in the slow tier. The scripts the README names run ``--help`` from a clone of the repository
in test_packaging.py, which proves the same and more; they are not run twice (the PyTorch
reference is, because that test skips it where torch is not installed).
"""

import pathlib
import re
import subprocess
import sys

import pytest
import testkit
from test_packaging import README_SCRIPTS

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(testkit.ROOT)

SCRIPT_DIRS = ("benchmarks", "demos")
MAIN_GUARD = re.compile(r'^if __name__ == "__main__":', re.MULTILINE)


def _scripts() -> list[str]:
    return sorted(
        path.relative_to(ROOT).as_posix()
        for folder in SCRIPT_DIRS
        for path in (ROOT / folder).glob("*.py")
        if MAIN_GUARD.search(path.read_text())
    )


COMMANDS = [
    pytest.param(["train.py"], id="train.py"),
    pytest.param(["-m", "oscqat_jax.convert"], id="convert"),
    pytest.param(["-m", "oscqat_jax.deploy"], id="deploy"),
    pytest.param(["-m", "oscqat_jax.deploy", "check"], id="deploy-check"),
    pytest.param(["docs/build_api.py"], id="docs/build_api.py"),
    *(
        pytest.param([script], id=script)
        for script in _scripts()
        if script not in README_SCRIPTS or "torch" in script
    ),
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_prints_a_usage_line_and_exits_with_status_0(command):
    result = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^usage: ", result.stdout, re.MULTILINE | re.IGNORECASE), result.stdout


def test_every_file_without_a_main_guard_is_a_module_of_its_siblings():
    # benchmarks/ and demos/ hold scripts, modules that those scripts import (the plain
    # Linen MobileNetV2, the study's figures) and models that a config names by import path
    # (demos.flax_resnet:make_model); a script that lost its main guard would otherwise drop
    # out of the --help test above unnoticed.
    scripts = set(_scripts())
    configs = [p.read_text() for p in (ROOT / "configs").glob("*.py")]
    for folder in SCRIPT_DIRS:
        siblings = [
            p for p in (ROOT / folder).glob("*.py") if p.relative_to(ROOT).as_posix() in scripts
        ]
        for path in (ROOT / folder).glob("*.py"):
            if path.relative_to(ROOT).as_posix() not in scripts:
                named = f"{folder}.{path.stem}:"
                assert any(path.stem in s.read_text() for s in siblings) or any(
                    named in text for text in configs
                ), path
