"""Entry point of the oscqat_jax training program.

    python train.py                                   # the embedded default (configs/default.py)
    python train.py --config=configs/<recipe>.py --workdir=DIR [--config.quant.n_bits=3 ...]
    python train.py --config=... --workdir=DIR --mode=evaluate [--checkpoint=DIR/checkpoints/STEP]
    python train.py --config=... --workdir=DIR --mode=export [--output=model.safetensors]

Re-running a command with the same workdir resumes it from its newest checkpoint.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))

config_flags.DEFINE_config_file(
    "config",
    os.path.join(_HERE, "configs", "default.py"),
    "Experiment config file (configs/<recipe>.py[:arg]); override fields with --config.x.y=v.",
    lock_config=True,
)
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
flags.DEFINE_string(
    "output", "", "export: the file to write, .safetensors or .npz (default: WORKDIR/model.npz)."
)
flags.DEFINE_string(
    "compilation_cache",
    os.path.join(os.path.expanduser("~"), ".cache", "oscqat_jax", "xla"),
    "Persistent XLA compilation cache (a re-run skips the compiles); empty to switch it off.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    import jax
    from absl import logging

    from oscqat_jax.training import trainer

    # Orbax reports every checkpoint step at INFO; our own progress goes to stdout.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

    if flags.FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", flags.FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or os.path.join(_HERE, "workdir", "default")
    if flags.FLAGS.mode == "evaluate":
        trainer.evaluate_checkpoint(config, workdir, flags.FLAGS.checkpoint)
    elif flags.FLAGS.mode == "export":
        output = flags.FLAGS.output or os.path.join(workdir, "model.npz")
        trainer.export_checkpoint(config, workdir, output, flags.FLAGS.checkpoint)
    else:
        trainer.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    sys.exit(app.run(main))
