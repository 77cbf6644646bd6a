"""MobileNetV3-Small on ImageNet at W4A4 and W3A3 (the paper reports it; the reference lacks it).

    python train.py --config=configs/mobilenet_v3_small.py:w4_lsq --workdir=DIR \
        --config.model.pretrained=mobilenet_v3_small.pth
    python train.py --config=configs/mobilenet_v3_small.py:w4_damp --workdir=DIR ...
    python train.py --config=configs/mobilenet_v3_small.py:w4_freeze --workdir=DIR ...
    python train.py --config=configs/mobilenet_v3_small.py:w3_lsq --workdir=DIR ...
    python train.py --config=configs/mobilenet_v3_small.py:w3_damp --workdir=DIR ...
    python train.py --config=configs/mobilenet_v3_small.py:w3_freeze --workdir=DIR ...   # the default

MobileNetV2's values (lr, weight decay, schedules, 90 epochs), torchvision's weight layout.
"""

from oscqat_jax.training.recipes import imagenet_recipe, parse_arg


def get_config(arg: str = ""):
    return imagenet_recipe("mobilenet_v3_small", *parse_arg(arg, "w3_freeze"))
