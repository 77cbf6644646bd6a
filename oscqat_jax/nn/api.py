"""The safe training API: what a user's own optax loop calls around the quantized layers.

Quantized layers keep their quantizer parameters (``weight_scale``, ``input_scale``,
``*_zero_point``) in ``params`` next to the kernels, and write their per-step results into
collections. Each helper here removes one way of getting that wrong:

- :func:`param_labels` / :func:`quant_optimizer`: the scales need their own optimizer. A
  step size of 0.006 under ``optax.sgd(0.02, momentum=0.9)`` over all parameters goes
  negative within a few steps (its gradient sums over every element it quantizes); the
  quantizer then clamps it to 1e-8, the layer's weights round to about 0 and accuracy
  collapses.
- :func:`min_scale` / :func:`check_scales`: notice a non-positive or non-finite scale.
  ``min_scale`` is a jittable scalar to log from the step; ``check_scales`` raises on the
  host, naming the layer (call it every N steps, or after each evaluation).
- :func:`strip_dampening`: the dampening term is an output of a train call, never an input
  (the layers raise if it is passed back in).

A training loop over a model quantized by rules (``qmodel = quantize_model(model, rules)``,
calibrated by ``qmodel.calibrate``)::

    tx = quant_optimizer(optax.sgd(0.02, momentum=0.9), optax.adam(1e-3))

    def loss_fn(params, variables, x, y):
        logits, aux = qmodel.apply({**variables, "params": params}, x, train=True,
                                   mode="train", freeze_threshold=f_th, mutable=["batch_stats"])
        return cross_entropy(logits, y) + lam * aux.dampening, aux.updates
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from oscqat_jax.nn import collect
from oscqat_jax.nn.quantizer import (
    DAMPENING,
    OSCILLATION,
    QUANT_STATS,
    split_quantizer_param,
)

WEIGHTS, QUANTIZER = "weights", "quantizer"
"""The labels of :func:`param_labels`: model parameters and quantizer parameters."""

CALIBRATION_COLLECTIONS = ("params", QUANT_STATS, OSCILLATION)
"""What a ``calibrate`` call writes: the scales (and zero points) in ``params``, the range
estimators and signedness in ``quant_stats``, and the restarted ``oscillation`` state."""


def _without_value(path) -> tuple:
    """``path`` without the trailing ``value`` attribute an ``nnx.State`` leaf ends in."""
    if (
        len(path) > 1
        and isinstance(path[-1], jax.tree_util.GetAttrKey)
        and path[-1].name == "value"
    ):
        return tuple(path[:-1])
    return tuple(path)


def _leaf_name(path) -> str:
    key = _without_value(path)[-1]
    return str(getattr(key, "key", getattr(key, "name", key)))


def _path_text(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _layer_key(path) -> tuple:
    """The path of a leaf's layer."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in _without_value(path)[:-1])


def param_labels(params) -> Any:
    """``"quantizer"`` for every quantizer parameter, ``"weights"`` for everything else.

    Args:
      params: the ``params`` collection (any pytree of arrays keyed by name; an
        ``nnx.State`` or its pure dict too). A leaf is a quantizer's parameter when a
        quantizer creates it: named ``<q>_scale`` or ``<q>_zero_point`` for a quantizer
        ``<q>`` of ``weight``, ``input``, ``output``, ``residual``, and for ``weight_*``
        next to the layer's ``kernel`` (a ConvBN's at ``conv/kernel``). Kernels, biases,
        BatchNorm's ``scale`` and a model's own ``logit_scale`` or ``temperature_scale``
        are weights.

    Returns:
      A pytree of the structure of ``params`` holding the label strings, for
      ``optax.multi_transform({"weights": ..., "quantizer": ...}, param_labels)``.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    with_kernel = {_layer_key(path) for path, _ in flat if _leaf_name(path) == "kernel"}
    with_kernel |= {key[:-1] for key in with_kernel if key[-1:] == ("conv",)}  # ConvBN's conv

    def label(path, _):
        split = split_quantizer_param(_leaf_name(path))
        if split is None or (split[0] == "weight" and _layer_key(path) not in with_kernel):
            return WEIGHTS
        return QUANTIZER

    return jax.tree_util.tree_map_with_path(label, params)


def quant_optimizer(
    weights_tx: optax.GradientTransformation, quantizer_tx: optax.GradientTransformation
) -> optax.GradientTransformation:
    """One optimizer over all ``params``: ``weights_tx`` for the model's parameters and
    ``quantizer_tx`` for the quantizers' (see :func:`param_labels`).

    The paper trains the weights with SGD and the scales with Adam at a small constant rate,
    e.g. ``quant_optimizer(optax.sgd(lr, momentum=0.9), optax.adam(1e-5))``; pass
    ``optax.set_to_zero()`` as ``quantizer_tx`` to keep the scales from calibration.
    """
    return optax.multi_transform({WEIGHTS: weights_tx, QUANTIZER: quantizer_tx}, param_labels)


def _scales(params) -> list[tuple[str, jax.Array]]:
    """``[(path, value)]`` of every quantizer scale in ``params`` (zero points excluded)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    found = []
    for path, value in flat:
        split = split_quantizer_param(_leaf_name(path))
        if split is not None and split[1] == "scale":
            found.append((_path_text(path), value))
    return found


def min_scale(params) -> jax.Array:
    """The smallest quantizer scale in ``params`` (float32 scalar; ``inf`` if there is none,
    NaN if a scale is NaN). Jittable: return it from a train step as a metric and stop or
    warn when it is not positive. A quantizer uses ``max(scale, 1e-8)``
    (``oscqat_jax.quant.SCALE_EPS``), so a scale that went non-positive does not fail by
    itself; it quietly quantizes everything to a few levels."""
    values = [jnp.min(jnp.asarray(v, jnp.float32)) for _, v in _scales(params)]
    if not values:
        return jnp.asarray(jnp.inf, jnp.float32)
    stacked = jnp.stack(values)
    return jnp.where(jnp.any(jnp.isnan(stacked)), jnp.nan, jnp.min(stacked))


def check_scales(params) -> None:
    """Raises ``ValueError`` naming the first quantizer scale (in ``params`` order) that is
    not a finite positive number; returns None when all are.

    Needs concrete arrays (it reads them on the host): call it between steps, e.g. every
    few hundred steps or after each evaluation; inside a jitted step use :func:`min_scale`.
    """
    for path, value in _scales(params):
        if isinstance(value, jax.core.Tracer):
            raise ValueError(
                "check_scales reads the scales on the host and cannot run inside jit; call it "
                "on the params between steps, or return min_scale(params) from the step."
            )
        values = np.asarray(value, np.float64)
        bad = ~np.isfinite(values) | (values <= 0)
        if np.any(bad):
            worst = values[bad].flat[0]
            raise ValueError(
                f"Quantizer scale {path} is {worst} (needs a finite value > 0; the quantizer "
                "would clamp it to 1e-8): its optimizer steps are too large for it; give "
                "quantizer parameters their own small-step optimizer "
                "(oscqat_jax.nn.quant_optimizer) or lower their learning rate."
            )


def strip_dampening(mutated: Mapping[str, Any]) -> tuple[jax.Array, dict]:
    """Splits the collections a train call returned into the dampening term and the rest.

    Args:
      mutated: the second output of ``apply(..., mutable=[..., "dampening"])``.

    Returns:
      ``(term, rest)``: ``term`` the sum of every layer's sown dampening term (float32
      scalar, 0 when there is none; weight it and add it to the loss) and ``rest`` the other
      collections (``batch_stats``, ``oscillation``...) to merge into the variables of the
      next step. The layers raise if ``"dampening"`` is passed back in.
    """
    rest = {k: v for k, v in mutated.items() if k != DAMPENING}
    return collect.dampening_total(mutated), rest


__all__ = [
    "CALIBRATION_COLLECTIONS",
    "QUANTIZER",
    "WEIGHTS",
    "check_scales",
    "min_scale",
    "param_labels",
    "quant_optimizer",
    "strip_dampening",
]
