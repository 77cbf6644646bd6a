"""MobileNetV2 on ImageNet: the paper's W4A4 and W3A3 recipes (docs/method.md §9).

    python train.py --config=configs/mobilenet_v2.py:w4_lsq --workdir=DIR \
        --config.model.pretrained=mobilenet_v2.pth
    python train.py --config=configs/mobilenet_v2.py:w4_damp --workdir=DIR ...
    python train.py --config=configs/mobilenet_v2.py:w4_freeze --workdir=DIR ...
    python train.py --config=configs/mobilenet_v2.py:w3_lsq --workdir=DIR ...
    python train.py --config=configs/mobilenet_v2.py:w3_damp --workdir=DIR ...
    python train.py --config=configs/mobilenet_v2.py:w3_freeze --workdir=DIR ...   # the default

LSQ_paper setup, MSE range initialisation, SGD (momentum 0.9) with cosine decay to 0 at
lr 0.0033 (4-bit) / 0.01 (3-bit), Adam 1e-5 on the scales, 90 epochs at batch 128.
Dampening: lambda 0 -> 0.1 (cosine from 25 % of training); freezing: threshold 0.1 -> 0.01
(W4) / 0.011 (W3), EMA momentum 0.001.
"""

from oscqat_jax.training.recipes import imagenet_recipe, parse_arg


def get_config(arg: str = ""):
    return imagenet_recipe("mobilenet_v2", *parse_arg(arg, "w3_freeze"))
