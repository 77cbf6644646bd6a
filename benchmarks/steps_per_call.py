"""Steps per second of the training loop at ``train.steps_per_call`` = 1 and K > 1.

    python benchmarks/steps_per_call.py                       # configs/default.py, K = 1, 8, 32
    python benchmarks/steps_per_call.py --ks=1,4,20 --phases=qat --epochs=2
    python benchmarks/steps_per_call.py --log_every=1000       # calls not cut at log flushes

Runs the trainer's own loop (``loop.train_phase``: logging flushes, NaN checks, progress bar;
no checkpoints, no evaluation) over the float and the QAT phase of a config, for each K, and
times it from the first flush (compilation done) to the last, so the rate includes the loop's
host work and leaves compilation out. A call ends at every flush and epoch end, so K above
``train.log_every`` (20 in the default config) runs as K = ``log_every``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class _TimedWriter:
    """Stands in for the metric writer: the time of each flush, by step."""

    def __init__(self):
        self.flushes: list[tuple[int, float]] = []

    def write(self, step, means, prefix=""):
        self.flushes.append((step, time.perf_counter()))


def _load_config(path: str):
    spec = importlib.util.spec_from_file_location("benchmarked_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _time_phase(config, phase: str, k: int) -> dict:
    import jax

    from oscqat_jax.training import build, context, data, loop, models, phases
    from oscqat_jax.training import step as step_lib

    config = config.copy_and_resolve_references()
    config.train.steps_per_call = k
    source = data.load_dataset(config.data)
    writer = _TimedWriter()
    sharded = step_lib.Sharded.over_all_devices(fast_compile=config.train.fast_compile)
    ctx = context.Context(config, "", source, sharded, writer)
    per_epoch = ctx.steps_per_epoch
    total = config.train.epochs * per_epoch
    forward = models.forward_of(config, source)  # the float phase runs it unquantized
    variables = phases.init_variables(forward, ctx)
    if phase == "float":
        opt = build.optimizer(config, phase="float", total_steps=total, steps_per_epoch=per_epoch)
        schedules, step_config = build.float_schedules(opt), build.FLOAT_STEP
    else:
        variables = phases.calibrate(ctx, forward, variables)
        opt = build.optimizer(config, phase="qat", total_steps=total, steps_per_epoch=per_epoch)
        schedules = build.qat_schedules(config, opt, total)
        step_config = build.qat_step_config(config)
    state = sharded.replicate(step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(0)))
    loop.train_phase(
        ctx,
        state=state,
        step_fn=step_lib.make_train_step(forward, opt.tx, step_config),
        table=schedules.table(total),
        total_steps=total,
        prefix=f"{phase} K={k}",
        ckpt=None,
        on_epoch_end=None,
    )
    (first, t0), (last, t1) = writer.flushes[0], writer.flushes[-1]
    return {
        "phase": phase,
        "steps_per_call": k,
        "timed_steps": last - first,
        "seconds": t1 - t0,
        "steps_per_s": (last - first) / (t1 - t0),
        "batch_size": config.data.batch_size,
        "log_every": config.train.log_every,
        "steps_per_epoch": per_epoch,
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description="Times the training loop at train.steps_per_call = 1 and K > 1."
    )
    parser.add_argument(
        "--config",
        default=os.path.join(ROOT, "configs", "default.py"),
        help="config file (default: configs/default.py, what python train.py runs)",
    )
    parser.add_argument("--ks", default="1,8,32", help="comma-separated steps per call (1 first)")
    parser.add_argument("--phases", default="float,qat", help="float, qat or both")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per phase and K")
    parser.add_argument(
        "--log_every", type=int, default=0, help="override train.log_every (0: the config's)"
    )
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    config = _load_config(args.config)
    config.train.epochs = args.epochs
    if args.log_every:
        config.train.log_every = args.log_every
    results = []
    for phase in args.phases.split(","):
        for k in ks:
            result = _time_phase(config, phase, k)
            base = next((r for r in results if r["phase"] == phase), result)
            result["speed_up"] = result["steps_per_s"] / base["steps_per_s"]
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\n{'phase':6} {'K':>4} {'steps/s':>9} {'speed-up':>9}")
    for r in results:
        print(
            f"{r['phase']:6} {r['steps_per_call']:>4} {r['steps_per_s']:>9.2f} "
            f"{r['speed_up']:>8.2f}x"
        )
    return results


if __name__ == "__main__":
    main()
