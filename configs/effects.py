"""The effects study's recipe (docs/results.md): digits, float to plateau, then 3- or 4-bit QAT.

    python train.py --config=configs/effects.py:mobilenet_v2_w3a3_lsq --workdir=DIR
    python train.py --config=configs/effects.py:resnet18_w3_lsq --workdir=DIR   # weight-only
    python train.py --config=configs/effects.py:mobilenet_v2_w3a3_freeze --workdir=DIR

The argument is ``<model>_w<bits>[a<bits>]_<method>``: ``w3`` quantizes weights only (the
paper's Table 1), ``w3a3`` weights and activations; the method is lsq, damp or freeze.
``demos/effects.py`` runs the study from these configs (one float model per architecture,
shared by all its QAT runs).

Data: scikit-learn's 1,797 8x8 digits upsampled to 32x32, the fixed stratified 1437/360
split (44 training steps an epoch at batch 32), ±2 px shifts. Digits rather than
Fashion-MNIST because the study must fit about 90 minutes of a 2-core CPU with five seeds
of ResNet-18 (an epoch of Fashion-MNIST is 42 digits epochs). Not 16x16: there this
MobileNetV2's maps shrink to 1x1 and its float training stalled near 47 % (the study's
first try).

Float: 20 epochs for the MobileNetV2, 10 for ResNet-18 (``demos/effects.py``), SGD lr 0.05
cosine to 0; the study reports the training loss per epoch to show where it levels off.
QAT: 6 epochs (264 steps), evaluated before and after BN re-estimation after each; the
paper's learning rate (0.01 at 3 bits, 0.0033 at 4 bits, the same for ResNet-18, for which
the paper's recipes give no value of their own), SGD momentum 0.9, the paper's weight
decays, Adam 1e-5 on the scales, held *constant* (``lr_final = lr``): ``python train.py``
shows the BN gap in the middle of QAT, while the rate is high, and not at the end of its
cosine schedule. The paper's EMA momentum 0.001 is scaled to 0.01 (with 0.001 the EMA of a
weight's oscillations reaches only 1 - 0.999**264 = 23 % of their frequency in 264 steps),
and with it the freezing threshold (0.05 -> 0.005, cosine after the first quarter; the
paper 0.1 -> 0.011). Dampening as the paper: 0 -> 0.1 after the first quarter, kernel_mean.
"""

from oscqat_jax.models.mobilenet_v2 import SMALL_INPUT_SETTING
from oscqat_jax.training.config import base_config
from oscqat_jax.training.recipes import METHODS, RECIPE_VALUES

MODELS = ("mobilenet_v2", "resnet18")
FLOAT_EPOCHS = 20
QAT_EPOCHS = 6
EMA_MOMENTUM = 0.01
FREEZE_THRESHOLD = (0.05, 0.005)
DAMPENING_WEIGHT = (0.0, 0.1)


def parse_arg(arg: str) -> tuple[str, int, bool, str]:
    """``"mobilenet_v2_w3a3_lsq"`` -> ``("mobilenet_v2", 3, True, "lsq")``."""
    model, _, rest = arg.rpartition("_w")
    bits_text, _, method = rest.partition("_")
    weights, _, acts = bits_text.partition("a")
    if (
        model not in MODELS
        or method not in METHODS
        or weights not in ("3", "4")
        or acts not in ("", weights)
    ):
        raise ValueError(
            f"effects argument {arg!r} is not valid: use <model>_w<bits>[a<bits>]_<method> "
            f"with a model of {', '.join(MODELS)}, 3 or 4 bits and a method of "
            f"{', '.join(METHODS)}, e.g. mobilenet_v2_w3a3_freeze or resnet18_w3_lsq."
        )
    return model, int(weights), acts != "", method


def get_config(arg: str = "mobilenet_v2_w3a3_lsq"):
    model, bits, quantize_activations, method = parse_arg(arg)
    lr, weight_decay, _ = RECIPE_VALUES["mobilenet_v2"][bits]
    c = base_config()
    c.data.name = "digits"
    c.data.image_size = 32
    c.data.batch_size = 32
    c.data.eval_batch_size = 120
    c.data.max_shift = 2

    c.model.name = model
    if model == "mobilenet_v2":
        c.model.width_multiplier = 0.5
        c.model.block_setting = SMALL_INPUT_SETTING  # the sixth stage at stride 1

    c.float_train.epochs = FLOAT_EPOCHS
    c.float_train.optimizer.lr = 0.05
    c.float_train.optimizer.weight_decay = 5e-5

    c.quant.setup = "LSQ_paper"
    c.quant.n_bits = bits
    c.quant.n_bits_act = bits
    c.quant.quantize_activations = quantize_activations

    c.osc_freeze.ema_momentum = EMA_MOMENTUM
    if method == "freeze":
        c.osc_freeze.threshold, c.osc_freeze.threshold_final = FREEZE_THRESHOLD
    elif method == "damp":
        c.osc_damp.weight, c.osc_damp.weight_final = DAMPENING_WEIGHT

    c.optimizer.lr = lr
    c.optimizer.lr_final = lr  # constant: see the docstring
    c.optimizer.weight_decay = weight_decay[method]

    c.train.epochs = QAT_EPOCHS
    c.train.log_every = 15
    c.train.steps_per_call = 15
    c.train.checkpoint_every = 10**9  # only at the end
    c.train.keep_checkpoints = 1
    c.eval.every_epochs = 1
    c.eval.bn_reestimate = True
    c.eval.bn_batches = 20
    return c
