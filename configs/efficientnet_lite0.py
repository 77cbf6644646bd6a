"""EfficientNet-lite0 on ImageNet: the paper's W4A4 and W3A3 recipes (docs/method.md §9).

    python train.py --config=configs/efficientnet_lite0.py:w4_lsq --workdir=DIR \
        --config.model.pretrained=efficientnet_lite0.pth
    python train.py --config=configs/efficientnet_lite0.py:w4_damp --workdir=DIR ...
    python train.py --config=configs/efficientnet_lite0.py:w4_freeze --workdir=DIR ...
    python train.py --config=configs/efficientnet_lite0.py:w3_lsq --workdir=DIR ...
    python train.py --config=configs/efficientnet_lite0.py:w3_damp --workdir=DIR ...
    python train.py --config=configs/efficientnet_lite0.py:w3_freeze --workdir=DIR ...   # the default

As the reference's script: 50 epochs, lr 0.0033 (W4) / 0.01 (W3), weight decay 1e-4 (W4) /
5e-5 (W3), Adam 1e-5 on the scales, timm's weight layout. Freezing uses threshold 0.1 ->
0.015 (W4) / 0.005 (W3) and really freezes (the reference's "freeze" script runs dampening).
"""

from oscqat_jax.training.recipes import imagenet_recipe, parse_arg


def get_config(arg: str = ""):
    return imagenet_recipe("efficientnet_lite0", *parse_arg(arg, "w3_freeze"))
