"""The NNX path (``oscqat_jax.nn.nnx_quant``) is the same method as the Linen rules path.

One small network (stem conv, BN, ReLU, a depth-wise/point-wise residual branch, global mean
pooling, a dense classifier) is written twice here: with plain ``flax.linen`` layers, quantized
by ``intercept.quantize_model``, and with plain ``flax.nnx`` layers, quantized by
``quantize_nnx``; both get the same weights and the same rules. The rules mix what a rule can
say: an 8-bit untracked stem with a float input, a 3-bit asymmetric depth-wise kernel (its own
rule), 4-bit per-channel point-wise weights, an 8-bit classifier with an asymmetric running
min-max input. After calibrating both on the same batches, the quantized eval logits, the
scales and learnt signedness, and at every one of several SGD steps the logits, the loss with
its dampening term and the gradients for every parameter (kernels, biases, BN, weight and
input scales and zero points), then the oscillation / freezing state and BN statistics must
agree (float32, <= 1e-6 relative; measured: bit-identical). Negative controls: rules that
miss a layer break that parity, and a frozen weight stays at its frozen integer.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oscqat_jax import oscillation
from oscqat_jax.nn import depthwise, nnx_quant
from oscqat_jax.nn.intercept import quantize_model
from oscqat_jax.nn.nnx_quant import Oscillation, QuantStats, dampening_term, set_mode
from oscqat_jax.nn.rules import QuantRule

FEATURES = 8
CLASSES = 5
BN = dict(momentum=0.9, epsilon=1e-5)
LR = 0.5  # weights: large, so integers move and oscillate within a few steps
SCALE_LR = 1e-4  # quantizer scales and zero points (a large step would push a scale below 0)
DAMPENING_WEIGHT = 0.1
OSC_MOMENTUM = 0.3
THRESHOLDS = (0.0, 0.0, 0.05, 0.05, 0.05, 0.02)  # f_th per step: freezing starts at step 2
RTOL = 1e-6
LAYERS = ("stem", "dw", "pw", "head")
BNS = ("stem_bn", "dw_bn")

RULES = (
    QuantRule(
        "head", weight_bits=8, act_bits=8, act_symmetric=False, act_range_method="running_minmax"
    ),
    QuantRule("stem", weight_bits=8, act_bits=None, per_channel=True),
    QuantRule(".*", depthwise=True, weight_bits=3, act_bits=4, weight_symmetric=False),
    QuantRule(".*", weight_bits=4, act_bits=4, per_channel=True),
)
CALIBRATION = (1, 2)  # seeds of the calibration batches

# Two more option sets, so that every value of every rule field and call setting appears in
# one of the three cases compared below (the first is RULES with the recipes' settings).
RULES_B = (
    QuantRule("head", weight_bits=8, act_bits=8, grad_scale=True),
    QuantRule(
        ".*",
        weight_bits=4,
        act_bits=4,
        weight_symmetric=False,
        weight_range_method="current_minmax",
        act_range_method="running_minmax",
        grad_scale=True,
    ),
)
RULES_C = (
    QuantRule("head", weight_bits=4, act_bits=4, max_bits=3),  # 4 > 3 bits: not tracked
    QuantRule(".*", depthwise=True, weight_bits=4, act_bits=4, track=False, dampen=False),
    QuantRule(
        ".*",
        depthwise=False,
        weight_bits=4,
        act_bits=4,
        per_channel=True,
        weight_range_method="running_minmax",
        act_symmetric=False,
        act_range_method="current_minmax",
    ),
)
CASES = {
    "mixed": (RULES, dict(use_ema_freeze=True, dampening_aggregation="kernel_mean")),
    "asymmetric_instant_freeze": (
        RULES_B,
        dict(use_ema_freeze=False, dampening_aggregation="sum"),
    ),
    "untracked_layers": (RULES_C, dict(use_ema_freeze=True, dampening_aggregation="mean")),
}
TRACKED = {"mixed": {"dw", "pw"}, "asymmetric_instant_freeze": {"stem", "dw", "pw"}}
TRACKED["untracked_layers"] = {"stem", "pw"}


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(FEATURES, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn", **BN)(x))
        y = nn.Conv(FEATURES, (3, 3), feature_group_count=FEATURES, use_bias=False, name="dw")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, name="dw_bn", **BN)(y))
        x = x + nn.Conv(FEATURES, (1, 1), name="pw")(y)
        return nn.Dense(CLASSES, name="head")(jnp.mean(x, axis=(1, 2)))


def _init(key, shape, dtype=jnp.float32):
    """A fixed pseudo-random kernel or bias from NumPy (jax.random compiles per shape on CPU)."""
    del key
    rng = np.random.default_rng(sum(shape) + len(shape))
    return jnp.asarray(0.4 * rng.standard_normal(shape), dtype)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = dict(kernel_init=_init, bias_init=_init, rngs=rngs)
        self.stem = nnx.Conv(3, FEATURES, (3, 3), use_bias=False, **init)
        self.stem_bn = nnx.BatchNorm(FEATURES, rngs=rngs, **BN)
        self.dw = nnx.Conv(
            FEATURES, FEATURES, (3, 3), feature_group_count=FEATURES, use_bias=False, **init
        )
        self.dw_bn = nnx.BatchNorm(FEATURES, rngs=rngs, **BN)
        self.pw = nnx.Conv(FEATURES, FEATURES, (1, 1), **init)
        self.head = nnx.Linear(FEATURES, CLASSES, **init)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        y = nnx.relu(self.dw_bn(self.dw(x)))
        x = x + self.pw(y)
        return self.head(jnp.mean(x, axis=(1, 2)))


def _batch(seed: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((4, 6, 6, 3)), jnp.float32)
    return x, jnp.asarray(rng.integers(0, CLASSES, 4))


def _nnx_model() -> NNXNet:
    model = NNXNet(nnx.Rngs(0))
    # Non-trivial BN parameters so that a swapped scale/bias or mean/var would show.
    channels = np.arange(FEATURES, dtype=np.float32)
    for i, name in enumerate(BNS):
        bn = getattr(model, name)
        bn.scale[...] = jnp.asarray(1.0 + 0.1 * channels / (i + 1))
        bn.bias[...] = jnp.asarray(0.05 * channels - 0.1)
    return model


def _linen_variables(qm, model: NNXNet) -> dict:
    """Linen variables from ``qm.init``, with every float weight taken from the NNX ``model``."""
    init = jax.jit(lambda key, x: qm.init(key, x, train=False))
    variables = jax.tree.map(lambda a: a, init(jax.random.key(0), _batch(0)[0]))
    for name in LAYERS:
        layer = getattr(model, name)
        variables["params"][name]["kernel"] = layer.kernel[...]
        if layer.bias is not None:
            variables["params"][name]["bias"] = layer.bias[...]
    for name in BNS:
        bn = getattr(model, name)
        variables["params"][name] = {"scale": bn.scale[...], "bias": bn.bias[...]}
        variables["batch_stats"][name] = {"mean": bn.mean[...], "var": bn.var[...]}
    return variables


def _ce(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def _sgd(params: dict, grads: dict) -> dict:
    """Plain SGD on nested dicts: LR for weights, SCALE_LR for quantizer parameters."""

    def update(path, p, g):
        name = path[-1].key
        return p - (SCALE_LR if name.endswith(("_scale", "_zero_point")) else LR) * g

    return jax.tree_util.tree_map_with_path(update, params, grads)


def _linen_step(qm, settings):
    @jax.jit
    def step(variables, x, labels, freeze_threshold):
        def loss_fn(params):
            logits, aux = qm.apply(
                {**variables, "params": params},
                x,
                train=True,
                mode="train",
                freeze_threshold=freeze_threshold,
                osc_momentum=OSC_MOMENTUM,
                mutable=["batch_stats"],
                **settings,
            )
            loss = _ce(logits, labels) + DAMPENING_WEIGHT * aux.dampening
            return loss, (logits, aux)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, aux)), grads = grad_fn(variables["params"])
        params = _sgd(variables["params"], grads)
        new = {**variables, **aux.updates, "params": params}
        return new, dict(loss=loss, logits=logits, dampening=aux.dampening, grads=grads)

    return step


NNX_TRACES = []  # one entry per compile of _nnx_step


@nnx.jit
def _nnx_step(model, x, labels, dampening_weight):
    """One SGD step of the quantized NNX net (the update of ``_linen_step``)."""
    NNX_TRACES.append(1)

    def loss_fn(model):
        logits = model(x)
        damp = dampening_term(model)
        return _ce(logits, labels) + dampening_weight * damp, (logits, damp)

    (loss, (logits, damp)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    params = nnx.state(model, nnx.Param)
    grads = nnx.to_pure_dict(grads)
    nnx.replace_by_pure_dict(params, _sgd(nnx.to_pure_dict(params), grads))
    nnx.update(model, params)
    return dict(loss=loss, logits=logits, dampening=damp, grads=grads)


_nnx_eval = nnx.jit(lambda model, x: model(x))


def _train_nnx(
    model, step_index: int, threshold: float, dampening_weight=DAMPENING_WEIGHT, settings=None
):
    settings = settings or {}
    set_mode(model, "train", freeze_threshold=threshold, osc_momentum=OSC_MOMENTUM, **settings)
    return _nnx_step(model, *_batch(10 + step_index), jnp.float32(dampening_weight))


def _calibrated_nnx(rules=RULES) -> NNXNet:
    model = nnx_quant.quantize_nnx(_nnx_model(), rules)
    return nnx_quant.calibrate_nnx(model, [_batch(seed)[0] for seed in CALIBRATION])


@functools.cache
def _run_both(case: str = "mixed"):
    """Calibrates, evaluates and trains the Linen and NNX nets side by side with the rules
    and settings of ``CASES[case]`` (cached: the compiles are most of this file's time).
    Returns the trained NNX model, the Linen variables, the eval logits after calibration
    ``(nnx, linen)`` and, per step, ``(nnx results, linen results)``."""
    rules, settings = CASES[case]
    model = _nnx_model()
    # Both sides convolve the quantized depth-wise conv the same way (shifted slices on CPU).
    qm = quantize_model(LinenNet(), rules)
    variables = _linen_variables(qm, model)
    nnx_quant.quantize_nnx(model, rules)
    calib = [_batch(seed)[0] for seed in CALIBRATION]
    variables = qm.calibrate(variables, calib, train=False)
    nnx_quant.calibrate_nnx(model, calib)
    x = _batch(5)[0]
    linen_eval = jax.jit(lambda v, x: qm.apply(v, x, train=False, mode="eval"))(variables, x)
    evals = (_nnx_eval(model, x), linen_eval)
    model.train()
    step = _linen_step(qm, settings)
    results = []
    for i, threshold in enumerate(THRESHOLDS):
        out_n = _train_nnx(model, i, threshold, settings=settings)
        variables, out_l = step(variables, *_batch(10 + i), jnp.float32(threshold))
        results.append((out_n, out_l))
    return model, variables, evals, results


def _rel(a, b) -> float:
    """Largest |a - b| relative to the largest |b| (0 for two zero arrays)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compare(tag, nnx_tree, linen_tree, report) -> None:
    """Asserts two pytrees have the same leaves, each within RTOL; records the differences."""
    flat_n = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(nnx_tree)}
    flat_l = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(linen_tree)
    }
    assert set(flat_n) == set(flat_l), f"{tag}: different leaves"
    for name, value in flat_n.items():
        rel = _rel(value, flat_l[name])
        report[f"{tag}{name}"] = rel
        assert rel <= RTOL, f"{tag}{name}: relative difference {rel:.3g}"


def _osc_tree(model):
    return nnx.to_pure_dict(nnx.state(model, Oscillation))


def _signed(stats: dict) -> dict:
    return {
        k: {f: bool(v) for f, v in d.items() if f.endswith("_signed")} for k, d in stats.items()
    }


@pytest.mark.parametrize(
    "case",
    [
        "mixed",
        "asymmetric_instant_freeze",
        pytest.param("untracked_layers", marks=pytest.mark.slow),
    ],
)
def test_nnx_matches_linen_calibration_logits_grads_and_freezing(case):
    report = {}
    model, variables, evals, results = _run_both(case)
    assert set(nnx_quant.quantized_modules(model)) == set(LAYERS)
    _compare("eval_logits", *evals, report)
    for i, (out_n, out_l) in enumerate(results):
        for key in ("loss", "logits", "dampening"):
            _compare(f"step{i}/{key}", out_n[key], out_l[key], report)
        _compare(f"step{i}/grad", out_n["grads"], out_l["grads"], report)
        assert float(out_n["dampening"]) > 0
    # After training: every parameter (scales and zero points included), signedness,
    # oscillation state and BN statistics.
    _compare("params", nnx.to_pure_dict(nnx.state(model, nnx.Param)), variables["params"], report)
    assert _signed(nnx.to_pure_dict(nnx.state(model, QuantStats))) == _signed(
        variables["quant_stats"]
    )
    _compare("oscillation", _osc_tree(model), variables["oscillation"], report)
    bn = {n: {"mean": getattr(model, n).mean[...], "var": getattr(model, n).var[...]} for n in BNS}
    _compare("batch_stats", bn, variables["batch_stats"], report)
    # The schedule freezes weights in the tracked layers: the state compared is not trivial.
    frozen = {name: int(np.sum(v["frozen"])) for name, v in _osc_tree(model).items()}
    assert set(frozen) == TRACKED[case] and max(frozen.values()) > 0
    worst = max(report, key=report.get)
    print(f"\n{len(report)} comparisons; worst {worst}: {report[worst]:.3g}; frozen {frozen}")


def test_rules_that_miss_a_layer_break_parity():
    """Negative control: the NNX net without its point-wise conv quantized must not match."""
    _, _, (_, linen_eval), _ = _run_both()
    miss = (QuantRule("pw", weight_bits=None, act_bits=None), *RULES)
    model = _calibrated_nnx(miss)
    assert "pw" not in nnx_quant.quantized_modules(model)
    assert _rel(_nnx_eval(model, _batch(5)[0]), linen_eval) > 1e-3


def test_oscillation_state_is_exactly_the_tracking_state():
    _, linen, _, _ = _run_both()
    model = nnx_quant.quantize_nnx(_nnx_model(), RULES)
    selected = _osc_tree(model)
    fields = set(oscillation.OscillationState._fields)
    assert {k: set(v) for k, v in selected.items()} == {
        k: set(v) for k, v in linen["oscillation"].items()
    }
    assert set(selected) == {"dw", "pw"} and all(set(v) == fields for v in selected.values())
    # Nothing else is in it, and the Param filter does not pick it up.
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert not any(fields & set(v) for v in params.values() if isinstance(v, dict))
    assert selected["pw"]["prev_int"].shape == model.pw.kernel.shape


def test_train_step_compiles_once_while_the_threshold_changes():
    model = _calibrated_nnx()
    model.train()
    _train_nnx(model, 0, 0.0)
    compiled = len(NNX_TRACES)
    for i, threshold in enumerate((0.02, 0.01, 0.005)):
        _train_nnx(model, 1 + i, threshold, dampening_weight=0.05 * i)
    assert len(NNX_TRACES) == compiled
    assert float(model.pw.freeze_threshold[...]) == np.float32(0.005)
    # The counter does see a new program: another mode is another compile.
    set_mode(model, "float")
    _nnx_step(model, *_batch(3), jnp.float32(0.0))
    assert len(NNX_TRACES) == compiled + 1


def test_frozen_weight_stays_at_its_frozen_integer():
    """Entries frozen at an integer one step away from their rounding keep it through
    training: the forward uses it, and the task loss gives them no gradient."""
    model = _calibrated_nnx()
    model.train()
    pw = model.pw
    scale = pw.weight_scale[...]
    rounded = jnp.clip(jnp.round(pw.kernel[...] / scale), -8, 7)
    frozen = np.zeros(rounded.shape, bool)
    frozen[0, 0, :4, :] = True
    target = jnp.where(rounded < 7, rounded + 1, rounded - 1)
    pw.frozen[...] = jnp.asarray(frozen)
    pw.frozen_int[...] = jnp.where(frozen, target, 0.0)
    for i in range(3):
        grads = _train_nnx(model, i, 0.0, dampening_weight=0.0)["grads"]
        g = np.asarray(grads["pw"]["kernel"])
        assert np.all(g[frozen] == 0) and np.any(g[~frozen] != 0)
        np.testing.assert_array_equal(pw.prev_int[...][frozen], target[frozen])
        assert np.all(pw.frozen[...][frozen])
        # Move the latent weights a lot: the frozen integers must not follow.
        pw.kernel[...] = pw.kernel[...] + 0.5 * pw.weight_scale[...]
    latent = jnp.clip(jnp.round(pw.kernel[...] / pw.weight_scale[...]), -8, 7)
    assert np.any(latent[frozen] != target[frozen])


def test_float_mode_is_the_float_model_and_dampening_does_not_accumulate():
    x = _batch(5)[0]
    model = _nnx_model()
    model.eval()
    float_logits = _nnx_eval(model, x)
    model = _calibrated_nnx()
    set_mode(model, "float")
    np.testing.assert_array_equal(_nnx_eval(model, x), float_logits)
    assert float(dampening_term(model)) == 0.0
    set_mode(model, "eval")
    assert _rel(_nnx_eval(model, x), float_logits) > 1e-3  # quantization is on again
    set_mode(model, "train")
    _nnx_eval(model, x)
    first = float(dampening_term(model))
    _nnx_eval(model, x)
    assert first > 0 and float(dampening_term(model)) == pytest.approx(first, rel=1e-6)


def test_bad_input_errors():
    model = _nnx_model()
    with pytest.raises(ValueError, match="matches no site of the model.*stem"):
        nnx_quant.quantize_nnx(model, [QuantRule("nothing_here")])
    with pytest.raises(ValueError, match="QuantRule"):
        nnx_quant.quantize_nnx(model, ["stem"])
    with pytest.raises(ValueError, match="quantize_nnx"):
        set_mode(model, "train")
    nnx_quant.quantize_nnx(model, RULES)
    with pytest.raises(ValueError, match="already has quantized layers"):
        nnx_quant.quantize_nnx(model, RULES)
    with pytest.raises(ValueError, match="mode must be one of"):
        set_mode(model, "float_train")
    with pytest.raises(ValueError, match="flax.nnx Module"):
        nnx_quant.quantize_nnx(LinenNet(), RULES)


def _grouped_convs(model, x) -> int:
    """How many grouped (feature_group_count > 1) convolutions the forward traces."""
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(x))(state)
    return str(jaxpr).count(f"feature_group_count={FEATURES}")


def test_quantized_depthwise_convs_take_the_fast_path_and_exports_the_grouped_one():
    x = _batch(5)[0]
    for impl, grouped in (("auto", 0), ("shifted", 0), ("lax", 1)):
        model = nnx_quant.quantize_nnx(_nnx_model(), RULES, depthwise_impl=impl)
        nnx_quant.calibrate_nnx(model, [x])
        assert _grouped_convs(model, x) == grouped, impl
        with depthwise.exporting():
            assert _grouped_convs(model, x) == 1  # what an export traces
        logits = _nnx_eval(model, x)
        if impl == "auto":
            fast = logits
    np.testing.assert_allclose(fast, logits, rtol=1e-5, atol=1e-5)  # summation order only
    set_mode(model, "float")
    assert _grouped_convs(model, x) == 1  # the float model is the user's, untouched
    with pytest.raises(ValueError, match="depthwise_impl must be one of"):
        nnx_quant.quantize_nnx(_nnx_model(), RULES, depthwise_impl="fast")


class _ListNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = dict(kernel_init=_init, bias_init=_init, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(3, 4, **init), nnx.Linear(4, 4, **init)])
        self.seq = nnx.Sequential(nnx.Linear(4, 2, **init))
        self.act = nnx_quant.ActQuant()

    def __call__(self, x):
        x = self.act(nnx.relu(self.layers[1](self.layers[0](x))))
        return self.seq(x)


def test_paths_in_lists_and_sequential_depthwise_filter_and_hooks():
    rules = (
        QuantRule("layers/0", weight_bits=3, act_bits=None),
        QuantRule("act", output_bits=8),
        # A Linear is never depth-wise: this rule may match nothing.
        QuantRule(".*", depthwise=True, weight_bits=2, sites="any"),
        QuantRule("seq/.*", weight_bits=4, act_bits=4, act_symmetric=False),
    )
    model = _ListNet(nnx.Rngs(0))
    plan = nnx_quant.plan_nnx(model, rules)
    assert set(plan) == {"layers/0", "act", "seq/layers/0"}
    assert plan["layers/0"].weight.n_bits == 3 and not plan["layers/0"].input.enabled
    assert plan["act"].output.n_bits == 8 and plan["seq/layers/0"].weight.n_bits == 4
    kernel = model.layers[0].kernel
    nnx_quant.quantize_nnx(model, rules)
    assert isinstance(model.layers[0], nnx_quant.QuantizedLayer)
    assert isinstance(model.layers[1], nnx.Linear)  # no rule: stays float
    assert isinstance(model.seq.layers[0], nnx_quant.QuantizedLayer)
    assert isinstance(model.act, nnx_quant.QuantizedActivation)
    assert model.layers[0].kernel is kernel  # the user's Param object is kept
    assert hasattr(model.seq.layers[0], "input_zero_point")
    x = _batch(6)[0].reshape(-1, 3)
    nnx_quant.calibrate_nnx(model, [x])
    # The hook's value lies on its 8-bit grid, unsigned after a ReLU.
    hidden = nnx.relu(model.layers[1](model.layers[0](x)))
    assert not bool(model.act.output_signed[...])
    on_grid = model.act(hidden) / model.act.output_scale[...]
    np.testing.assert_allclose(on_grid, np.round(on_grid), atol=1e-4)
    assert float(jnp.max(on_grid)) <= 255 and float(jnp.min(on_grid)) >= 0
