"""``python train.py``: the whole program end to end on the digits (the suite's shared run);
a bad flag, config field or value, or a missing file stops it with one sentence on stderr, exit
status 1, no traceback and no workdir; ``--debug`` shows the traceback.

Every failing command here fails before anything is compiled (validation comes first), so each
costs one interpreter start and the imports.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from testkit import ROOT

TINY = "--config=configs/tiny.py"


def _train(*args: str, workdir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", f"--workdir={workdir}", "--compilation_cache=", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _one_sentence(result: subprocess.CompletedProcess) -> str:
    """The one line the user sees, after checking that nothing else came out."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        # An unknown field of the embedded default (parsed while --config is defined) and of
        # a named recipe (parsed with the other flags): the flag and the field meant.
        (["--config.quant.nbits=3"], ["--config.quant.nbits", "did you mean n_bits?"]),
        ([TINY, "--config.quant.nbits=3"], ["--config.quant.nbits", "n_bits"]),
        ([TINY, "--config.quantt.n_bits=3"], ["--config.quantt.n_bits", "quant"]),
        (["--config=configs/nope.py"], ["configs/nope.py", "does not exist"]),
        ([f"{TINY}:bogus"], ["configs/tiny.py", "'test' or 'quick'", "'bogus'"]),
        ([TINY, "--config.quant.n_bits=abc"], ["--config.quant.n_bits=abc", "type int"]),
        ([TINY, "--no_such_flag=1"], ["no_such_flag", "--helpshort"]),
        ([TINY, "stray"], ["stray"]),
        # Values refused by build.validate, before the workdir is made.
        (
            [TINY, "--config.optimizer.momentum=1.5"],
            ["config.optimizer.momentum = 1.5", "[0, 1)"],
        ),
        ([TINY, "--config.optimizer.lr=nan"], ["config.optimizer.lr = nan", "finite"]),
        (
            [TINY, "--config.osc_freeze.threshold=1.5"],
            ["config.osc_freeze.threshold = 1.5", "[0, 1]"],
        ),
        ([TINY, "--config.model.pretrained=/no/such/weights.pth"], ["/no/such/weights.pth"]),
        ([TINY, "--mode=export", "--output=model.onnx"], ["model.onnx", ".safetensors"]),
        (
            [TINY, "--config.train.steps_per_call=0"],
            [
                "config.train.steps_per_call = 0 is not valid: use a positive int (1: one "
                "train step per call)."
            ],
        ),
    ],
)
def test_errors_are_one_sentence_naming_the_field_or_file(args, expected, tmp_path):
    workdir = tmp_path / "run"
    sentence = _one_sentence(_train(*args, workdir=workdir))
    for text in expected:
        assert text in sentence, sentence
    assert not workdir.exists()


@pytest.mark.slow
def test_a_missing_checkpoint_names_the_workdir_and_creates_nothing(tmp_path):
    # The config is valid (the control of the cases above): the error is the checkpoint's.
    workdir = tmp_path / "run"
    sentence = _one_sentence(_train(TINY, "--mode=evaluate", workdir=workdir))
    assert f"No QAT checkpoint in {workdir}" in sentence
    assert not workdir.exists()
    sentence = _one_sentence(
        _train(TINY, "--mode=export", f"--checkpoint={tmp_path / 'gone'}", workdir=workdir)
    )
    assert f"--checkpoint={tmp_path / 'gone'} does not exist" in sentence
    assert not workdir.exists()


@pytest.mark.parametrize(
    "args, error",
    [
        ([TINY, "--config.optimizer.momentum=1.5"], "ValueError: config.optimizer.momentum"),
        ([TINY, "--config.quant.nbits=3"], "nbits"),
    ],
)
def test_debug_shows_the_traceback(args, error, tmp_path):
    result = _train(*args, "--debug", workdir=tmp_path / "run")
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert error in result.stderr.strip().splitlines()[-1]
    assert not any(line.startswith("Error: ") for line in result.stderr.splitlines())


@pytest.mark.parametrize(
    "args",
    [
        [TINY, "--config.quant.n_bits=4", "--config.optimizer.momentum=0.0"],
        ["--config", "configs/tiny.py:quick"],
        ["--config.osc_freeze.threshold=1.0"],
    ],
)
def test_valid_flags_pass_the_parser(args, tmp_path):
    """Negative control: absl's --only_check_args stops right after our flag parser."""
    result = _train(*args, "--only_check_args", workdir=tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr and not os.path.exists(tmp_path / "run")


def test_train_py_runs_the_whole_program_end_to_end(digits_run):
    """The suite's digits run, trained by ``python train.py``: every phase ran and reported."""
    out, workdir = digits_run.stdout, digits_run.workdir
    table = dict(
        re.findall(
            r"^(float accuracy \(top-1\)|QAT accuracy \w+ BN re-estimation)\s*\|\s*([\d.]+) %",
            out,
            re.M,
        )
    )
    assert set(table) == {
        "float accuracy (top-1)",
        "QAT accuracy before BN re-estimation",
        "QAT accuracy after BN re-estimation",
    }, out
    assert all(float(value) > 50.0 for value in table.values()), table  # chance is 10 %
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    qat = [r for r in rows if "qat/loss" in r]
    # One QAT epoch of 22 steps logged every 11: two rows, steps 11 and 22.
    assert [r["step"] for r in qat] == [11, 22], [r.get("step") for r in qat]
    assert any("eval/top1_post_bn" in r for r in rows)
    assert (workdir / "checkpoints" / "22").is_dir()
    assert (workdir / "accuracy.png").stat().st_size > 0


CONFIG_FILES = {
    "raises": ("def get_config():\n    return {}['missing']\n", "KeyError: 'missing'"),
    "no_function": ("X = 1\n", "defines no get_config function"),
    "not_a_config": ("def get_config():\n    return 3\n", "returned int, not a ConfigDict"),
}


@pytest.mark.parametrize("kind", sorted(CONFIG_FILES))
def test_a_config_file_that_fails_is_named_in_one_sentence(kind, tmp_path):
    from oscqat_jax.training.config import check_config_file

    text, expected = CONFIG_FILES[kind]
    path = tmp_path / "mine.py"
    path.write_text(text)
    with pytest.raises(
        ValueError, match=rf"^--config={re.escape(str(path))}: .*{re.escape(expected)}"
    ):
        check_config_file(str(path))
    check_config_file(os.path.join(ROOT, "configs", "tiny.py") + ":quick")  # a good one passes


@pytest.mark.slow
def test_train_py_names_a_failing_config_file(tmp_path):
    # The export check's sentence for the same file: tests/deploy/test_deploy_check.py.
    path = tmp_path / "mine.py"
    path.write_text(CONFIG_FILES["raises"][0])
    sentence = _one_sentence(_train(f"--config={path}", workdir=tmp_path / "run"))
    assert f"--config={path}" in sentence and "KeyError: 'missing'" in sentence
    assert not (tmp_path / "run").exists()
