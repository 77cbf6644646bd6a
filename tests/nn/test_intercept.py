"""``quantize_model`` on small plain Flax models: where the variables land, the arithmetic of
each intercepted layer against the functional core (``quant.fake_quant``), the modes, the
dampening term, the activation hook, the errors, and a step that compiles once while the
freezing threshold changes. The MobileNetV2 parity with the package's own layers is in
``test_intercept_parity.py``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oscqat_jax import dampening, quant
from oscqat_jax.nn import depthwise
from oscqat_jax.nn.intercept import ActQuant, QuantAux, quantize_model
from oscqat_jax.nn.rules import QuantRule

W4A4 = (QuantRule(".*", weight_bits=4, act_bits=4),)


def randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def fixed(seed):
    """A fixed pseudo-random initializer (NumPy: no jax.random compile per shape)."""
    return lambda key, shape, dtype=jnp.float32: randn(seed, shape, 0.5).astype(dtype)


class Net(nn.Module):
    """conv -> BN -> relu -> hook -> depth-wise conv -> mean -> dense -> hook."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3), padding=1, use_bias=False, kernel_init=fixed(1), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = ActQuant(name="act")(nn.relu(x))
        x = nn.Conv(6, (3, 3), padding=1, feature_group_count=6, kernel_init=fixed(2), name="dw")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(3, kernel_init=fixed(3), name="fc")(x)
        return ActQuant(name="logits")(x)


X = randn(0, (2, 6, 6, 3))


@pytest.fixture(scope="module")
def net():
    model = quantize_model(Net(), (QuantRule("logits", output_bits=6), *W4A4))
    variables = jax.jit(model.init)(jax.random.key(0), X)
    return model, variables


@pytest.fixture(scope="module")
def calibrated(net):
    """``net`` after calibration on ``X``: train and eval calls need calibrated quantizers."""
    model, variables = net
    return model, model.calibrate(variables, [X], train=False)


def shapes(tree):
    return jax.tree_util.tree_map(jnp.shape, tree)


def test_variables_land_in_each_layers_scope_with_the_package_names(net):
    model, variables = net
    params = shapes(variables["params"])
    assert params["conv"] == {"kernel": (3, 3, 3, 6), "weight_scale": (), "input_scale": ()}
    assert params["dw"] == {
        "kernel": (3, 3, 1, 6),
        "bias": (6,),
        "weight_scale": (),
        "input_scale": (),
    }
    assert params["fc"] == {"kernel": (6, 3), "bias": (3,), "weight_scale": (), "input_scale": ()}
    assert params["bn"] == {"scale": (6,), "bias": (6,)}
    # The hook named by W4A4's ".*" has output_bits=None, so it stays float and adds nothing.
    assert "act" not in params and params["logits"] == {"output_scale": ()}
    assert set(variables["quant_stats"]) == {"conv", "dw", "fc", "logits"}
    assert variables["quant_stats"]["logits"] == {"output_signed": True}
    assert set(variables["oscillation"]) == {"conv", "dw", "fc"}
    assert set(variables["oscillation"]["conv"]) == {
        "prev_int",
        "prev_dir",
        "ema_osc",
        "ema_int",
        "frozen",
        "frozen_int",
        "freezing_started",
    }
    # The weight scale starts at the kernel's min-max (as the package's layers).
    kernel = variables["params"]["conv"]["kernel"]
    assert variables["params"]["conv"]["weight_scale"] == pytest.approx(
        float(jnp.max(jnp.abs(kernel))) / 7, rel=1e-6
    )
    plan = model.plan(X)
    assert sorted(plan) == ["conv", "dw", "fc", "logits"]
    assert plan["logits"].output.n_bits == 6 and not plan["logits"].weight.enabled
    assert plan["conv"].weight.n_bits == 4 and plan["conv"].track_oscillations


def with_scales(variables, **scales):
    """``variables`` with the given scales and every activation grid signed, as the core
    computations below assume."""
    params = {k: dict(v) for k, v in variables["params"].items()}
    for name, value in scales.items():
        layer, leaf = name.split("__")
        params[layer][leaf] = jnp.asarray(value, jnp.float32)
    stats = {
        layer: {k: (jnp.asarray(True) if k.endswith("_signed") else v) for k, v in leaves.items()}
        for layer, leaves in variables["quant_stats"].items()
    }
    return {**variables, "params": params, "quant_stats": stats}


def test_eval_matches_the_functional_core_layer_by_layer(calibrated):
    model, variables = calibrated
    variables = with_scales(
        variables,
        conv__input_scale=0.25,
        dw__input_scale=0.1,
        dw__weight_scale=0.15,
        fc__input_scale=0.05,
        logits__output_scale=0.02,
    )
    p = variables["params"]
    fq = lambda x, s, bits=4: quant.fake_quant(x, s, None, n_bits=bits, signed=True)  # noqa: E731
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = conv(fq(X, 0.25), fq(p["conv"]["kernel"], p["conv"]["weight_scale"]))
    y = nn.BatchNorm(use_running_average=True).apply(
        {"params": p["bn"], "batch_stats": variables["batch_stats"]["bn"]}, y
    )
    y = jax.nn.relu(y)
    # The quantized depth-wise conv takes the package's depth-wise path (shifted slices on
    # CPU); the same function here keeps the summation order, so the 6-bit logits agree.
    y_dw = depthwise.depthwise_conv(
        fq(y, 0.1), fq(p["dw"]["kernel"], 0.15), padding=((1, 1), (1, 1))
    )
    y = y_dw + p["dw"]["bias"]
    y = jnp.mean(y, axis=(1, 2))
    y = fq(y, 0.05) @ fq(p["fc"]["kernel"], p["fc"]["weight_scale"]) + p["fc"]["bias"]
    want = fq(y, 0.02, bits=6)
    np.testing.assert_allclose(model.apply(variables, X), want, rtol=1e-6, atol=1e-7)
    # Float mode is the user's model, untouched.
    plain = Net().apply({k: v for k, v in variables.items() if k in ("params", "batch_stats")}, X)
    np.testing.assert_array_equal(model.apply(variables, X, mode="float"), plain)
    assert np.max(np.abs(model.apply(variables, X) - plain)) > 1e-3


class Layers(nn.Module):
    """One of each intercepted layer type, each with a fixed kernel."""

    @nn.compact
    def __call__(self, x):
        a = nn.DenseGeneral((2, 3), kernel_init=fixed(4), name="dense_general")(
            x
        )  # (N, 4)->(N,2,3)
        b = nn.Einsum((4, 5), "nc,cf->nf", kernel_init=fixed(5), name="einsum")(x)
        c = nn.ConvTranspose(2, (3,), kernel_init=fixed(6), name="conv_t")(x[:, :, None])
        return a, b, c


def test_dense_general_einsum_and_conv_transpose_quantize_kernel_and_input():
    x = randn(7, (2, 4))
    model = quantize_model(Layers(), W4A4)
    variables = model.calibrate(jax.jit(model.init)(jax.random.key(0), x), [x])
    variables = with_scales(
        variables, dense_general__input_scale=0.2, einsum__input_scale=0.3, conv_t__input_scale=0.4
    )
    got = model.apply(variables, x)

    def quantized(name):
        p = dict(variables["params"][name])
        p["kernel"] = quant.fake_quant(
            p["kernel"], p.pop("weight_scale"), None, n_bits=4, signed=True
        )
        del p["input_scale"]
        return {"params": p}

    xq = lambda s: quant.fake_quant(x, s, None, n_bits=4, signed=True)  # noqa: E731
    want_a = nn.DenseGeneral((2, 3)).apply(quantized("dense_general"), xq(0.2))
    want_b = nn.Einsum((4, 5), "nc,cf->nf").apply(quantized("einsum"), xq(0.3))
    want_c = nn.ConvTranspose(2, (3,)).apply(quantized("conv_t"), xq(0.4)[:, :, None])
    for g, w in zip(got, (want_a, want_b, want_c), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert shapes(variables["oscillation"]["dense_general"]["frozen"]) == (4, 2, 3)


def test_per_channel_scales_and_layers_that_cannot_take_them():
    rules = (QuantRule(".*", weight_bits=4, act_bits=None, per_channel=True),)
    x = randn(8, (2, 4))
    dense = quantize_model(nn.Dense(5), rules)
    variables = dense.init(jax.random.key(0), x)
    assert variables["params"]["weight_scale"].shape == (1, 5)
    with pytest.raises(
        ValueError, match="no fixed output-channel axis; give it a rule with per_channel=False"
    ):
        quantize_model(nn.Einsum((4, 5), "nc,cf->nf"), rules).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="several output-feature axes"):
        quantize_model(nn.DenseGeneral((2, 3)), rules).init(jax.random.key(0), x)


def test_train_mode_returns_the_dampening_sum_and_never_the_dampening_collection(calibrated):
    model, variables = calibrated
    out, aux = model.apply(variables, X, mode="train", train=True, mutable=["batch_stats"])
    assert isinstance(aux, QuantAux)
    assert set(aux.updates) == {"oscillation", "batch_stats"}
    p = variables["params"]
    want = sum(
        dampening.dampening_loss(p[n]["kernel"], p[n]["weight_scale"], None, n_bits=4, signed=True)
        for n in ("conv", "dw", "fc")
    )
    np.testing.assert_allclose(aux.dampening, want, rtol=1e-6)
    # Feeding back a "dampening" collection (the {**variables, **mutated} habit) changes
    # nothing: it is dropped on the way in.
    fed_back = {**variables, **aux.updates, "dampening": {"conv": {"kernel": (jnp.ones(()),)}}}
    _, again = model.apply(fed_back, X, mode="train", train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(again.dampening, aux.dampening, rtol=1e-6)


def test_train_without_the_oscillation_collection_raises(net):
    model, variables = net
    without = {k: v for k, v in variables.items() if k != "oscillation"}
    with pytest.raises(
        ValueError, match="Layer conv tracks oscillations but the variables have no 'oscillation'"
    ):
        model.apply(without, X, mode="train", train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="mode must be one of eval, train, float"):
        model.apply(variables, X, mode="calibrate")


def test_calibrate_sets_scales_from_data_and_needs_a_batch(net):
    model, variables = net
    calibrated = model.calibrate(variables, [X, 2 * X], train=False)
    for name in ("conv", "dw", "fc"):
        assert "input_range" in calibrated["quant_stats"][name]
        assert "weight_range" in calibrated["quant_stats"][name]
    # The image is signed, the post-ReLU activation feeding the depth-wise conv is not.
    assert bool(calibrated["quant_stats"]["conv"]["input_signed"])
    assert not bool(calibrated["quant_stats"]["dw"]["input_signed"])
    assert float(calibrated["params"]["conv"]["input_scale"]) != 1.0
    np.testing.assert_array_equal(
        calibrated["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"]
    )
    with pytest.raises(ValueError, match="at least one batch"):
        model.calibrate(variables, [])


def test_calibrate_compiles_with_the_compiler_options_it_is_given(net):
    """The training program's ``train.fast_compile`` options reach calibration's compiles:
    XLA rejects an option it does not know, which it can only do if the option is passed."""
    model, variables = net
    with pytest.raises(Exception, match="xla_no_such_option"):
        model.calibrate(variables, [X], compiler_options={"xla_no_such_option": True}, train=False)
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    got = model.calibrate(variables, [X], compiler_options=fast, train=False)
    want = model.calibrate(variables, [X], train=False)
    np.testing.assert_allclose(
        got["params"]["conv"]["weight_scale"], want["params"]["conv"]["weight_scale"], rtol=1e-5
    )


def test_a_user_step_compiles_once_while_the_freezing_threshold_changes(calibrated):
    model, variables = calibrated
    traces = []

    @jax.jit
    def step(variables, freeze_threshold, dampening_weight):
        traces.append(1)

        def loss_fn(params):
            out, aux = model.apply(
                {**variables, "params": params},
                X,
                mode="train",
                train=True,
                mutable=["batch_stats"],
                freeze_threshold=freeze_threshold,
                osc_momentum=0.1,
            )
            return jnp.sum(out**2) + dampening_weight * aux.dampening, aux

        grads, aux = jax.grad(loss_fn, has_aux=True)(variables["params"])
        params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, variables["params"], grads)
        return {**variables, **aux.updates, "params": params}

    # Every weight has oscillated often (ema_osc 0.9): its frequency stays above 0.3 for a few
    # steps, so it freezes at the first step whose threshold is 0.3, and not before: the
    # threshold reaches the compiled step as a value, not as a constant traced once.
    history = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.full_like(leaf, 0.9) if path[-1].key == "ema_osc" else leaf,
        variables["oscillation"],
    )
    variables = {**variables, "oscillation": history}
    frozen = []
    for i, f_th in enumerate((0.0, 0.0, 0.3, 0.2)):
        variables = step(variables, jnp.float32(f_th), jnp.float32(0.01 * i))
        frozen.append(np.mean([np.mean(v["frozen"]) for v in variables["oscillation"].values()]))
    assert len(traces) == 1 and step._cache_size() == 1
    assert frozen == [0.0, 0.0, 1.0, 1.0]
