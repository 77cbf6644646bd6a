"""Tests of oscqat_jax.models: parameter counts, QAT steps of every family, shapes and registry.

Initialising a whole network under ``jit`` compiles one random-number kernel per parameter
(tens of seconds on a CPU), so the step tests take the variable layout from
``jax.eval_shape(model.init, ...)`` and fill it on the host; each family then compiles one
function holding a QAT forward/backward and an evaluation pass.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from oscqat_jax.models import MODELS, MobileNetV2, ResNet, create_model
from oscqat_jax.models.common import BlockConfig, global_pool
from oscqat_jax.nn import collect
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.setups import FLOAT_SETUP, QuantSetup

# XLA options that cut the CPU compile time of a QAT step about threefold (unoptimised code);
# these tests run each program once, so compiling dominates.
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
    "xla_llvm_disable_expensive_passes": True,
}
EVAL = QuantContext.create("eval")
TRAIN = QuantContext.create("train", freeze_threshold=0.0)
# Train calls without the 'dampening' collection must say so (the layers raise otherwise).
TRAIN_UNDAMPENED = QuantContext.create("train", freeze_threshold=0.0, dampen=False)
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
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x, EVAL)


def count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def host_variables(model, shape=SMALL, seed=0):
    """Variables of ``model`` filled on the host (NumPy arrays: no per-shape device kernels):
    He-normal kernels with weight scales covering them on a 4-bit grid, activation scales in
    [0.3, 0.7] (distinct, so sums of quantized tensors fall off every grid), unit BN, zero
    statistics and states."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        keys = [p.key for p in path]
        if leaf.dtype != jnp.float32:
            return np.zeros(leaf.shape, leaf.dtype)
        if keys[-1] == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * std).astype(np.float32)
        if keys[-1] == "var" or keys[-2:] == ["bn", "scale"]:
            return np.ones(leaf.shape, np.float32)
        if keys[-1].endswith("_scale"):
            return rng.uniform(0.3, 0.7, size=leaf.shape).astype(np.float32)
        return np.zeros(leaf.shape, np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, abstract_variables(model, shape))
    flat = traverse_util.flatten_dict(variables["params"])
    for key, scale in flat.items():
        if key[-1] == "weight_scale":
            flat[key] = np.full(scale.shape, np.abs(flat[(*key[:-1], "kernel")]).max() / 7)
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name):
    model = create_model(name, num_classes=1000, quant_setup=FLOAT_SETUP)
    assert count(abstract_variables(model, (1, 64, 64, 3))["params"]) == PARAM_COUNTS[name]


def test_registry_covers_the_counted_models():
    assert set(MODELS) == set(PARAM_COUNTS)


def test_quantized_model_adds_only_quantizer_parameters():
    params = abstract_variables(
        create_model("mobilenet_v2", num_classes=1000, quant_setup="LSQ_paper")
    )["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    quantizer = [p for p, _ in flat if p[-1].key.endswith(("_scale", "_zero_point"))]
    assert len(quantizer) == 53 * 2 - 1  # weight and input scale per layer; the image is float
    assert count(params) - len(quantizer) == PARAM_COUNTS["mobilenet_v2"]


def qat_step(model, mutable, variables, x, labels, rngs):
    """One QAT forward/backward (mode train) and an evaluation pass on the same variables."""

    ctx = TRAIN if "dampening" in mutable else TRAIN_UNDAMPENED

    def loss_fn(params):
        logits, updates = model.apply(
            {**variables, "params": params}, x, ctx, mutable=mutable, rngs=rngs
        )
        task = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return task + collect.dampening_total(updates), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    return loss, updates, grads, model.apply(variables, x, EVAL)


STATE = ("batch_stats", "oscillation")
FAMILIES = [
    # (model, setup, options, mutable): each family once, the setups spread over them; the
    # dampening terms (compile time) only for the paper's model.
    (
        "mobilenet_v2",
        "LSQ_paper",
        dict(width_multiplier=0.25, dropout_rate=0.2),
        (*STATE, "dampening"),
    ),
    pytest.param(
        "mobilenet_v3_small", "LSQ", dict(width_multiplier=0.25), STATE, marks=pytest.mark.slow
    ),
    pytest.param(
        "efficientnet_lite0", "fc4_dw8", dict(width_multiplier=0.25), STATE, marks=pytest.mark.slow
    ),
    pytest.param("resnet18", "all", dict(), STATE, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    "name, setup, options, mutable",
    FAMILIES,
    ids=["mobilenet_v2", "mobilenet_v3_small", "efficientnet_lite0", "resnet18"],
)
def test_qat_step_and_eval(name, setup, options, mutable):
    if name != "resnet18":
        options = dict(options, depthwise_impl="lax")  # compiles twice as fast as slices
    model = create_model(name, num_classes=10, quant_setup=setup, **options)
    variables = host_variables(model)
    x = jnp.asarray(np.random.default_rng(1).normal(size=SMALL), jnp.float32)
    labels = jnp.asarray([1, 7])
    rngs = {"dropout": jax.random.key(2)}
    step = jax.jit(qat_step, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
    # Checked on the host: eager jnp ops would compile a kernel per leaf shape.
    loss, updates, grads, logits = jax.device_get(step(model, mutable, variables, x, labels, rngs))

    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    kernels = [
        g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0] if path[-1].key == "kernel"
    ]
    assert sum(np.any(g != 0) for g in kernels) > len(kernels) // 2
    # Batch statistics and the oscillation tracking state moved (same layouts).
    assert any(np.any(m != 0) for m in jax.tree.leaves(updates["batch_stats"]))
    assert jax.tree.structure(updates["oscillation"]) == jax.tree.structure(
        variables["oscillation"]
    )
    before = jax.tree.leaves(variables["oscillation"])
    after = jax.tree.leaves(updates["oscillation"])
    assert before and any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    # Residual adds carry quantizers in every setup but LSQ_paper.
    blocks = variables["params"].values()
    assert any("residual_scale" in block for block in blocks) == (setup != "LSQ_paper")
    if "dampening" in mutable:  # one term per quantized weight, 8-bit ones included
        assert len(jax.tree.leaves(updates["dampening"])) == 53
    if name == "resnet18":
        # The pooled features are re-quantized with the last block's residual quantizer, so
        # its scale trains through both uses.
        assert float(grads["layer4_1"]["residual_scale"]) != 0


def test_mobilenet_v2_input_sizes():
    model = MobileNetV2(num_classes=1000)
    variables = abstract_variables(model)  # the variables do not depend on the input size
    for size in [(1, 32, 32, 3), (2, 224, 224, 3)]:
        x = jax.ShapeDtypeStruct(size, jnp.float32)
        out = jax.eval_shape(model.apply, variables, x, EVAL)
        assert out.shape == (size[0], 1000) and out.dtype == jnp.float32


def test_dtype_and_fold_bn_pass_through():
    model = MobileNetV2(num_classes=10, width_multiplier=0.25, dtype=jnp.bfloat16, fold_bn=True)
    variables = abstract_variables(model)
    out, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, TRAIN_UNDAMPENED, mutable=["batch_stats", "oscillation"]),
        variables,
        jax.ShapeDtypeStruct(SMALL, jnp.float32),
    )
    assert out.dtype == jnp.bfloat16
    # Folding keeps the unfolded layout, so checkpoints move between the two.
    unfolded = abstract_variables(model.clone(fold_bn=False))
    assert jax.tree.structure(unfolded) == jax.tree.structure(variables)


class _PoolAfterHead(nn.Module):
    """A conv head whose output quantizer also re-quantizes the pooled features."""

    quant_setup: QuantSetup

    @nn.compact
    def __call__(self, x, ctx):
        cfg = BlockConfig(self.quant_setup)
        head = cfg.conv_bn_act(self, "head", "head", 4, 1, activation=jax.nn.relu6)
        y = head(x, ctx)
        pooled = global_pool(
            self, cfg, y, ctx, source=head, source_quantizer="output", source_spec=head.output_quant
        )
        return y, pooled


def calibrate_then_eval(model, variables, x):
    _, calibrated = model.apply(variables, x, QuantContext.create("calibrate"), mutable=True)
    variables = {**variables, **calibrated}
    return variables, model.apply(variables, x, EVAL)


@pytest.mark.parametrize("setup, tied", [(QuantSetup(name="all"), True), (QuantSetup(), False)])
def test_pooling_is_requantized_on_the_tied_grid(setup, tied):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 5, 3)), jnp.float32)
    model = _PoolAfterHead(setup)
    run = jax.jit(calibrate_then_eval, static_argnums=0, compiler_options=FAST_COMPILE)
    variables, (y, pooled) = run(model, host_variables(model, x.shape), x)
    mean = jnp.mean(y, axis=(1, 2))
    if tied:
        scale = variables["params"]["head"]["output_scale"]
        assert not variables["quant_stats"]["head"]["output_signed"]  # post-ReLU6: unsigned grid
        np.testing.assert_allclose(pooled / scale, jnp.round(mean / scale), atol=1e-4)
        assert not np.allclose(pooled, mean)
    else:
        np.testing.assert_array_equal(pooled, mean)


def test_a_narrow_resnet_scales_every_stage_and_keeps_the_structure():
    full = abstract_variables(ResNet(depth=50, num_classes=10))["params"]
    narrow = abstract_variables(ResNet(depth=50, num_classes=10, width_multiplier=0.25))["params"]
    full_paths = jax.tree_util.tree_leaves_with_path(full)
    narrow_leaves = jax.tree_util.tree_leaves(narrow)
    assert len(full_paths) == len(narrow_leaves)  # the same layers
    assert narrow["conv1"]["kernel"].shape == (7, 7, 3, 16)
    # Bottleneck widths 64 -> 16 (and its 4x expansion 256 -> 64), the last stage 512 -> 128.
    assert narrow["layer1_0"]["conv3"]["kernel"].shape == (1, 1, 16, 64)
    assert narrow["layer4_2"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert narrow["fc"]["kernel"].shape == (512, 10)
    assert count(narrow) < count(full) / 10


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
        (dict(name="resnet18", width_multiplier=0.0), "width_multiplier must be positive"),
        (
            dict(name="mobilenet_v2", drop_rate=0.1),
            "mobilenet_v2 has no option drop_rate; its options are ",
        ),
        (dict(name="mobilenet_v2", quant_setup="fc8"), "quant_setup must be one of"),
        (dict(name="mobilenet_v2", num_classes=0), "num_classes must be a positive int"),
    ],
)
def test_create_model_errors(kwargs, match):
    kwargs = {"num_classes": 10, "quant_setup": "LSQ_paper", **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        create_model(**kwargs)
    assert str(info.value).endswith(".") and "\n" not in str(info.value)


def test_create_model_options():
    model = create_model(
        "efficientnet_lite2",
        num_classes=5,
        quant_setup="LSQ",
        width_multiplier=0.5,
        dropout_rate=0.3,
    )
    assert (model.variant, model.num_classes, model.width_multiplier) == ("lite2", 5, 0.5)
    assert model.quant_setup == QuantSetup(name="LSQ") and model.dropout_rate == 0.3
