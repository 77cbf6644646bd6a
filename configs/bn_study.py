"""The BN-statistics study: weight-only 3-bit QAT for 20 epochs, depth-wise vs ResNet.

    python train.py --config=configs/bn_study.py:mobilenet_v2 --workdir=DIR \
        --config.model.pretrained=mobilenet_v2.pth
    python train.py --config=configs/bn_study.py:resnet18 --workdir=DIR \
        --config.model.pretrained=resnet18.pth

Weights at 3 bits, activations in float, plain LSQ (no remedy): compare the accuracy before
and after BatchNorm re-estimation. The paper's finding is a large gap for the depth-wise
MobileNetV2 (oscillating weights corrupt the running statistics) and a small one for ResNet-18.
"""

from oscqat_jax.training.recipes import imagenet_recipe

MODELS = ("mobilenet_v2", "resnet18")


def get_config(arg: str = "mobilenet_v2"):
    if arg not in MODELS:
        raise ValueError(f"bn_study argument {arg!r} is not valid: use one of {', '.join(MODELS)}.")
    c = imagenet_recipe("mobilenet_v2", 3, "lsq")
    c.model.name = arg
    c.quant.quantize_activations = False
    c.train.epochs = 20
    return c
