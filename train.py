"""Entry point of the oscqat_jax training program.

    python train.py                                   # the embedded default (configs/default.py)
    python train.py --config=configs/<recipe>.py --workdir=DIR [--config.quant.n_bits=3 ...]
    python train.py --config=configs/own_model.py --workdir=DIR  # your own flax.linen model
    python train.py --config=... --workdir=DIR --mode=evaluate [--checkpoint=DIR/checkpoints/STEP]
    python train.py --config=... --workdir=DIR --mode=export [--output=model.safetensors]
    python train.py --config=... --workdir=DIR --mode=export --format=onnx [--container=int8] \
        [--output=model.onnx]

Re-running a command with the same workdir resumes it from its newest checkpoint. A bad flag,
config field or value, or a missing file stops the program with one sentence on stderr and
exit status 1 before any work; ``--debug`` shows the traceback instead.
"""

import os
import re
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")
CONFIG_FIELDS = "oscqat_jax/training/config.py"  # where a user finds the fields

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "export"],
    "Train (and evaluate), only evaluate, or export the integer model of a checkpoint.",
)
flags.DEFINE_string(
    "checkpoint",
    "",
    "evaluate/export: a checkpoints directory (its newest step) or one step in it; default: "
    "the workdir's newest.",
)
flags.DEFINE_enum(
    "format",
    "native",
    ["native", "onnx"],
    "export: native (.safetensors or .npz, by the suffix of --output) or onnx (a QDQ .onnx "
    "graph for ONNX Runtime; needs pip install 'oscqat_jax[deploy]').",
)
flags.DEFINE_enum(
    "container",
    "int4",
    ["int4", "int8"],
    "export --format=onnx: int4 (the portable QDQ graph, integers at their bit width) or int8 "
    "(8-bit integers that ONNX Runtime's CPU integer kernels run, faster than float).",
)
flags.DEFINE_string(
    "output",
    "",
    "export: the file to write, .safetensors or .npz (native) or .onnx (default: "
    "WORKDIR/model.npz or WORKDIR/model.onnx).",
)
flags.DEFINE_string(
    "compilation_cache",
    os.path.join(os.path.expanduser("~"), ".cache", "oscqat_jax", "xla"),
    "Persistent XLA compilation cache (a re-run skips the compiles); empty to switch it off.",
)
flags.DEFINE_bool("debug", False, "Show the traceback of an error instead of its one sentence.")


def _stop(sentence: str) -> None:
    print(f"Error: {sentence}", file=sys.stderr)
    sys.exit(1)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _config_argument(argv: list[str]) -> str | None:
    """The value of ``--config`` on the command line (the last one), None without one."""
    value = None
    for i, arg in enumerate(argv):
        found = re.fullmatch(r"--?config(?:=(.*))?", arg)
        if found:
            value = found.group(1) if found.group(1) is not None else next(iter(argv[i + 1 :]), "")
    return value


def _flag_sentence(err: Exception, argv: list[str]) -> str:
    """One sentence for an error of the command line or the config file it names.

    ml_collections reports an unknown field as the KeyError/AttributeError of the ConfigDict
    (which override is not said), and an error inside a config file as absl's
    IllegalFlagValueError whose message holds the whole traceback of the file's own error.
    """
    text = str(err)
    key = re.search(r"'([^'\\]+)", text)
    overrides = [a.split("=")[0] for a in argv if re.match(r"--?config\.", a)]
    named = [a for a in overrides if key and key.group(1) in a.split(".")[1:]]
    if isinstance(err, (KeyError, AttributeError)) and named:
        hint = re.search(r'Did you mean "([^"]+)"', text)
        guess = f" (did you mean {hint.group(1)}?)" if hint else ""
        return f"{named[-1]} names no config field{guess}; the fields are in {CONFIG_FIELDS}."
    field = re.match(r"flag --(config\.[\w.]+)=(.*?): ", text)
    if isinstance(err, flags.IllegalFlagValueError) and field and field.group(1) in flags.FLAGS:
        kind = flags.FLAGS[field.group(1)].flag_type()
        return f"--{field.group(1)}={field.group(2)} is not valid: use a value of type {kind}."
    if isinstance(err, flags.UnrecognizedFlagError):
        return f"{_first_line(err)}; python train.py --helpshort lists the flags."
    if isinstance(err, OSError) and err.__cause__ is not None:  # a deferred load error
        return f"--config={_config_argument(argv)} failed to load: {_first_line(err.__cause__)}"
    if "Traceback (most recent call last)" in text:
        head = text.split("Error whilst parsing config file:")[0].strip()
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return f"{head} {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}".strip()
    return _first_line(err)


def _print_help(full: bool) -> None:
    """Prints the usage, this file's docstring and the flags (every module's with ``full``),
    then exits with status 0; absl's own --help prints the same but exits with status 1."""
    print(
        "usage: python train.py [--config=FILE[:ARG]] [--config.x.y=V ...] [--workdir=DIR] "
        "[--mode=train|evaluate|export] [flags]"
    )
    app.usage(shorthelp=not full, writeto_stdout=True)
    sys.exit(0)


def _parse_flags(argv: list[str]) -> list[str]:
    """Defines ``--config`` and parses the command line: one sentence and exit status 1 on a
    bad flag, an unknown config field or a config file that cannot be loaded (``--debug``:
    the traceback). ml_collections loads the default config while the flag is defined."""
    debug = any(re.fullmatch(r"--?debug(=(true|1))?", a, re.IGNORECASE) for a in argv)
    try:
        path = _config_argument(argv)
        if path is not None and not os.path.isfile(path.split(":", 1)[0]):
            raise FileNotFoundError(
                f"--config={path}: the file {path.split(':', 1)[0]!r} does not exist; name a "
                "config file such as configs/default.py."
            )
        if path is not None:
            from oscqat_jax.training.config import check_config_file

            check_config_file(path)
        config_flags.DEFINE_config_file(
            "config",
            DEFAULT_CONFIG,
            "Experiment config file (configs/<recipe>.py[:arg]); override fields with "
            "--config.x.y=v.",
            lock_config=True,
        )
        if any(re.fullmatch(r"-[h?]|--help(short|full)?", a) for a in argv[1:]):
            _print_help(full="--helpfull" in argv)
        remaining = flags.FLAGS(argv)
        config = flags.FLAGS.config
        if not isinstance(config, ml_collections.ConfigDict):
            getattr(config, "lock", None)  # ml_collections defers a load error to first use
            raise ValueError(
                f"--config={path or DEFAULT_CONFIG}: get_config() returned {config!r}; return "
                "a ConfigDict."
            )
    except Exception as err:  # noqa: BLE001 -- every error here comes from the command line
        if debug:
            raise
        _stop(_flag_sentence(err, argv))
    return remaining


def main(argv):
    if len(argv) > 1:
        _stop(f"train.py takes only flags, got {' '.join(argv[1:])}; see train.py --helpshort.")
    try:
        _run()
    except (ValueError, OSError, RuntimeError, FloatingPointError) as err:
        # Validation, missing files, a refused workdir or checkpoint, a diverged run: each
        # raises one sentence that names the field or file.
        if flags.FLAGS.debug:
            raise
        _stop(_first_line(err))


def _run():
    import jax
    from absl import logging

    from oscqat_jax.training import trainer

    # Orbax reports every checkpoint step at INFO; our own progress goes to stdout.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

    if flags.FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", flags.FLAGS.compilation_cache)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # jax's own setting
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    if os.getcwd() not in sys.path:  # a config's model import path finds modules here
        sys.path.append(os.getcwd())
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or os.path.join(_HERE, "workdir", "default")
    if flags.FLAGS.mode == "evaluate":
        trainer.evaluate_checkpoint(config, workdir, flags.FLAGS.checkpoint)
    elif flags.FLAGS.mode == "export":
        export_format = flags.FLAGS.format
        default = "model.onnx" if export_format == "onnx" else "model.npz"
        output = flags.FLAGS.output or os.path.join(workdir, default)
        trainer.export_checkpoint(
            config,
            workdir,
            output,
            flags.FLAGS.checkpoint,
            export_format,
            container=flags.FLAGS.container,
        )
    else:
        trainer.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=_parse_flags))
