"""Tests of the plain model families (oscqat_jax.models): parameter counts against the
official models, the registry, the quantizer variables the rules add, input sizes, compute
dtype and BN folding, width multipliers, and bad options refused in one sentence. (Every
family and setup taking a train step is tests/training/test_package_models.py's.)

Initialising a whole network under ``jit`` compiles one random-number kernel per parameter
(tens of seconds on a CPU), so these tests trace ``init`` abstractly (``jax.eval_shape``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from oscqat_jax import models as families
from oscqat_jax.models import MODELS, MobileNetV2, ResNet, create_model

SMALL = (2, 32, 32, 3)

# torchvision (mobilenet_v2, mobilenet_v3_*, resnet*) and timm (efficientnet_lite*) at 1000
# classes; timm reports lite1..4 as 5.42M, 6.09M, 8.20M and 13.01M.
PARAM_COUNTS = {
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_small": 2_542_856,
    "mobilenet_v3_large": 5_483_032,
    "efficientnet_lite0": 4_652_008,
    "efficientnet_lite1": 5_416_680,
    "efficientnet_lite2": 6_092_072,
    "efficientnet_lite3": 8_197_096,
    "efficientnet_lite4": 13_006_568,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
}


def abstract_variables(model, shape=SMALL):
    """``model.init``'s variables as shapes (a plain model or one quantized by rules)."""
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name):
    model = create_model(name, num_classes=1000)
    assert count(abstract_variables(model, (1, 64, 64, 3))["params"]) == PARAM_COUNTS[name]


def test_registry_covers_the_counted_models():
    assert set(MODELS) == set(PARAM_COUNTS)
    for name in MODELS:
        assert families.model_name_of(create_model(name, num_classes=10)) == name


def test_quantized_model_adds_only_quantizer_parameters():
    model = create_model("mobilenet_v2", num_classes=1000)
    floats = traverse_util.flatten_dict(abstract_variables(model)["params"])
    quantized = abstract_variables(families.quantize(model, "LSQ_paper"))
    params = traverse_util.flatten_dict(quantized["params"])
    added = {k for k in params if k not in floats}
    assert floats.keys() <= params.keys()
    assert {k[-1] for k in added} == {"weight_scale", "input_scale"}
    assert count([params[k] for k in added]) < 200  # per-tensor scales: one value each
    # Every conv and dense layer has its weight scale, next to its kernel (a ConvBN's at
    # <layer>/conv/kernel, the scale in the layer's scope).
    layers = {k[:-2] if k[-2] == "conv" else k[:-1] for k in floats if k[-1] == "kernel"}
    assert layers == {k[:-1] for k in added if k[-1] == "weight_scale"}
    assert len(layers) == 52 + 1
    assert set(quantized) == {"params", "batch_stats", "quant_stats", "oscillation"}


def test_mobilenet_v2_input_sizes():
    model = MobileNetV2(num_classes=1000)
    variables = abstract_variables(model)  # the variables do not depend on the input size
    for size in [(1, 32, 32, 3), (2, 224, 224, 3)]:
        x = jax.ShapeDtypeStruct(size, jnp.float32)
        out = jax.eval_shape(model.apply, variables, x)
        assert out.shape == (size[0], 1000) and out.dtype == jnp.float32


def test_small_input_setting_keeps_the_resolution_of_32x32_images_longer():
    x = jax.ShapeDtypeStruct(SMALL, jnp.float32)
    default = MobileNetV2(num_classes=10)
    small = MobileNetV2(num_classes=10, block_setting=families.mobilenet_v2.SMALL_INPUT_SETTING)
    # The same layers and parameters, fewer strides: more compute per image.
    assert jax.tree.structure(abstract_variables(small)) == jax.tree.structure(
        abstract_variables(default)
    )
    flops = [
        jax.jit(m.apply).lower(abstract_variables(m), x).cost_analysis()["flops"]
        for m in (default, small)
    ]
    assert flops[1] > 1.5 * flops[0]


def test_dtype_and_fold_bn_pass_through():
    model = MobileNetV2(num_classes=10, width_multiplier=0.25, dtype=jnp.bfloat16)
    folded = families.quantize(model, "LSQ_paper", fold_bn=True)
    variables = abstract_variables(folded)
    out, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        {k: variables[k] for k in ("params", "batch_stats")},
        jax.ShapeDtypeStruct(SMALL, jnp.float32),
    )
    assert out.dtype == jnp.bfloat16
    params = jax.tree.leaves(variables["params"])
    assert {str(p.dtype) for p in params} == {"float32"}  # parameters and scales stay float32
    # Folding keeps the unfolded layout, so checkpoints move between the two.
    unfolded = abstract_variables(families.quantize(model, "LSQ_paper"))
    assert jax.tree.structure(unfolded) == jax.tree.structure(variables)


def test_a_narrow_resnet_scales_every_stage_and_keeps_the_structure():
    full = abstract_variables(ResNet(depth=50, num_classes=10))["params"]
    narrow = abstract_variables(ResNet(depth=50, num_classes=10, width_multiplier=0.25))["params"]
    full_paths = jax.tree_util.tree_leaves_with_path(full)
    narrow_leaves = jax.tree_util.tree_leaves(narrow)
    assert len(full_paths) == len(narrow_leaves)  # the same layers
    assert narrow["conv1"]["conv"]["kernel"].shape == (7, 7, 3, 16)
    # Bottleneck widths 64 -> 16 (and its 4x expansion 256 -> 64), the last stage 512 -> 128.
    assert narrow["layer1_0"]["conv3"]["conv"]["kernel"].shape == (1, 1, 16, 64)
    assert narrow["layer4_2"]["conv2"]["conv"]["kernel"].shape == (3, 3, 128, 128)
    assert narrow["fc"]["kernel"].shape == (512, 10)
    assert count(narrow) < count(full) / 10


def test_depth_multiplier_deepens_efficientnet_lite():
    base = create_model("efficientnet_lite0", num_classes=10)
    deeper = create_model("efficientnet_lite4", num_classes=10)
    blocks = [
        sum(1 for k in abstract_variables(m)["params"] if k.startswith("blocks"))
        for m in (base, deeper)
    ]
    assert blocks[1] > blocks[0]


def test_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth must be 18 or 50, got 34."):
        abstract_variables(ResNet(depth=34))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(name="mobilenet_v4"),
            "Unknown model 'mobilenet_v4'; valid models are mobilenet_v2, ",
        ),
        (
            dict(name="mobilenet_v2", drop_rate=0.1),
            "mobilenet_v2 has no option drop_rate; its options are ",
        ),
        (
            dict(name="mobilenet_v2", quant_setup="LSQ"),
            "mobilenet_v2 has no option quant_setup; its options are ",
        ),
        (dict(name="mobilenet_v2", num_classes=0), "num_classes must be a positive int"),
        (
            dict(name="resnet18", width_multiplier=0),
            "width_multiplier must be a positive number, got 0",
        ),
        (
            dict(name="mobilenet_v2", width_multiplier=-0.5),
            "width_multiplier must be a positive number, got -0.5",
        ),
    ],
)
def test_create_model_errors(kwargs, match):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        create_model(**kwargs)
    assert str(info.value).endswith(".") and "\n" not in str(info.value)


def test_create_model_options():
    model = create_model(
        "efficientnet_lite2", num_classes=5, width_multiplier=0.5, dropout_rate=0.3
    )
    assert (model.variant, model.num_classes, model.width_multiplier) == ("lite2", 5, 0.5)
    assert model.dropout_rate == 0.3
