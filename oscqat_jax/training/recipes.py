"""The paper's ImageNet recipes (docs/method.md §9), shared by the recipe files in ``configs/``.

A recipe is a model, a bit width (weights and activations alike) and a method: plain LSQ,
LSQ with oscillation dampening, or LSQ with iterative freezing. Values come from
docs/method.md §9 and the reference's training scripts; where the reference's EfficientNet
"freeze" script runs dampening instead, the freezing recipe here really freezes.
"""

from __future__ import annotations

import ml_collections

from oscqat_jax.training.config import base_config

METHODS = ("lsq", "damp", "freeze")
# (learning rate, weight decay per method, final freezing threshold) per model and bit width.
_MOBILENET_V2 = {
    4: (0.0033, {"lsq": 2.5e-5, "damp": 2.5e-5, "freeze": 5e-5}, 0.01),
    3: (0.01, {"lsq": 2.5e-5, "damp": 2.5e-5, "freeze": 2.5e-5}, 0.011),
}
_EFFICIENTNET_LITE0 = {
    4: (0.0033, {"lsq": 1e-4, "damp": 1e-4, "freeze": 1e-4}, 0.015),
    3: (0.01, {"lsq": 5e-5, "damp": 5e-5, "freeze": 5e-5}, 0.005),
}
RECIPE_VALUES = {
    "mobilenet_v2": _MOBILENET_V2,
    # The reference has no MobileNetV3 recipe: it takes MobileNetV2's values.
    "mobilenet_v3_small": _MOBILENET_V2,
    "efficientnet_lite0": _EFFICIENTNET_LITE0,
}
EPOCHS = {"mobilenet_v2": 90, "mobilenet_v3_small": 90, "efficientnet_lite0": 50}


def parse_arg(arg: str, default: str) -> tuple[int, str]:
    """``"w3_freeze"`` -> ``(3, "freeze")``; one sentence on anything else."""
    arg = arg or default
    try:
        bits_text, method = arg.split("_")
        bits = int(bits_text.removeprefix("w"))
    except ValueError:
        bits, method = None, None
    if bits not in (3, 4) or method not in METHODS or not arg.startswith("w"):
        raise ValueError(
            f"recipe argument {arg!r} is not valid: use w3 or w4 followed by one of "
            f"{', '.join(METHODS)}, e.g. w3_freeze."
        )
    return bits, method


def imagenet_recipe(model: str, bits: int, method: str) -> ml_collections.ConfigDict:
    """The config of one paper recipe on ImageNet (224x224, batch 128, pretrained weights)."""
    lr, weight_decay, threshold_final = RECIPE_VALUES[model][bits]
    c = base_config()
    c.data.name = "imagenet_folder"  # or tfds (see config.data); set data.dir or data.tfds_data_dir
    c.data.image_size = 224
    c.data.num_classes = 1000
    c.data.batch_size = 128
    c.data.eval_batch_size = 256
    c.model.name = model
    c.quant.setup = "LSQ_paper"
    c.quant.n_bits = bits
    c.quant.n_bits_act = bits
    c.optimizer.lr = lr
    c.optimizer.weight_decay = weight_decay[method]
    c.train.epochs = EPOCHS[model]
    c.train.log_every = 100
    c.train.checkpoint_every = 2000
    c.osc_freeze.ema_momentum = 0.001
    if method == "freeze":
        c.osc_freeze.threshold = 0.1
        c.osc_freeze.threshold_final = threshold_final
    elif method == "damp":
        c.osc_damp.weight = 0.0
        c.osc_damp.weight_final = 0.1
    return c
