"""The README's example must run as written."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _section_code(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under '{heading}'"
    return blocks[0]


@pytest.mark.slow
def test_functional_api_example_runs_as_written():
    code = _section_code("Use it from your own JAX code")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"loss \d+\.\d+, oscillating \d+\.\d+%, frozen \d+\.\d+%", result.stdout)
