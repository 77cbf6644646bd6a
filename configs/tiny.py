"""Tiny runs: the one home of the small configs that tests, benchmarks and the quick study use.

    python train.py --config=configs/tiny.py --workdir=/tmp/oscqat_tiny
    python train.py --config=configs/tiny.py:quick --workdir=/tmp/oscqat_tiny_quick

``test`` (the default): a MobileNetV2 with three inverted-residual blocks (every kind of
layer, few compilations) on random 16x16 images, W3A3 with freezing and dampening annealed
over 2 QAT epochs of 6 steps, fast CPU compiles. The tests start from it and change what
they exercise; a run takes seconds after its compiles.

``quick``: the three-stage (five-block) MobileNetV2 of ``demos/reproduce.py --quick`` (width 0.5, 16x16
inputs); only the model fields and fast compiles are set here, the study fills in the rest.
"""

from oscqat_jax.training.config import base_config

TEST_BLOCKS = ((1, 8, 1, 1), (4, 16, 2, 2))
QUICK_BLOCKS = ((1, 8, 1, 1), (6, 16, 2, 2), (6, 32, 2, 2))


def get_config(arg: str = ""):
    variant = arg or "test"
    if variant == "test":
        return _test()
    if variant == "quick":
        return _quick()
    raise ValueError(f"configs/tiny.py takes 'test' or 'quick', got {arg!r}.")


def _test():
    c = base_config()
    c.data.name = "synthetic"
    c.data.image_size = 16
    c.data.channels = 1
    c.data.num_classes = 4
    c.data.num_train = 48
    c.data.num_val = 20
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.model.name = "mobilenet_v2"
    c.model.width_multiplier = 0.25
    c.model.block_setting = TEST_BLOCKS
    c.quant.n_bits = 3
    c.osc_freeze.threshold = 0.2
    c.osc_freeze.threshold_final = 0.05
    c.osc_freeze.ema_momentum = 0.3
    c.osc_damp.weight = 0.0
    c.osc_damp.weight_final = 0.1
    c.optimizer.lr = 0.05
    c.train.epochs = 2
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.eval.bn_batches = 2
    c.train.fast_compile = True
    return c


def _quick():
    c = base_config()
    c.data.image_size = 16
    c.model.width_multiplier = 0.5
    c.model.block_setting = QUICK_BLOCKS
    c.train.fast_compile = True
    return c
