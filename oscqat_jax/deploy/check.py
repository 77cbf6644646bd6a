"""``python -m oscqat_jax.deploy check``: an exported ONNX model against the checkpoint it came
from, on the evaluation data of the run's config.

    python -m oscqat_jax.deploy check model.onnx --config=configs/default.py --workdir=DIR \\
        [--checkpoint=DIR/checkpoints/STEP] [--config.x.y=v ...] [--min_agreement=99]

Runs the ONNX file in ONNX Runtime (CPU) and the checkpoint's QAT model in JAX (eval mode,
with the BN statistics an export uses, :func:`oscqat_jax.training.trainer.restore_for_export`)
on every validation image, and prints the top-1 agreement of the two (the fraction of images
on which both predict the same class), each one's top-1 accuracy, and the largest absolute
logit difference. Exit status: 0 when the agreement is at least ``--min_agreement`` percent,
2 when it is below, 1 with one sentence on stderr for bad input (a missing file, a file that
is not ONNX, a model whose input or output does not fit the config's data, a bad config).

:func:`check` does the same from Python and returns the numbers as a :class:`CheckResult`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from oscqat_jax.training import trainer
from oscqat_jax.training.config import check_config_file
from oscqat_jax.training.context import close_run, open_run

USAGE = (
    "python -m oscqat_jax.deploy check MODEL.onnx --config=CONFIG.py[:arg] --workdir=DIR "
    "[--checkpoint=PATH] [--config.field=value ...] [--min_agreement=PERCENT]"
)
MIN_AGREEMENT = 99.0
"""Default ``--min_agreement``: percent of validation images with the same top-1 class."""
BELOW = 2
"""Exit status when the agreement is below ``--min_agreement``."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """ONNX Runtime against JAX on the validation split.

    Attributes:
      count: validation images compared.
      agree: images on which both predict the same class.
      onnx_top1, jax_top1: top-1 accuracy in percent.
      max_logit_diff: largest ``|logit_onnx - logit_jax|`` over images and classes.
      disagreements: ``(image index, label, JAX class, ONNX class)`` of each image on which
        the two differ, in validation order.
      step: the checkpoint's training step.
    """

    count: int
    agree: int
    onnx_top1: float
    jax_top1: float
    max_logit_diff: float
    disagreements: tuple[tuple[int, int, int, int], ...]
    step: int

    @property
    def agreement(self) -> float:
        """Percent of images with the same top-1 class."""
        return 100.0 * self.agree / self.count

    def report(self) -> str:
        """The lines the command prints."""
        lines = [
            f"Checkpoint step {self.step}, {self.count} validation images.",
            f"Top-1 agreement: {self.agreement:.2f} % ({self.agree} of {self.count})",
            f"Top-1 accuracy: ONNX Runtime {self.onnx_top1:.2f} %, JAX {self.jax_top1:.2f} %",
            f"Largest logit difference: {self.max_logit_diff:.3g}",
        ]
        lines += [
            f"  image {i}: label {label}, JAX {a}, ONNX {b}"
            for i, label, a, b in self.disagreements[:20]
        ]
        return "\n".join(lines)


def check(
    model_path: str | os.PathLike,
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint_path: str = "",
) -> CheckResult:
    """Compares the ONNX model at ``model_path`` with the QAT checkpoint of ``config`` in
    ``workdir`` (or ``checkpoint_path``) on the config's validation split.

    Raises:
      FileNotFoundError, ValueError: one sentence for a missing file, a file ONNX Runtime
        cannot load, or a model whose input ``(N, H, W, C)`` or class count does not match the
        config's data; the errors of the training program for the config and checkpoint.
    """
    if jax.process_count() > 1:
        raise ValueError("The deployment check runs in one process; start it without a cluster.")
    session = _session(model_path)
    ctx = open_run(config, workdir, write_metrics=False)
    try:
        _check_signature(model_path, session, ctx.source.image_shape, ctx.source.num_classes)
        forward, step, variables = trainer.restore_for_export(ctx, checkpoint_path)
        jax_logits = jax.jit(
            lambda v, x: forward.logits(v, x, "eval"),
            in_shardings=(ctx.sharded.replicated, ctx.sharded.batch),
            out_shardings=ctx.sharded.replicated,
        )
        input_name = session.get_inputs()[0].name
        rows = []
        for images, labels, mask in ctx.eval_batches():
            keep = np.asarray(mask) > 0
            ours = np.asarray(jax_logits(variables, ctx.sharded.put_batch(images)))
            theirs = session.run(None, {input_name: np.asarray(images, np.float32)})[0]
            rows.append((ours[keep], np.asarray(theirs)[keep], np.asarray(labels)[keep]))
    finally:
        close_run(ctx)
    ours, theirs, labels = (np.concatenate(parts) for parts in zip(*rows, strict=True))
    return _compare(ours, theirs, labels, step)


def _compare(ours: np.ndarray, theirs: np.ndarray, labels: np.ndarray, step: int) -> CheckResult:
    """The numbers of :class:`CheckResult` from ``(count, classes)`` logits and labels."""
    pred_jax, pred_onnx = ours.argmax(-1), theirs.argmax(-1)
    differ = np.flatnonzero(pred_jax != pred_onnx)
    return CheckResult(
        count=len(labels),
        agree=int(len(labels) - len(differ)),
        onnx_top1=100.0 * float(np.mean(pred_onnx == labels)),
        jax_top1=100.0 * float(np.mean(pred_jax == labels)),
        max_logit_diff=float(np.max(np.abs(ours - theirs))) if ours.size else 0.0,
        disagreements=tuple(
            (int(i), int(labels[i]), int(pred_jax[i]), int(pred_onnx[i])) for i in differ
        ),
        step=step,
    )


def _session(model_path: str | os.PathLike):
    """An ONNX Runtime CPU session of the file; one sentence if it is missing or not ONNX."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError(
            "The check needs ONNX Runtime: pip install 'oscqat_jax[deploy]'."
        ) from None
    path = os.fspath(model_path)
    if os.path.isdir(path):
        raise ValueError(
            f"{path} is a folder; pass the ONNX file written by train.py --mode=export."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist; pass the file written by train.py --mode=export --format=onnx."
        )
    try:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 -- ORT raises its own classes for bad files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{path} is not an ONNX model that ONNX Runtime can load ({reason.rstrip('.')})."
        ) from None


def _check_signature(model_path, session, image_shape: Sequence[int], num_classes: int) -> None:
    """The model takes one float image batch ``(N, H, W, C)`` of the data's image shape and
    returns ``(N, num_classes)`` logits."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want = ("N", *image_shape)
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        found = ", ".join(f"{i.name}: {i.type}" for i in inputs)
        raise ValueError(
            f"{model_path} takes the inputs ({found}), but the check feeds one float32 image "
            f"batch of shape {_shape(want)}."
        )
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or tuple(shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{model_path} takes images of shape {_shape(shape)}, but the evaluation data of "
            f"the config has images of shape {_shape(want)} (N, H, W, C); export the "
            "checkpoint of this config."
        )
    out = tuple(outputs[0].shape)
    if len(out) != 2 or out[1] != num_classes:
        raise ValueError(
            f"{model_path} returns logits of shape {_shape(out)}, but the config's data has "
            f"{num_classes} classes; export the checkpoint of this config."
        )


def _shape(dims: Sequence) -> str:
    """``(N, 32, 32, 3)`` whether the dimensions are ints or symbolic names."""
    return "(" + ", ".join(str(d) if d is not None else "?" for d in dims) + ")"


def _flags(argv: Sequence[str]) -> tuple[flags.FlagValues, list[str]]:
    """The command's own flags (a private ``FlagValues``, so that importing this module
    defines nothing global) parsed from ``argv``; the positional arguments left over."""
    values = flags.FlagValues()
    argv = ["check", *argv]
    config_flags.DEFINE_config_file(
        "config",
        None,
        "The run's config file (configs/<recipe>.py[:arg]).",
        flag_values=values,
        sys_argv=argv,  # where it finds the --config.x.y overrides (default: sys.argv)
    )
    flags.DEFINE_string("workdir", None, "The run's workdir.", flag_values=values)
    flags.DEFINE_string(
        "checkpoint", "", "A checkpoints directory or one step in it.", flag_values=values
    )
    flags.DEFINE_float(
        "min_agreement", MIN_AGREEMENT, "Exit status 2 below this percent.", flag_values=values
    )
    positional = values(argv)[1:]
    return values, positional


def main(argv: Sequence[str]) -> int:
    """``check MODEL.onnx --config=... --workdir=...`` (``argv`` without the program name
    and the word ``check``); the exit status."""
    if any(arg in ("-h", "-?", "--help", "--helpshort", "--helpfull") for arg in argv):
        values, _ = _flags([])
        print(f"usage: {USAGE}\n\n{values.get_help(include_special_flags=False)}")
        return 0
    try:
        for arg in argv:
            file = re.fullmatch(r"--?config=([^:]*)(:.*)?", arg)
            if file and not os.path.isfile(file.group(1)):
                raise FileNotFoundError(
                    f"--config={file.group(1)}: the file does not exist; name the config file "
                    "of the run, such as configs/default.py."
                )
            if file:
                check_config_file(file.group(1) + (file.group(2) or ""))
        try:
            values, positional = _flags(argv)
        except (KeyError, AttributeError) as err:  # an override naming no config field
            key = re.search(r"'([^'\\]+)", str(err))
            named = [a.split("=")[0] for a in argv if key and re.match(r"--?config\.", a)]
            named = [a for a in named if key.group(1) in a.split(".")[1:]]
            raise ValueError(
                f"{named[-1] if named else 'A --config. override'} names no config field; the "
                "fields are in oscqat_jax/training/config.py."
            ) from None
        if len(positional) != 1:
            raise ValueError(f"check takes one ONNX file, got {len(positional)}; usage: {USAGE}")
        for name in ("config", "workdir"):
            if values[name].value is None:
                raise ValueError(f"check needs --{name}; usage: {USAGE}")
        config = values.config
        getattr(config, "lock", None)  # ml_collections defers a config file's error to first use
        if not isinstance(config, ml_collections.ConfigDict):
            raise ValueError(f"--config: get_config() returned {config!r}, not a ConfigDict.")
        if not 0 <= values.min_agreement < float("inf"):  # NaN would pass every file
            raise ValueError(
                f"--min_agreement must be a percent of at least 0 (above 100 no file passes), "
                f"got {values.min_agreement:g}."
            )
        result = check(positional[0], config, values.workdir, values.checkpoint)
    except (flags.Error, ValueError, OSError, RuntimeError, KeyError, AttributeError) as err:
        text = _first_line(err).rstrip(".")
        if isinstance(err, flags.Error):  # absl says what is wrong, not what is valid
            text += "; python -m oscqat_jax.deploy check --help lists the flags and their values"
        print(f"Error: {text}.", file=sys.stderr)
        return 1
    print(result.report())
    if result.agreement < values.min_agreement:
        print(
            f"The top-1 agreement {result.agreement:.2f} % is below --min_agreement="
            f"{values.min_agreement:g}.",
            file=sys.stderr,
        )
        return BELOW
    return 0


def _first_line(err: BaseException) -> str:
    """One sentence of ``err``; for a config file that fails to load (absl holds the file's
    whole traceback in its message), the flag and the file's own error."""
    if isinstance(err, OSError) and err.__cause__ is not None:  # a deferred config load error
        err = err.__cause__
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        head = text.split("Error whilst parsing config file:")[0].strip().rstrip(":")
        return f"{head}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', lines[-1])}"
    return lines[0] if lines else type(err).__name__
