"""Layers called more than once per step: tied and looped layers, ``nn.remat`` and ``nn.scan``
(Linen), tied and looped layers and ``nnx.remat`` (NNX), and stacked NNX layers, which are
refused.

A repeated call quantizes its input with the layer's one input quantizer (calibration sees
every call) and its kernel with the same integers; its tracking advances and its dampening
term counts only once per step. How a test tells "once" from "twice": the oscillation state
is set so that the first update of the step records an oscillation in every entry
(``prev_int = w_int + 1`` with ``prev_dir = -1``); a second update in the same step would see
no change and decay the EMA, so ``ema_osc`` is exactly the momentum after one update and
``(1 - m) * m`` after two.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oscqat_jax import dampening
from oscqat_jax.nn import nnx_quant
from oscqat_jax.nn.intercept import ActQuant, quantize_model
from oscqat_jax.nn.rules import QuantRule

M = 0.25  # EMA momentum of the train calls
RULES = (
    QuantRule("act", output_bits=4, sites="any"),
    QuantRule(".*", weight_bits=4, act_bits=4),
)


def randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def fixed(seed):
    return lambda key, shape, dtype=jnp.float32: randn(seed, shape, 0.5).astype(dtype)


X = randn(0, (4, 6))


def primed(osc: dict, variables_kernel, scale) -> dict:
    """An oscillation state in which the next update records an oscillation everywhere."""
    w_int = jnp.clip(jnp.round(variables_kernel / scale), -8, 7)
    return {
        **osc,
        "prev_int": w_int + 1.0,
        "prev_dir": -jnp.ones(w_int.shape, jnp.int8),
        "ema_osc": jnp.zeros(w_int.shape, jnp.float32),
    }


def one_term(kernel, scale):
    return dampening.dampening_loss(kernel, scale, None, n_bits=4, signed=True)


# --- Linen -----------------------------------------------------------------------------------


class Tied(nn.Module):
    """One Dense layer applied three times (a loop over a shared layer)."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(6, kernel_init=fixed(1), name="shared")
        act = ActQuant(name="act")
        for _ in range(3):
            x = act(nn.tanh(shared(x)))
        return x


@pytest.fixture(scope="module")
def tied():
    qm = quantize_model(Tied(), RULES)
    variables = qm.calibrate(qm.init(jax.random.key(0), X), [X])
    return qm, variables


def test_a_tied_layer_is_calibrated_on_every_call(tied):
    _, variables = tied
    stats = variables["quant_stats"]
    # One calibration batch, three calls: each call's input and output fed the estimators.
    assert int(stats["shared"]["input_range"]["num_batches"]) == 3
    assert int(stats["act"]["output_range"]["num_batches"]) == 3
    assert int(stats["shared"]["weight_range"]["num_batches"]) == 3


def test_a_tied_layer_tracks_and_dampens_once_per_step(tied):
    qm, variables = tied
    p = variables["params"]["shared"]
    osc = {"shared": primed(variables["oscillation"]["shared"], p["kernel"], p["weight_scale"])}
    _, aux = qm.apply({**variables, "oscillation": osc}, X, mode="train", osc_momentum=M)
    np.testing.assert_allclose(aux.updates["oscillation"]["shared"]["ema_osc"], M, rtol=1e-6)
    np.testing.assert_allclose(aux.dampening, one_term(p["kernel"], p["weight_scale"]), rtol=1e-6)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return nn.tanh(nn.Dense(6, kernel_init=fixed(2), name="fc")(x)), None


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x, _ = Block(name=f"block{i}")(x)
        return x


class Scanned(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = scan(name="blocks")(x, None)
        return x


def _stack(variables: dict) -> dict:
    """Unrolled variables ``block0..2`` as the scanned layout ``blocks`` (stacked on axis 0)."""
    out = {}
    for collection, tree in variables.items():
        blocks = [tree[f"block{i}"] for i in range(3)]
        out[collection] = {"blocks": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}
    return out


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "remat_scan"])
@pytest.mark.slow
def test_a_scanned_block_is_the_unrolled_model_without_listing_collections(remat):
    unrolled = quantize_model(Unrolled(), RULES)
    scanned = quantize_model(Scanned(remat=remat), RULES)
    vu = unrolled.calibrate(unrolled.init(jax.random.key(0), X), [X, 2 * X])
    vs = scanned.calibrate(scanned.init(jax.random.key(0), X), [X, 2 * X])
    # The per-iteration weights differ (split rngs); give the scanned model the unrolled ones.
    vs = _stack(vu)
    jax.tree.map(np.testing.assert_array_equal, vs, _stack(vu))
    np.testing.assert_allclose(scanned.apply(vs, X), unrolled.apply(vu, X), rtol=1e-6)

    def loss(qm, variables):
        def fn(params):
            out, aux = qm.apply({**variables, "params": params}, X, mode="train", osc_momentum=M)
            return jnp.sum(out**2) + 0.1 * aux.dampening, aux

        return jax.grad(fn, has_aux=True)(variables["params"])

    grads_u, aux_u = loss(unrolled, vu)
    grads_s, aux_s = loss(scanned, vs)
    assert aux_s.dampening.shape == ()
    np.testing.assert_allclose(aux_s.dampening, aux_u.dampening, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        grads_s,
        _stack({"params": grads_u})["params"],
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        aux_s.updates["oscillation"],
        _stack({"oscillation": aux_u.updates["oscillation"]})["oscillation"],
    )


def test_a_scan_class_made_outside_the_model_gets_one_sentence():
    outside = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return outside(name="blocks")(x, None)[0]

    qm = quantize_model(Net(), RULES)
    with pytest.raises(ValueError, match="inside a lifted transform.*variable_axes"):
        qm.init(jax.random.key(0), X)


# --- NNX -------------------------------------------------------------------------------------


class NNXTied(nnx.Module):
    def __init__(self):
        self.shared = nnx.Linear(6, 6, kernel_init=fixed(1), rngs=nnx.Rngs(0))
        self.act = nnx_quant.ActQuant()

    def __call__(self, x):
        for _ in range(3):
            x = self.act(nnx.tanh(self.shared(x)))
        return x


def _nnx_tied():
    model = nnx_quant.quantize_nnx(NNXTied(), RULES)
    return nnx_quant.calibrate_nnx(model, [X])


def test_an_nnx_tied_layer_is_calibrated_on_every_call():
    model = _nnx_tied()
    assert int(model.shared.input_range.get_value()["num_batches"]) == 3
    assert int(model.act.output_range.get_value()["num_batches"]) == 3


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
def test_an_nnx_tied_layer_tracks_and_dampens_once_per_step(jit):
    model = _nnx_tied()
    shared = model.shared
    state = primed(
        {f: getattr(shared, f)[...] for f in ("prev_int", "prev_dir", "ema_osc")},
        shared.kernel[...],
        shared.weight_scale[...],
    )
    for field, value in state.items():
        getattr(shared, field)[...] = value
    nnx_quant.set_mode(model, "train", osc_momentum=M)

    def loss_fn(model):
        return jnp.sum(model(X) ** 2) + nnx_quant.dampening_term(model)

    def step(model):
        return nnx.value_and_grad(loss_fn)(model)

    (nnx.jit(step) if jit else step)(model)
    np.testing.assert_allclose(shared.ema_osc[...], M, rtol=1e-6)
    want = one_term(shared.kernel[...], shared.weight_scale[...])
    np.testing.assert_allclose(nnx_quant.dampening_term(model), want, rtol=1e-6)
    # The next step (a new kernel value after an update) tracks again.
    shared.kernel[...] = shared.kernel[...] + 0.0
    (nnx.jit(step) if jit else step)(model)
    assert not np.allclose(shared.ema_osc[...], M)


def test_an_nnx_remat_layer_trains_like_the_plain_one():
    class Remat(NNXTied):
        def __call__(self, x):
            call = nnx.remat(lambda layer, x: layer(x))
            for _ in range(2):
                x = self.act(nnx.tanh(call(self.shared, x)))
            return x

    class Plain(NNXTied):
        def __call__(self, x):
            for _ in range(2):
                x = self.act(nnx.tanh(self.shared(x)))
            return x

    results = []
    for cls in (Plain, Remat):
        model = nnx_quant.calibrate_nnx(nnx_quant.quantize_nnx(cls(), RULES), [X])
        nnx_quant.set_mode(model, "train", osc_momentum=M)
        loss, grads = nnx.jit(
            lambda m: nnx.value_and_grad(
                lambda m: jnp.sum(m(X) ** 2) + nnx_quant.dampening_term(m)
            )(m)
        )(model)
        results.append((loss, nnx.to_pure_dict(grads), model.shared.prev_int[...]))
    (loss_p, grads_p, prev_p), (loss_r, grads_r, prev_r) = results
    np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r, grads_p
    )
    np.testing.assert_array_equal(prev_r, prev_p)


def test_stacked_nnx_layers_are_refused_in_one_sentence():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(6, 6, rngs=nnx.Rngs(key))

    class Stacked(nnx.Module):
        def __init__(self):
            self.layers = make(jax.random.split(jax.random.key(0), 3))

    with pytest.raises(ValueError, match="layers.*stacked kernels.*keep the layers unstacked"):
        nnx_quant.quantize_nnx(Stacked(), RULES)
