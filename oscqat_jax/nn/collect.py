"""Reading what the quantized layers leave in their variable collections.

- :func:`dampening_total`: the summed dampening terms sown in a ``train`` call.
- :func:`quantized_weights`: every quantized kernel as integers, scale and zero point.
- :func:`oscillation_states` / :func:`oscillation_summary`: tracking state per layer, of the
  package's models, of a Linen model quantized by rules (its ``oscillation`` collection) or
  of an NNX model (``nnx.state(model, Oscillation)``, layers in ``nnx.List`` included).
- :func:`oscillation_groups`, :func:`active_oscillations`, :func:`bn_mismatch`: the same per
  layer group, depth-wise or point-wise; :func:`depthwise_layers` finds a model's depth-wise
  convs by their structure.
- :func:`reestimated_batch_stats`: BN running statistics from ``bn_stats`` passes
  (docs/method.md §8).

Paths are module paths joined by ``/``, e.g. ``"block_3/depthwise"`` or ``"blocks/0"``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax import oscillation
from oscqat_jax.nn.batchnorm import BN_BATCH_STATS
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.quantizer import DAMPENING, QUANTIZED_WEIGHTS


class QuantizedWeight(NamedTuple):
    """One quantized kernel: ``scale * (int_weight - zero_point)`` is the forward's weight.

    Attributes:
      int_weight: integer values, int8 (int16 above 8 bits), shaped like the kernel; frozen
        entries hold their frozen value.
      scale: float32, ``()`` or per output channel (``(1, 1, 1, C)`` / ``(1, C)``).
      zero_point: int32 of the scale's shape for asymmetric quantizers, else None.
      n_bits: bit width.
      signed: whether the grid is signed (always True for weights).
    """

    int_weight: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    n_bits: int
    signed: bool


def _sown(tree: Mapping, name: str) -> dict[str, tuple]:
    """``{module path: values}`` for every ``sow(..., name, ...)`` entry in a collection."""
    flat = traverse_util.flatten_dict(dict(tree), is_leaf=lambda _, node: isinstance(node, tuple))
    return {"/".join(k[:-1]): v for k, v in flat.items() if k[-1] == name}


def dampening_total(mutated_variables: Mapping[str, Any]) -> jax.Array:
    """Sum of every dampening term sown in a ``train`` call (float32 scalar; 0 if none).

    ``mutated_variables`` is the second output of ``apply(..., mutable=[..., "dampening"])``.
    A layer under ``nn.scan`` sows one term per iteration (an array along the scanned axis):
    every element counts, so the result is a scalar whatever the model's transforms.
    """
    terms = jax.tree_util.tree_leaves(mutated_variables.get(DAMPENING, {}))
    return sum((jnp.sum(jnp.asarray(t, jnp.float32)) for t in terms), jnp.zeros((), jnp.float32))


def _eval_context(value):
    if isinstance(value, QuantContext):
        return dataclasses.replace(value, mode="eval")
    return value


def quantized_weights(
    model: nn.Module, variables: Mapping[str, Any], *args, **kwargs
) -> dict[str, QuantizedWeight]:
    """Runs ``model.apply(variables, *args, **kwargs)`` once in eval mode and returns every
    quantized kernel, keyed by layer path.

    Any :class:`QuantContext` among the arguments is switched to ``eval`` mode first, so the
    integers are those of quantized inference (frozen values applied, nothing advanced).
    """
    leaves, treedef = jax.tree_util.tree_flatten(
        (tuple(_eval_context(a) for a in args), {k: _eval_context(v) for k, v in kwargs.items()})
    )
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]

    # Compiled, with non-array arguments (flags, strings) closed over: one eager pass over a
    # whole network would dispatch thousands of small ops.
    def sow_weights(variables, arrays):
        arrays = iter(arrays)
        filled = [next(arrays) if a else leaf for leaf, a in zip(leaves, is_array, strict=True)]
        call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, filled)
        _, mutated = model.apply(variables, *call_args, mutable=[QUANTIZED_WEIGHTS], **call_kwargs)
        return mutated

    array_args = [leaf for leaf, a in zip(leaves, is_array, strict=True) if a]
    mutated = jax.jit(sow_weights)(variables, array_args)
    return {
        path: quantized_weight(values[0])
        for path, values in _sown(mutated.get(QUANTIZED_WEIGHTS, {}), "kernel").items()
    }


def quantized_weight(record: Mapping[str, Any]) -> QuantizedWeight:
    """The :class:`QuantizedWeight` of an eval forward's record of one kernel (``int_weight``,
    ``scale``, ``n_bits`` and, for asymmetric grids, ``zero_point``), as the quantizer state
    machine hands it to its front end (Linen sows it, NNX records it)."""
    n_bits = int(record["n_bits"])
    int_dtype = np.int8 if n_bits <= 8 else np.int16
    zero_point = record.get("zero_point")
    return QuantizedWeight(
        int_weight=np.asarray(record["int_weight"]).astype(int_dtype),
        scale=np.asarray(record["scale"], np.float32),
        zero_point=None if zero_point is None else np.asarray(zero_point).astype(np.int32),
        n_bits=n_bits,
        signed=True,
    )


def _plain_tree(tree) -> dict:
    """A collection as nested dicts with string keys: an ``nnx.State`` (whose ``nnx.List``
    entries are keyed by int) through its pure dict, Flax's dicts as they are."""
    if hasattr(tree, "to_pure_dict"):
        tree = tree.to_pure_dict()
    if isinstance(tree, Mapping):
        return {str(key): _plain_tree(value) for key, value in tree.items()}
    return tree


def oscillation_states(oscillation_collection: Mapping) -> dict[str, oscillation.OscillationState]:
    """Every tracked weight's :class:`~oscqat_jax.oscillation.OscillationState`, keyed by layer
    path: from an ``oscillation`` collection (Linen) or ``nnx.state(model, Oscillation)``."""
    fields = oscillation.OscillationState._fields
    flat = traverse_util.flatten_dict(_plain_tree(oscillation_collection))
    paths = sorted({"/".join(k[:-1]) for k in flat if k[-1] in fields})
    states = {}
    for path in paths:
        prefix = tuple(path.split("/")) if path else ()
        try:
            states[path] = oscillation.OscillationState(**{f: flat[(*prefix, f)] for f in fields})
        except KeyError as missing:
            raise ValueError(
                f"The oscillation collection at {path!r} lacks the field {missing}."
            ) from None
    return states


def oscillation_summary(
    oscillation_collection: Mapping, level: float = oscillation.OSC_LEVEL
) -> dict[str, dict[str, jax.Array]]:
    """``{"overall": summary, "per_layer": {path: summary}}`` of ``oscillation.summary``:
    fractions of weights oscillating (``ema_osc > level``) and frozen, mean frequency, count.
    The collection is Linen's ``oscillation`` or NNX's ``nnx.state(model, Oscillation)``."""
    states = oscillation_states(oscillation_collection)
    if not states:
        raise ValueError("The oscillation collection holds no tracked weights.")
    return {
        "overall": oscillation.summary(list(states.values()), level),
        "per_layer": {path: oscillation.summary(s, level) for path, s in states.items()},
    }


DEPTHWISE, POINTWISE = "depthwise", "pointwise"


def layer_group(path: str, depthwise: Collection[str] | None = None) -> str:
    """The group a layer's statistics are reported in: ``"depthwise"`` or ``"pointwise"``.

    With ``depthwise`` (the paths of the depth-wise layers, e.g. from
    :func:`depthwise_layers`), a layer is depth-wise when its path is one of them or lies
    inside one (the package's layers keep their BN at ``<conv>/bn``). Without it, the word
    ``depthwise`` in the path decides, which holds for the package's own models only.
    """
    if depthwise is None:
        return DEPTHWISE if DEPTHWISE in path else POINTWISE
    inside = any(path == d or path.startswith(f"{d}/") for d in depthwise)
    return DEPTHWISE if inside else POINTWISE


def is_depthwise_kernel(shape: Sequence[int]) -> bool:
    """Whether a conv kernel of ``shape`` (HWIO) has one input channel per group and several
    outputs, ``(kh, kw, 1, C)`` with ``C > 1``: a depth-wise conv, or a conv of a one-channel
    input (whose kernel has the same shape, so pass ``depthwise`` where that can occur)."""
    return len(shape) == 4 and shape[2] == 1 and shape[3] > 1


def _grouped_states(
    oscillation_collection: Mapping, depthwise: Collection[str] | None
) -> dict[str, list]:
    groups: dict[str, list[oscillation.OscillationState]] = {}
    for path, state in oscillation_states(oscillation_collection).items():
        if depthwise is None:
            name = DEPTHWISE if is_depthwise_kernel(np.shape(state.ema_osc)) else POINTWISE
        else:
            name = layer_group(path, depthwise)
        groups.setdefault(name, []).append(state)
    return {name: groups[name] for name in (DEPTHWISE, POINTWISE) if name in groups}


def oscillation_groups(
    oscillation_collection: Mapping,
    level: float = oscillation.OSC_LEVEL,
    depthwise: Collection[str] | None = None,
) -> dict[str, float]:
    """Per layer group, the fractions of tracked weights oscillating (``ema_osc > level``) and
    frozen, keyed ``oscillating/<group>`` and ``frozen/<group>``.

    ``depthwise``: the depth-wise layers' paths (:func:`depthwise_layers`); without it a
    tracked weight is depth-wise when its kernel's shape is (:func:`is_depthwise_kernel`).
    """
    out = {}
    for name, members in _grouped_states(oscillation_collection, depthwise).items():
        summary = jax.device_get(oscillation.summary(members, level))
        out[f"oscillating/{name}"] = float(summary["oscillating"])
        out[f"frozen/{name}"] = float(summary["frozen"])
    return out


def active_oscillations(
    oscillation_collection: Mapping,
    level: float = oscillation.OSC_LEVEL,
    depthwise: Collection[str] | None = None,
) -> dict[str, float]:
    """Fractions of tracked weights still oscillating and not frozen, per layer group
    (``active/<group>``, groups as in :func:`oscillation_groups`) and over all
    (``active/all``). A frozen weight's ``ema_osc`` keeps decaying for about
    ``ln(ema_osc / level) / momentum`` steps after it stopped moving, so the ``oscillating``
    fraction still counts it for a while; this one does not."""
    out, active_total, size_total = {}, 0, 0
    for name, members in _grouped_states(oscillation_collection, depthwise).items():
        active = sum(
            int(np.sum((np.asarray(s.ema_osc) > level) & ~np.asarray(s.frozen, bool)))
            for s in members
        )
        size = sum(int(np.size(s.ema_osc)) for s in members)
        out[f"active/{name}"] = active / size
        active_total, size_total = active_total + active, size_total + size
    if size_total:
        out["active/all"] = active_total / size_total
    return out


def _depthwise_recorder(found: set[str]):
    """An interceptor adding to ``found`` the path of every depth-wise ``nn.Conv`` call
    (``feature_group_count`` equal to the input's channels, more than one) and of every
    BatchNorm whose input is such a conv's output itself."""
    outputs: list[jax.Array] = []

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name not in ("__call__", "statistics"):
            return next_fun(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()), None)
        path = "/".join(module.scope.path)
        if isinstance(module, nn.Conv) and getattr(x, "ndim", 0) >= 2:
            y = next_fun(*args, **kwargs)
            if module.feature_group_count == x.shape[-1] > 1:
                found.add(path)
                outputs.append(y)
            return y
        if any(x is y for y in outputs):
            found.add(path)
        return next_fun(*args, **kwargs)

    return intercept


def depthwise_layers(model, *args, **kwargs) -> frozenset[str]:
    """The paths of a model's depth-wise convs, found by their structure: one group per input
    channel and more than one (``feature_group_count == in_features > 1``), as the rules'
    ``depthwise`` flag decides.

    Args:
      model: a Linen model (a :class:`~oscqat_jax.nn.intercept.QuantizedModel` or a
        ``flax.linen.Module``), traced abstractly by its ``init`` on ``args``/``kwargs``
        (arrays or ``jax.ShapeDtypeStruct``; nothing is computed); its ``nn.Conv`` layers
        count, and each BatchNorm applied straight to a depth-wise conv's output is listed
        with it. Or an NNX model (no arguments): its ``nnx.Conv`` layers, quantized or not.
    """
    if isinstance(model, nn.Module) or (hasattr(model, "rules") and hasattr(model, "init")):
        found: set[str] = set()
        with nn.intercept_methods(_depthwise_recorder(found)):
            jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), *args)
        return frozenset(found)
    from flax import nnx

    if isinstance(model, nnx.Module):
        return frozenset(
            "/".join(str(p) for p in path)
            for path, module in nnx.iter_modules(model)
            if hasattr(module, "kernel")
            and getattr(module, "feature_group_count", 1) == getattr(module, "in_features", 0) > 1
        )
    raise ValueError(
        f"depthwise_layers needs a Linen model (QuantizedModel or flax.linen.Module) or a "
        f"flax.nnx Module, got {type(model).__name__}."
    )


def bn_mismatch(
    running: Mapping,
    reestimated: Mapping,
    epsilon: float = 1e-5,
    depthwise: Collection[str] | None = None,
) -> dict[str, float]:
    """How far running BatchNorm statistics are from re-estimated ones, per layer group.

    For every BN channel, ``|mean_run - mean_re| / std_re`` (``bn_mean_shift``) and
    ``|std_run / std_re - 1|`` (``bn_std_error``), with ``std = sqrt(var + epsilon)``;
    averaged over the channels of each layer, then over the layers of each group
    (:func:`layer_group` with ``depthwise``: pass the paths from :func:`depthwise_layers`,
    which lists a BatchNorm applied to a depth-wise conv's output with it). Keys
    ``bn_mean_shift/<group>`` and ``bn_std_error/<group>``.
    """
    flat_run = traverse_util.flatten_dict(_plain_tree(running), sep="/")
    flat_re = traverse_util.flatten_dict(_plain_tree(reestimated), sep="/")
    shifts: dict[str, list[float]] = {}
    errors: dict[str, list[float]] = {}
    for key in sorted(flat_run):
        if not key.endswith("/mean"):
            continue
        layer = key.removesuffix("/mean")
        std_re = np.sqrt(np.asarray(flat_re[f"{layer}/var"], np.float64) + epsilon)
        std_run = np.sqrt(np.asarray(flat_run[f"{layer}/var"], np.float64) + epsilon)
        shift = np.abs(np.asarray(flat_run[key]) - np.asarray(flat_re[key])) / std_re
        group = layer_group(layer, depthwise)
        shifts.setdefault(group, []).append(float(shift.mean()))
        errors.setdefault(group, []).append(float(np.abs(std_run / std_re - 1).mean()))
    out = {}
    for group in shifts:
        out[f"bn_mean_shift/{group}"] = float(np.mean(shifts[group]))
        out[f"bn_std_error/{group}"] = float(np.mean(errors[group]))
    return out


def reestimated_batch_stats(bn_batch_stats: Sequence[Mapping]) -> dict:
    """Running statistics from ``bn_stats`` passes: per BN layer, the average of the sown
    per-batch means and of the per-batch unbiased variances (docs/method.md §8).

    Args:
      bn_batch_stats: the ``bn_batch_stats`` collection of each pass (one per batch).

    Returns:
      A tree shaped like the model's ``batch_stats`` (``{..., "bn": {"mean", "var"}}``).
    """
    if not bn_batch_stats:
        raise ValueError("reestimated_batch_stats needs at least one bn_batch_stats collection.")
    sums, counts = {}, {}
    keys = None
    for collection in bn_batch_stats:
        flat = traverse_util.flatten_dict(
            dict(collection), is_leaf=lambda _, node: isinstance(node, tuple)
        )
        if keys is not None and set(flat) != keys:
            raise ValueError("The bn_batch_stats collections come from different BatchNorm layers.")
        keys = set(flat)
        for key, values in flat.items():
            for value in values:
                sums[key] = sums.get(key, 0.0) + jnp.asarray(value, jnp.float32)
                counts[key] = counts.get(key, 0) + 1
    if not sums:
        raise ValueError(
            f"The collections hold no statistics; run the model in bn_stats mode "
            f"with mutable=['{BN_BATCH_STATS}']."
        )
    return traverse_util.unflatten_dict({k: sums[k] / counts[k] for k in sums})
