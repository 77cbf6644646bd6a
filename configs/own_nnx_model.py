"""Your own ``flax.nnx`` model in the training program: the small CNN of
``demos/nnx_cnn.py`` (nothing of oscqat_jax in it), W4A4 QAT with freezing on digits.

    python train.py --config=configs/own_nnx_model.py --workdir=/tmp/own_nnx_model

As ``configs/own_model.py`` for a Linen model: the model is named by import path and called
with ``model.kwargs``, the data's class count and ``rngs=nnx.Rngs(...)`` of the run's seed;
it is quantized in place by the ``LSQ_paper`` rules over its attribute paths (the stem block's
``stem/conv`` and the classifier ``head`` at 8 bits, the inner convs ``blocks/<i>/conv`` at 4
bits with tracking and freezing). BatchNorm switches with ``model.train()``/``eval()``, so
``model.train_flag`` is "". Float model for 2 epochs at 16x16, then 2 QAT epochs with
per-epoch evaluation before and after BN re-estimation; well under a minute on 2 CPU cores.
Export and check it as any run:

    python train.py --config=configs/own_nnx_model.py --workdir=/tmp/own_nnx_model \\
        --mode=export --format=onnx
    python -m oscqat_jax.deploy check /tmp/own_nnx_model/model.onnx \\
        --config=configs/own_nnx_model.py --workdir=/tmp/own_nnx_model
"""

from oscqat_jax.training.config import base_config


def get_config():
    c = base_config()
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.batch_size = 64
    c.data.eval_batch_size = 120

    c.model.name = "demos.nnx_cnn:make_model"
    c.model.kwargs = {"width": 8, "depth": 2}
    c.model.train_flag = ""
    c.model.first_conv = "stem/conv"
    c.model.classifier = "head"

    c.float_train.epochs = 2
    c.float_train.optimizer.lr = 0.1

    c.quant.setup = "LSQ_paper"
    c.quant.n_bits = 4

    # A short run: a faster EMA and a threshold it can reach (see configs/default.py).
    c.osc_freeze.threshold = 0.05
    c.osc_freeze.threshold_final = 0.01
    c.osc_freeze.ema_momentum = 0.01

    c.optimizer.lr = 0.01
    c.optimizer.lr_final = 0.002

    c.train.epochs = 2
    c.train.log_every = 10
    c.train.checkpoint_every = 20
    c.eval.bn_batches = 5
    c.train.fast_compile = True
    return c
