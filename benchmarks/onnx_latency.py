"""CPU latency per image of an exported W4A4 model in ONNX Runtime against the float model in
JAX, on the same machine.

    python benchmarks/onnx_latency.py                       # MobileNetV2, 224x224, batch 1 and 32
    python benchmarks/onnx_latency.py --model=resnet18 --batches=1,8 --runs=50

The quantized model (``LSQ_paper`` W4A4, 1000 classes) is initialised, its ranges calibrated
on one batch of random images (min-max ranges: latency does not depend on the values), and
exported with :func:`oscqat_jax.deploy.export_model_onnx` (QDQ graph, int4 weights). ONNX
Runtime runs it on the CPU with its default graph optimisations (``--threads`` sets its
intra-op threads; 0 keeps its default). The reference
is the float model (``quant_setup="float"``, the same architecture and weights) applied in
``float_eval`` mode, ``jax.jit``-compiled, each call ended by ``block_until_ready``. Each
case times ``--runs`` calls after ``--warmup`` untimed ones and prints one JSON line: the
median, min and max seconds per call, the median per image, the CPU count and the load
average (the numbers of a shared machine are only as quiet as it); a table follows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

# Run as a script from a clone: make the repository's package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oscqat_jax.models import create_model  # noqa: E402
from oscqat_jax.nn.config import QuantContext  # noqa: E402
from oscqat_jax.nn.setups import QuantSetup  # noqa: E402


def timed(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Seconds of each of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def quantized_variables(name: str, resolution: int, n_bits: int, seed: int = 0):
    """``(float model, quantized model, float variables, calibrated variables)``."""
    from oscqat_jax.training import step as step_lib

    setup = QuantSetup(
        n_bits=n_bits, weight_range_method="current_minmax", act_range_method="running_minmax"
    )
    float_model = create_model(name, num_classes=1000, quant_setup="float")
    model = create_model(name, num_classes=1000, quant_setup=setup)
    images = np.random.default_rng(seed).normal(size=(8, resolution, resolution, 3))
    images = images.astype(np.float32)
    float_variables = jax.jit(
        lambda key: float_model.init(key, images[:1], QuantContext.create("float_eval"))
    )(jax.random.key(seed))
    calibrate = jax.jit(step_lib.make_calibrate_step(model))
    variables = calibrate(dict(float_variables), images, jax.random.key(seed + 1))
    return float_model, model, dict(float_variables), jax.device_get(variables)


def record(engine: str, batch: int, times: list[float], **extra) -> dict:
    median = statistics.median(times)
    return {
        "engine": engine,
        "batch": batch,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "median_ms_per_image": 1000.0 * median / batch,
        **extra,
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--n_bits", type=int, default=4, help="weight and activation bits")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--onnx", default="", help="also write the exported model here")
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)"
    )
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from oscqat_jax.deploy import export_model_onnx

    float_model, model, float_variables, variables = quantized_variables(
        args.model, args.resolution, args.n_bits
    )
    shape = (args.resolution, args.resolution, 3)
    started = time.perf_counter()
    proto = export_model_onnx(model, variables, args.onnx or None, input_shape=shape)
    export_s = time.perf_counter() - started
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    forward = jax.jit(lambda v, x: float_model.apply(v, x, QuantContext.create("float_eval")))
    common = {
        "model": args.model,
        "resolution": args.resolution,
        "n_bits": args.n_bits,
        "cpu_count": os.cpu_count(),
        "onnx_threads": args.threads,
        "load_average": os.getloadavg()[0],
    }
    records = []
    rng = np.random.default_rng(1)
    for batch in (int(b) for b in args.batches.split(",")):
        images = rng.normal(size=(batch, *shape)).astype(np.float32)
        on_device = jax.device_put(images)
        onnx_times = timed(
            lambda images=images: session.run(None, {input_name: images}), args.runs, args.warmup
        )
        jax_times = timed(
            lambda on_device=on_device: forward(float_variables, on_device).block_until_ready(),
            args.runs,
            args.warmup,
        )
        for engine, times in (("onnxruntime_w4a4", onnx_times), ("jax_float", jax_times)):
            records.append(record(engine, batch, times, export_s=round(export_s, 1), **common))
            print(json.dumps(records[-1]), flush=True)
    print(f"{'engine':18s} {'batch':>5s} {'ms/call':>9s} {'min ms':>9s} {'ms/image':>9s}")
    for r in records:
        print(
            f"{r['engine']:18s} {r['batch']:>5d} {1000 * r['median_s']:>9.2f} "
            f"{1000 * r['min_s']:>9.2f} {r['median_ms_per_image']:>9.2f}"
        )
    return records


if __name__ == "__main__":
    main()
