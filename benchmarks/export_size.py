"""File sizes of the integer export (``oscqat_jax.export``) of the package's families as plain
Flax models quantized by rules (``oscqat_jax.models``), against their float32
parameters: 4-bit kernels packed two per byte, 8-bit ones as int8, BN folded at every ConvBN
site into per-channel scales and one bias per channel (format version 5).

    python benchmarks/export_size.py                      # five families, LSQ_paper W4A4
    python benchmarks/export_size.py --models=resnet50 --setup=fc4 --n_bits=3 --fold_bn

Each model is built at its real size (1000 classes, ``--resolution`` 224), its variables
filled on the host from an abstract init (He-normal kernels, random BN parameters and
statistics) and calibrated on one random image with min-max ranges (``current_minmax``; the
setup's own MSE ranges with ``--ranges=mse``: the ``.safetensors`` size does not depend on
the values, the ``.npz`` one does, as the integers' spread sets how well they deflate), then exported to ``.safetensors`` (uncompressed) and
``.npz`` (deflated). Prints one JSON line per model, then a table: the float32 bytes of the
float model's ``params``, each file's bytes and ratio, and where the ``.safetensors`` bytes
go: the packed 4-bit kernels (``packed_bytes``), the int8 kernels (``int8_bytes``: the first
conv and the classifier, 8 bits under ``LSQ_paper``), everything else (folded scales and
biases, float layers, activation scales: ``other_bytes``) and the header and manifest
(``header_bytes``). ``kernel_ratio`` is the float32 bytes over the kernel bytes alone: the
ratio no uncompressed layout of these integers can pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Run as a script from a clone: make the repository's package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oscqat_jax import export, weight_files  # noqa: E402
from oscqat_jax import models as families  # noqa: E402
from oscqat_jax.nn.setups import SETUPS, QuantSetup  # noqa: E402

FAMILIES = {
    "mobilenet_v2": families.MobileNetV2,
    "mobilenet_v3_small": functools.partial(families.MobileNetV3, variant="small"),
    "mobilenet_v3_large": functools.partial(families.MobileNetV3, variant="large"),
    "efficientnet_lite0": functools.partial(families.EfficientNetLite, variant="lite0"),
    "resnet18": functools.partial(families.ResNet, depth=18),
    "resnet50": functools.partial(families.ResNet, depth=50),
}
DEFAULT_MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
DEFAULT_MODELS += ("efficientnet_lite0", "resnet18")
CLASSES = 1000


def host_variables(qmodel, input_shape: tuple[int, ...], seed: int = 0) -> dict:
    """Every variable of ``qmodel`` as host arrays: He-normal kernels, BN scales and
    variances around 1 and biases and means around 0 (random), quantizer scales 1 until
    calibration sets them, zeros elsewhere."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    abstract = jax.eval_shape(functools.partial(qmodel.init, train=False), jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        if leaf.dtype != jnp.float32:
            return np.zeros(leaf.shape, leaf.dtype)
        if key.endswith("/kernel"):
            std = np.sqrt(2.0 / max(1, np.prod(leaf.shape[:-1])))
            return (rng.normal(size=leaf.shape) * std).astype(np.float32)
        if key.endswith(("bn/scale", "bn/var")):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if key.endswith(("bn/bias", "bn/mean")):
            return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
        return np.full(leaf.shape, 1.0 if key.endswith("_scale") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def measure(name: str, setup: QuantSetup, fold_bn: bool, resolution: int, folder: str) -> dict:
    """The sizes of one model's export (see the module docstring)."""
    model = FAMILIES[name](num_classes=CLASSES)
    qmodel = families.quantize(model, setup, fold_bn=fold_bn)
    input_shape = (resolution, resolution, 3)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    float_params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    float_params = jax.tree_util.tree_leaves(float_params["params"])
    float_bytes = 4 * sum(int(np.prod(leaf.shape)) for leaf in float_params)
    image = np.random.default_rng(1).normal(size=(1, *input_shape)).astype(np.float32)
    variables = qmodel.calibrate(host_variables(qmodel, input_shape), [image], train=False)
    record = {"model": name, "setup": setup.name, "n_bits": setup.n_bits, "fold_bn": fold_bn}
    record["params"] = sum(int(np.prod(leaf.shape)) for leaf in float_params)
    record["float32_bytes"] = int(float_bytes)
    for suffix in (".safetensors", ".npz"):
        path = os.path.join(folder, f"{name}{suffix}")
        manifest = export.export_model(
            path, variables, model=qmodel, input_shape=input_shape, train=False
        )
        size = os.path.getsize(path)
        kind = suffix[1:]
        record[f"{kind}_bytes"] = size
        record[f"{kind}_ratio"] = round(float_bytes / size, 2)
        if suffix == ".safetensors":
            record.update(_breakdown(path, size, float_bytes, manifest))
    return record


def _breakdown(path: str, size: int, float_bytes: int, manifest: dict) -> dict:
    """Where the bytes of a ``.safetensors`` export go (see the module docstring)."""
    arrays, _ = weight_files.read(path, metadata_key=export.MANIFEST_KEY)
    packed = sum(v.nbytes for k, v in arrays.items() if k.endswith(f"/{export.KERNEL_PACKED}"))
    ints = sum(v.nbytes for k, v in arrays.items() if k.endswith(f"/{export.KERNEL_INT}"))
    other = sum(v.nbytes for v in arrays.values()) - packed - ints
    bits = [entry["n_bits"] for entry in manifest["weights"].values()]
    return {
        "packed_bytes": int(packed),
        "int8_bytes": int(ints),
        "other_bytes": int(other),
        "header_bytes": int(size - packed - ints - other),
        "kernel_ratio": round(float_bytes / (packed + ints), 2),
        "folded_sites": sum("bn" in entry for entry in manifest["weights"].values()),
        "layers_4bit_or_less": sum(b <= 4 for b in bits),
        "layers_wider": sum(b > 4 for b in bits),
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    parser.add_argument("--setup", default="LSQ_paper", choices=SETUPS)
    parser.add_argument("--n_bits", type=int, default=4, help="weight and activation bits")
    parser.add_argument("--fold_bn", action="store_true", help="quantize BN-folded kernels")
    parser.add_argument("--resolution", type=int, default=224, help="input size")
    parser.add_argument(
        "--ranges",
        default="minmax",
        choices=("minmax", "mse"),
        help="range initialisation of the scales: min-max (default) or the setup's MSE",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(FAMILIES))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; use any of {', '.join(FAMILIES)}")
    setup = QuantSetup(name=args.setup, n_bits=args.n_bits)
    if args.ranges == "minmax":
        setup = dataclasses.replace(
            setup, weight_range_method="current_minmax", act_range_method="current_minmax"
        )
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            records.append(measure(name, setup, args.fold_bn, args.resolution, folder))
            print(json.dumps(records[-1]), flush=True)
    print(
        f"{'model':20s} {'params':>10s} {'float32 MB':>10s} {'.safetensors MB':>15s} "
        f"{'ratio':>6s} {'.npz MB':>8s} {'ratio':>6s} {'kernels MB':>10s} {'ratio':>6s} "
        f"{'int8 MB':>8s} {'other MB':>8s}"
    )
    for r in records:
        kernels = r["packed_bytes"] + r["int8_bytes"]
        print(
            f"{r['model']:20s} {r['params']:>10d} {r['float32_bytes'] / 1e6:>10.2f} "
            f"{r['safetensors_bytes'] / 1e6:>15.2f} {r['safetensors_ratio']:>6.2f} "
            f"{r['npz_bytes'] / 1e6:>8.2f} {r['npz_ratio']:>6.2f} "
            f"{kernels / 1e6:>10.2f} {r['kernel_ratio']:>6.2f} "
            f"{r['int8_bytes'] / 1e6:>8.2f} {r['other_bytes'] / 1e6:>8.2f}"
        )
    return records


if __name__ == "__main__":
    main()
