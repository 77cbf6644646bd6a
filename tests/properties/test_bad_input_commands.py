"""Bad input to the commands: ``python -m oscqat_jax.convert`` and ``python -m oscqat_jax.deploy
check``. Each bad command line ends with a non-zero exit status and one sentence on stderr,
no traceback, and writes nothing (an earlier file at DST keeps its bytes).

The quick tests call each command's ``main`` in-process on arguments refused before any model
is built; the slow one runs the commands as a user does, in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import ROOT

from oscqat_jax.convert import main as convert_main
from oscqat_jax.deploy.__main__ import main as deploy_main

FEW = settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
OLD = b"an earlier conversion that must survive"
CONFIG = os.path.join(ROOT, "configs", "tiny.py")


def _one_sentence_exit(run, capsys) -> str:
    try:
        status = run()
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err.strip()
    assert status not in (0, None), (status, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.rstrip(")").endswith("."), err
    return err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02not a checkpoint")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    (tmp_path / "old.npz").write_bytes(OLD)
    return tmp_path


CONVERT_ARGS = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["--model=mobilenet_v2", "--model=nope", "--model=", None]),
        "extra": st.sampled_from(
            [[], ["--layout=nope"], ["--num-classes=x"], ["--width-multiplier=abc"], ["--bogus"]]
        ),
        "src": st.sampled_from(["missing.pth", "bad.pth", "bad.npz", "x.onnx", "", None]),
        "dst": st.sampled_from(["old.npz", "out.txt", "out.safetensors", ".", None]),
    }
)


@FEW
@given(args=CONVERT_ARGS)
def test_convert_refuses_bad_command_lines_in_one_sentence(files, capsys, args):
    good = (
        args["model"] == "--model=mobilenet_v2"
        and not args["extra"]
        and args["dst"] == "old.npz"
        and args["src"] in ("missing.pth", "bad.pth", "bad.npz", "x.onnx", "")
    )
    argv = [a for a in (args["model"], *args["extra"]) if a is not None]
    argv += [str(files / a) if a else a for a in (args["src"], args["dst"]) if a is not None]
    if good and args["src"] == "":
        argv[-2] = str(files)  # a folder as SRC
    _one_sentence_exit(lambda: convert_main(argv), capsys)
    assert (files / "old.npz").read_bytes() == OLD
    assert not (files / "out.txt").exists() and not (files / "out.safetensors.npz").exists()


def test_negative_control_convert_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as stop:
        convert_main(["--help"])
    assert stop.value.code == 0 and "usage" in capsys.readouterr().out


CHECK_ARGS = st.fixed_dictionaries(
    {
        "command": st.sampled_from(["check", "chek", None]),
        "model": st.sampled_from(["missing.onnx", "x.onnx", ".", None]),
        "config": st.sampled_from([f"--config={CONFIG}", "--config=nope.py", None]),
        "workdir": st.sampled_from(["--workdir=WD", None]),
        "extra": st.sampled_from(
            [
                [],
                ["--min_agreement=nan"],
                ["--min_agreement=-1"],
                ["--min_agreement=abc"],
                ["--bogus=1"],
                ["--config.nope=3"],
                ["second.onnx"],
            ]
        ),
    }
)


@FEW
@given(args=CHECK_ARGS)
def test_deploy_check_refuses_bad_command_lines_in_one_sentence(files, capsys, args):
    argv = [a for a in (args["command"],) if a]
    if args["model"]:
        argv.append(str(files / args["model"]))
    argv += [a.replace("WD", str(files)) for a in (args["config"], args["workdir"]) if a]
    argv += args["extra"]
    # Every case here is refused before a checkpoint is read: a missing or bad ONNX file,
    # a missing flag, or a bad flag value.
    _one_sentence_exit(lambda: deploy_main(argv), capsys)


@pytest.mark.parametrize("value", ["nan", "-0.5", "inf"])
def test_a_min_agreement_that_no_agreement_is_compared_with_is_named(files, capsys, value):
    argv = ["check", str(files / "x.onnx"), f"--config={CONFIG}", f"--workdir={files}"]
    err = _one_sentence_exit(lambda: deploy_main([*argv, f"--min_agreement={value}"]), capsys)
    assert "--min_agreement must be a percent of at least 0" in err
    err = _one_sentence_exit(lambda: deploy_main(argv), capsys)  # control: on to the file
    assert "not an ONNX model" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "oscqat_jax.convert", "--model=resnet18", "SRC/bad.npz", "SRC/old.npz"],
        ["-m", "oscqat_jax.convert", "--model=resnet18", "SRC/other.npz", "SRC/old.npz"],
        [
            "-m",
            "oscqat_jax.convert",
            "--model=resnet18",
            "--num-classes=0",
            "SRC/other.npz",
            "SRC/old.npz",
        ],
        ["-m", "oscqat_jax.convert", "--model=resnet18", "SRC/other.npz", "SRC/out.txt"],
        ["-m", "oscqat_jax.convert", "--width-multiplier=abc", "SRC/other.npz", "SRC/old.npz"],
        ["-m", "oscqat_jax.deploy", "check", "SRC/x.onnx", f"--config={CONFIG}", "--workdir=SRC"],
        ["-m", "oscqat_jax.deploy", "check", "SRC", f"--config={CONFIG}", "--workdir=SRC"],
        [
            "-m",
            "oscqat_jax.deploy",
            "check",
            "SRC/x.onnx",
            f"--config={CONFIG}",
            "--workdir=SRC",
            "--min_agreement=nan",
        ],
    ],
)
def test_commands_in_a_subprocess_end_with_one_sentence(files, argv):
    argv = [a.replace("SRC", str(files)) for a in argv]
    done = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stdout
    assert not any("Traceback" in line for line in lines), done.stderr
    assert len([line for line in lines if "rror" in line]) == 1, done.stderr
    assert (files / "old.npz").read_bytes() == OLD
