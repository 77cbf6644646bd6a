"""File sizes of the integer export (``oscqat_jax.export``, 4-bit kernels packed two per byte,
BN folded into per-channel scales and biases) against the float32 parameters, per
architecture.

    python benchmarks/export_size.py                      # the six architectures, LSQ_paper W4A4
    python benchmarks/export_size.py --models=resnet18 --setup=fc4 --n_bits=3

Each model is built at its real size (1000 classes, ``--resolution`` 224 traced), its
variables filled on the host from ``jax.eval_shape(model.init, ...)`` (random kernels with
their min-max weight scales: the ``.safetensors`` size does not depend on the values, and
min-max range methods need no calibration), and exported to ``.safetensors`` (uncompressed) and ``.npz``
(deflated). Prints one JSON line per model, then a table: the float32 bytes of ``params``,
each file's bytes and the ratio, and the bytes the quantized kernels take (``kernel_bytes``,
4-bit packed and 8-bit) against the rest (folded per-channel scales and biases, float layers,
activation scales: ``other_bytes``) and the header and manifest (``header_bytes``).
``kernel_ratio`` is the float32 bytes over the kernel bytes alone: the ratio no uncompressed
layout of these integers can pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Run as a script from a clone: make the repository's package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oscqat_jax import export, weight_files  # noqa: E402
from oscqat_jax.models import create_model, quant_plan  # noqa: E402
from oscqat_jax.nn.config import QuantContext  # noqa: E402
from oscqat_jax.nn.setups import SETUPS, QuantSetup  # noqa: E402

MODELS = (
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_lite0",
    "resnet18",
    "resnet50",
)


def host_variables(model, input_shape: tuple[int, ...], seed: int = 0) -> dict:
    """Every variable of ``model`` as host arrays: He-normal kernels, each weight scale the
    min-max one of its kernel (``max |w| / int_max``, so the integers spread over the grid
    as after calibration and ``.npz`` compression is not flattered), activation scales 0.05,
    BN variances 1, zeros elsewhere."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, QuantContext.create("eval"))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if leaf.dtype != jnp.float32:
            return np.zeros(leaf.shape, leaf.dtype)
        if name == "kernel":
            std = np.sqrt(2.0 / max(1, np.prod(leaf.shape[:-1])))
            return (rng.normal(size=leaf.shape) * std).astype(np.float32)
        if name in ("var", "scale") or name.endswith("_scale"):
            return np.full(leaf.shape, 0.05 if name.endswith("_scale") else 1.0, np.float32)
        return np.zeros(leaf.shape, np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, abstract)
    plan = quant_plan(model, (1, *input_shape))
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    for layer, (_, layer_quant) in plan.items():
        if layer_quant.weight.enabled and f"{layer}/weight_scale" in params:
            int_max = 2 ** (layer_quant.weight.n_bits - 1) - 1
            kernel = params[f"{layer}/kernel"]
            scale = params[f"{layer}/weight_scale"]
            scale[...] = np.max(np.abs(kernel)) / int_max
    return variables


def measure(name: str, setup: QuantSetup, resolution: int, folder: str) -> dict:
    """The sizes of one model's export (see the module docstring)."""
    model = create_model(name, num_classes=1000, quant_setup=setup)
    input_shape = (resolution, resolution, 3)
    variables = host_variables(model, input_shape)
    float_bytes = sum(np.asarray(v).nbytes for v in jax.tree_util.tree_leaves(variables["params"]))
    record = {"model": name, "setup": setup.name, "n_bits": setup.n_bits}
    record["params"] = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables["params"]))
    record["float32_bytes"] = int(float_bytes)
    for suffix in (".safetensors", ".npz"):
        path = os.path.join(folder, f"{name}{suffix}")
        manifest = export.export_model(
            path,
            variables,
            model_name=name,
            num_classes=1000,
            quant_setup=setup,
            input_shape=input_shape,
        )
        size = os.path.getsize(path)
        kind = suffix[1:]
        record[f"{kind}_bytes"] = size
        record[f"{kind}_ratio"] = round(float_bytes / size, 2)
        if suffix == ".safetensors":
            arrays, _ = weight_files.read(path, metadata_key=export.MANIFEST_KEY)
            kernels = {
                k: v
                for k, v in arrays.items()
                if k.endswith((f"/{export.KERNEL_PACKED}", f"/{export.KERNEL_INT}"))
            }
            record["kernel_bytes"] = int(sum(v.nbytes for v in kernels.values()))
            record["other_bytes"] = int(
                sum(v.nbytes for k, v in arrays.items() if k not in kernels)
            )
            record["header_bytes"] = size - record["kernel_bytes"] - record["other_bytes"]
            record["kernel_ratio"] = round(float_bytes / record["kernel_bytes"], 2)
            bits = [entry["n_bits"] for entry in manifest["weights"].values()]
            record["layers_4bit_or_less"] = sum(b <= 4 for b in bits)
            record["layers_wider"] = sum(b > 4 for b in bits)
    return record


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--setup", default="LSQ_paper", choices=SETUPS)
    parser.add_argument("--n_bits", type=int, default=4, help="weight and activation bits")
    parser.add_argument("--resolution", type=int, default=224, help="traced input size")
    args = parser.parse_args(argv)
    setup = QuantSetup(
        name=args.setup,
        n_bits=args.n_bits,
        weight_range_method="current_minmax",
        act_range_method="current_minmax",
    )
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            records.append(measure(name, setup, args.resolution, folder))
            print(json.dumps(records[-1]), flush=True)
    header = (
        f"{'model':20s} {'params':>10s} {'float32 MB':>10s} {'.safetensors MB':>15s} "
        f"{'ratio':>6s} {'.npz MB':>8s} {'ratio':>6s} {'kernels MB':>10s} {'ratio':>6s}"
    )
    print(header)
    for r in records:
        print(
            f"{r['model']:20s} {r['params']:>10d} {r['float32_bytes'] / 1e6:>10.2f} "
            f"{r['safetensors_bytes'] / 1e6:>15.2f} {r['safetensors_ratio']:>6.2f} "
            f"{r['npz_bytes'] / 1e6:>8.2f} {r['npz_ratio']:>6.2f} "
            f"{r['kernel_bytes'] / 1e6:>10.2f} {r['kernel_ratio']:>6.2f}"
        )
    return records


if __name__ == "__main__":
    main()
