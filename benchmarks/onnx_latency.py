"""CPU latency of the float model and of its W4A4 exports, in JAX and ONNX Runtime, on the same
machine in one run.

    python benchmarks/onnx_latency.py                  # MobileNetV2 and ResNet-18, 224x224, batch 1 and 32
    python benchmarks/onnx_latency.py --models=mobilenet_v2 --batches=1,8 --runs=50 --threads=1

Per model (1000 classes), four engines:

- ``jax_float``: the float model (``oscqat_jax.models.create_model``, not quantized)
  in eval mode (``train=False``), ``jax.jit``-compiled, each call ended by
  ``block_until_ready``;
- ``ort_float``: the same float model exported to ONNX (:func:`oscqat_jax.deploy.export_onnx`
  of its forward: float Conv/Gemm with BN folded in);
- ``ort_int4_qdq``: the W4A4 model (``LSQ_paper`` rules, ``oscqat_jax.models.quantize``,
  ranges calibrated on one batch of random images: latency does not depend on the values)
  exported with ``container="int4"``
  (QuantizeLinear/DequantizeLinear around float operators, int4 weights);
- ``ort_int8``: the same W4A4 model exported with ``container="int8"`` (the same integers in
  8-bit types: QLinearConv, ConvInteger and MatMulInteger).

ONNX Runtime runs on the CPU with the package's session settings
(:func:`oscqat_jax.deploy.inference_session`, graph optimisations at their default, all) and
``--threads`` intra-op threads (0: ONNX Runtime's default, one per physical core); XLA uses
its own thread pool over every core. Each case times ``--runs`` calls after ``--warmup``
untimed ones and prints one JSON line: the median, fastest and slowest seconds per call, the
median and fastest per image, the CPU count and the 1-minute load average before and after
the case (the numbers of a shared machine are only as quiet as it); a table follows, with
each engine's median against ``jax_float`` and ``ort_float``.
"""

from __future__ import annotations

import argparse
import functools
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

from oscqat_jax import models as families  # noqa: E402
from oscqat_jax.nn.setups import QuantSetup  # noqa: E402

ENGINES = ("jax_float", "ort_float", "ort_int4_qdq", "ort_int8")


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
    """``(float model, quantized model, float variables, calibrated variables)``; both
    initialised from the same key, so the quantized model quantizes the float weights."""
    setup = QuantSetup(
        n_bits=n_bits, weight_range_method="current_minmax", act_range_method="running_minmax"
    )
    float_model = families.create_model(name, num_classes=1000)
    model = families.quantize(float_model, setup)
    images = np.random.default_rng(seed).normal(size=(8, resolution, resolution, 3))
    images = images.astype(np.float32)
    key = jax.random.key(seed)
    float_variables = jax.jit(functools.partial(float_model.init, train=False))(key, images[:1])
    variables = jax.jit(functools.partial(model.init, train=False))(key, images[:1])
    variables = model.calibrate(variables, [images], train=False)
    return float_model, model, dict(float_variables), jax.device_get(variables)


def onnx_models(name: str, resolution: int, n_bits: int, folder: str):
    """``(float JAX forward, float variables, {engine: ONNX path}, export seconds)``."""
    from oscqat_jax.deploy import export_model_onnx, export_onnx

    float_model, model, float_variables, variables = quantized_variables(name, resolution, n_bits)
    shape = (resolution, resolution, 3)
    forward = functools.partial(float_model.apply, train=False)
    paths, export_s = {}, {}
    started = time.perf_counter()
    paths["ort_float"] = os.path.join(folder, f"{name}_float.onnx")
    # Traced by the exporter with depth-wise convolutions as one grouped Conv each.
    export_onnx(
        lambda x: forward(float_variables, x), np.zeros((1, *shape), np.float32), paths["ort_float"]
    )
    export_s["ort_float"] = time.perf_counter() - started
    for engine, container in (("ort_int4_qdq", "int4"), ("ort_int8", "int8")):
        started = time.perf_counter()
        paths[engine] = os.path.join(folder, f"{name}_{container}.onnx")
        export_model_onnx(
            model, variables, paths[engine], input_shape=shape, container=container, train=False
        )
        export_s[engine] = time.perf_counter() - started
    return jax.jit(forward), float_variables, paths, export_s


def record(engine: str, batch: int, times: list[float], **extra) -> dict:
    median = statistics.median(times)
    return {
        "engine": engine,
        "batch": batch,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "median_ms_per_image": 1000.0 * median / batch,
        "min_ms_per_image": 1000.0 * min(times) / batch,
        **extra,
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet18", help="comma-separated")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--n_bits", type=int, default=4, help="weight and activation bits")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--onnx_dir", default="", help="keep the exported models here")
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)"
    )
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"--engines: {unknown[0]!r} is not one of {', '.join(ENGINES)}")
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")

    import tempfile

    from oscqat_jax.deploy import inference_session

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.onnx_dir or tmp
        for name in args.models.split(","):
            forward, float_variables, paths, export_s = onnx_models(
                name, args.resolution, args.n_bits, folder
            )
            sessions = {
                engine: inference_session(paths[engine], threads=args.threads)
                for engine in engines
                if engine != "jax_float"
            }
            common = {
                "model": name,
                "resolution": args.resolution,
                "n_bits": args.n_bits,
                "cpu_count": os.cpu_count(),
                "onnx_threads": args.threads,
            }
            rng = np.random.default_rng(1)
            shape = (args.resolution, args.resolution, 3)
            for batch in (int(b) for b in args.batches.split(",")):
                images = rng.normal(size=(batch, *shape)).astype(np.float32)
                on_device = jax.device_put(images)
                for engine in engines:
                    if engine == "jax_float":

                        def call(x=on_device, f=forward, variables=float_variables):
                            f(variables, x).block_until_ready()

                    else:
                        session = sessions[engine]
                        feed = {session.get_inputs()[0].name: images}

                        def call(session=session, feed=feed):
                            session.run(None, feed)

                    load_before = os.getloadavg()[0]
                    times = timed(call, args.runs, args.warmup)
                    records.append(
                        record(
                            engine,
                            batch,
                            times,
                            load_before=load_before,
                            load_after=os.getloadavg()[0],
                            export_s=round(export_s.get(engine, 0.0), 1),
                            onnx_bytes=os.path.getsize(paths[engine]) if engine in paths else None,
                            **common,
                        )
                    )
                    print(json.dumps(records[-1]), flush=True)
    print_table(records)
    return records


def print_table(records: list[dict]) -> None:
    """Per model and batch: ms per image (median / fastest) and the median's speed-up over
    both float engines."""
    print(
        f"{'model':14s} {'engine':13s} {'batch':>5s} {'ms/img med':>10s} {'ms/img min':>10s} "
        f"{'x jax_float':>11s} {'x ort_float':>11s} {'load':>5s}"
    )
    medians = {(r["model"], r["batch"], r["engine"]): r["median_s"] for r in records}
    for r in records:
        ratios = []
        for base in ("jax_float", "ort_float"):
            ref = medians.get((r["model"], r["batch"], base))
            ratios.append(f"{ref / r['median_s']:>11.2f}" if ref else f"{'-':>11s}")
        print(
            f"{r['model']:14s} {r['engine']:13s} {r['batch']:>5d} "
            f"{r['median_ms_per_image']:>10.2f} {r['min_ms_per_image']:>10.2f} "
            f"{' '.join(ratios)} {r['load_before']:>5.1f}"
        )


if __name__ == "__main__":
    main()
