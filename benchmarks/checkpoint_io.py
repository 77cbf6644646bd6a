"""Times saving and restoring the training program's QAT train state, with and without the
checkpoint checksums (issue 14: integrity checks must not slow training, target <= 10 %).

The state is the one ``benchmarks/train_step.py`` builds (its ``case_config`` and
``build_case``): MobileNetV2, W4A4 ``LSQ_paper`` with oscillation tracking and freezing (the
``oscillation`` collection), the optimizer states of the model and the quantizer scales.
Each repeat saves a new step through :class:`oscqat_jax.training.checkpoint.Checkpointer`
and restores it onto an abstract target, timing separately

- ``save_blocking_s``: the ``save`` call, what the training loop waits for (the host copy of
  the arrays and the step's directories);
- ``save_background_s``: the ``wait`` right after it, the files written by orbax's thread
  (and the SHA-256 of each file, with checksums);
- ``restore_s``: ``restore`` of that step (with checksums: verified first);
- ``checksum_write_s`` / ``checksum_verify_s`` (``checksums`` only): writing and verifying
  the checksums of one saved step on their own, the share of the two times above they take.

Modes: ``checksums`` (the program's), ``no_checksums`` (the same with writing and verifying
the checksums switched off), and ``orbax_default`` (no checksums, and the step's directories
created in the background as orbax does by default: the cost of creating them in ``save``).
The modes take turns within each repeat, so that a change in the machine's load hits all.

    python benchmarks/checkpoint_io.py                      # 224x224, width 1.0, 6 repeats
    python benchmarks/checkpoint_io.py --resolution=32 --repeats=3 --dir=/fast/disk

Prints one JSON line per mode (medians over the repeats, the state's size in memory and on
disk), then a table with each time relative to ``no_checksums``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax

# Run as a script from a clone: make the repository and this folder importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import orbax.checkpoint as ocp  # noqa: E402
from train_step import build_case, case_config  # noqa: E402

from oscqat_jax.training import checkpoint, checksums  # noqa: E402
from oscqat_jax.training import step as step_lib  # noqa: E402

MODES = ("checksums", "no_checksums", "orbax_default")


@contextlib.contextmanager
def mode_switches(mode: str):
    """Switches the checksums (and the directory creation) of ``checkpoint`` for one mode."""
    write, verify, async_options = (
        checksums.write_checksums,
        checksums.verify_checksums,
        ocp.AsyncOptions,
    )
    if mode != "checksums":
        checksums.write_checksums = lambda item_dir: None
        checksums.verify_checksums = lambda item_dir: None
    if mode == "orbax_default":
        ocp.AsyncOptions = lambda **kwargs: async_options()
    try:
        yield
    finally:
        checksums.write_checksums, checksums.verify_checksums = write, verify
        ocp.AsyncOptions = async_options


def disk_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
    )


def time_modes(state, root: str, repeats: int) -> list[dict]:
    """Medians of ``repeats`` timed save/restore rounds per mode (after one untimed round),
    the modes interleaved within each round so that a change of the machine's load hits
    them alike (use a multiple of 3 repeats)."""
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    ckpts, times = {}, {}
    for mode in MODES:
        with mode_switches(mode):
            ckpts[mode] = checkpoint.Checkpointer(
                os.path.join(root, mode), metadata={"benchmark": mode}, max_to_keep=2
            )
        times[mode] = {"save_blocking_s": [], "save_background_s": [], "restore_s": []}
    for step in range(repeats + 1):
        # Each mode takes each place in the round in turn (the first save of a round is slower).
        for i in range(len(MODES)):
            mode = MODES[(i + step) % len(MODES)]
            ckpt = ckpts[mode]
            with mode_switches(mode):
                started = time.perf_counter()
                ckpt.save(step, state, force=True)
                saved = time.perf_counter()
                ckpt.wait()
                written = time.perf_counter()
                jax.block_until_ready(ckpt.restore(abstract, step=step))
                restored = time.perf_counter()
            if step:  # the first round warms orbax up
                times[mode]["save_blocking_s"].append(saved - started)
                times[mode]["save_background_s"].append(written - saved)
                times[mode]["restore_s"].append(restored - written)
    records = []
    for mode, ckpt in ckpts.items():
        step_dir = os.path.join(ckpt.directory, str(repeats))
        record = {"mode": mode, **{k: statistics.median(v) for k, v in times[mode].items()}}
        record["checkpoint_bytes"] = disk_bytes(step_dir)
        if mode == "checksums":
            record.update(checksum_times(step_dir, repeats))
        ckpt.close()
        records.append(record)
    return records


def checksum_times(step_dir: str, repeats: int) -> dict:
    """Medians of writing and of verifying the checksums of one saved step on their own (the
    part of ``save_background_s`` and ``restore_s`` they account for)."""
    items = [checkpoint.epath.Path(step_dir, item) for item in ("state", "metadata")]
    write, verify = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for item in items:
            checkpoint._write_checksums(item)
        written = time.perf_counter()
        assert not any(checkpoint._verify_checksums(item) for item in items)
        write.append(written - started)
        verify.append(time.perf_counter() - written)
    return {
        "checksum_write_s": statistics.median(write),
        "checksum_verify_s": statistics.median(verify),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8, help="of the calibration batch only")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--dir", default="", help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)

    config = case_config(
        model="mobilenet_v2",
        variant="freeze",
        resolution=args.resolution,
        batch_size=args.batch,
        dtype="float32",
        num_classes=args.num_classes,
        overrides={"model.width_multiplier": args.width},
    )
    _, state, _, _ = build_case(config, "freeze", step_lib.Sharded.over_all_devices(), total=2)
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    root = tempfile.mkdtemp(prefix="checkpoint_io_", dir=args.dir or None)
    try:
        records = time_modes(state, root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for record in records:
        record.update(
            resolution=args.resolution,
            width=args.width,
            state_bytes=state_bytes,
            leaves=len(jax.tree_util.tree_leaves(state)),
            oscillation_leaves=len(jax.tree_util.tree_leaves(state.oscillation)),
            repeats=args.repeats,
            platform=jax.devices()[0].platform,
        )
        print(json.dumps(record), flush=True)
    print(format_table(records))
    return records


def format_table(records: list[dict]) -> str:
    """One row per mode: each median time and its change relative to ``no_checksums``."""
    base = next(r for r in records if r["mode"] == "no_checksums")
    columns = ("save_blocking_s", "save_background_s", "restore_s")
    rows = [("mode", *columns)]
    for r in records:
        rows.append(
            (r["mode"], *(f"{r[k]:.3f} ({100 * (r[k] / base[k] - 1):+.0f} %)" for k in columns))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


if __name__ == "__main__":
    main()
