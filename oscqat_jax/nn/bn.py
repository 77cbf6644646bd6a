"""BatchNorm re-estimation for any quantized model, Linen or NNX (docs/method.md §8).

After QAT the running BatchNorm statistics lag behind the weights as they are now (and
oscillating weights make them wrong, docs/method.md §8). :func:`reestimate_bn` recomputes them
for a Linen model (a :class:`~oscqat_jax.nn.intercept.QuantizedModel` or any
``flax.linen.Module``), :func:`reestimate_bn_nnx` for an NNX model, both the same way:

- every BatchNorm layer normalises with the statistics of the batch it sees;
- up to ``max_batches`` batches go through the network with eval quantization (frozen values
  applied, no tracking or freezing advance, no dampening term): the ``eval`` mode of
  ``QuantizedModel.apply``, ``set_mode(model, "eval")`` in NNX;
- each BatchNorm's running mean and variance become the plain averages, over those batches,
  of the per-batch means and of the per-batch *unbiased* variances (``n / (n - 1)`` times the
  biased one, ``n`` values per channel), whatever the layer's momentum.

The statistics are computed here, from each BatchNorm call's input over the layer's reduction
axes (every axis but its feature ``axis``), so nothing depends on how the layer updates its
own running averages. BatchNorm layers found: ``flax.linen.BatchNorm`` and the package's
:class:`~oscqat_jax.nn.batchnorm.BatchNorm` (Linen, through a ``flax.linen.intercept_methods``
interceptor that also switches the call to batch statistics), ``flax.nnx.BatchNorm`` (NNX,
through the layer's ``promote_dtype`` field, which sees the input and hands back the
statistics the layer normalises with). A layer called more than once per batch contributes
one mean and one variance per call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax.nn import batchnorm

BN_MAX_BATCHES = 50
"""Batches :func:`reestimate_bn` and :func:`reestimate_bn_nnx` use by default (docs/method.md §8)."""

_NO_BN = (
    "The model has no BatchNorm layer to re-estimate ({kinds}); reestimate_bn finds BatchNorm "
    "layers the model calls on the batches it is given."
)


def moments(
    x: jax.Array, reduction_axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch mean, biased variance and unbiased variance of ``x`` over ``reduction_axes``,
    float32, each shaped like ``x`` without those axes. With ``n`` values per channel the
    unbiased variance is the biased one times ``n / (n - 1)`` (``n = 1``: the biased one)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=reduction_axes)
    centred = x - jnp.expand_dims(mean, reduction_axes)
    count = int(np.prod([x.shape[a] for a in reduction_axes]))
    biased = jnp.mean(jnp.square(centred), axis=reduction_axes)
    return mean, biased, biased * (count / max(count - 1, 1))


def _reduction_axes(ndim: int, axis) -> tuple[int, ...]:
    features = {a % ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,))}
    return tuple(a for a in range(ndim) if a not in features)


def _check_max_batches(max_batches) -> None:
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}.")


def _average(per_batch: list[dict[str, tuple[jax.Array, jax.Array]]]) -> dict[str, tuple]:
    """``{path: (mean, var)}``: the plain average over batches (and calls) of each layer's
    recorded means and unbiased variances."""
    out = {}
    for path in per_batch[0]:
        means = jnp.concatenate([batch[path][0] for batch in per_batch])
        variances = jnp.concatenate([batch[path][1] for batch in per_batch])
        out[path] = (jnp.mean(means, axis=0), jnp.mean(variances, axis=0))
    return out


def _stacked(records: list[tuple[str, jax.Array, jax.Array]]) -> dict[str, tuple]:
    """``{path: (means, variances)}``, each stacked over the layer's calls in one pass."""
    by_path: dict[str, tuple[list, list]] = {}
    for path, mean, var in records:
        means, variances = by_path.setdefault(path, ([], []))
        means.append(mean)
        variances.append(var)
    return {path: (jnp.stack(m), jnp.stack(v)) for path, (m, v) in by_path.items()}


# --- Linen ------------------------------------------------------------------------------------


def _set_argument(args: list, kwargs: dict, index: int, name: str, value) -> bool:
    """Replaces the call's argument ``name`` (positional ``index``); False if it was not given."""
    if len(args) > index:
        args[index] = value
    elif name in kwargs:
        kwargs[name] = value
    else:
        return False
    return True


def _with_batch_statistics(module: nn.Module, next_fun: Callable, args, kwargs):
    """``next_fun(*args, **kwargs)`` with ``module.use_running_average`` False for the call."""
    original = module.use_running_average
    object.__setattr__(module, "use_running_average", False)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "use_running_average", original)


def _bn_recorder(records: list) -> Callable:
    """An interceptor that records each BatchNorm call's batch mean and unbiased variance into
    ``records`` (``(path, mean, var)``) and makes the call normalise with batch statistics."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        args, kwargs = list(args), dict(kwargs)
        path = "/".join(module.scope.path)
        if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
            x = args[0] if args else kwargs["x"]
            if kwargs.get("mask") is not None:
                raise ValueError(
                    f"BatchNorm {path} is called with a mask; reestimate_bn computes "
                    "statistics over whole batches only."
                )
            mean, _, unbiased = moments(x, _reduction_axes(x.ndim, module.axis))
            records.append((path, mean, unbiased))
            if _set_argument(args, kwargs, 1, "use_running_average", False):
                return next_fun(*args, **kwargs)
            return _with_batch_statistics(module, next_fun, args, kwargs)
        if isinstance(module, batchnorm.BatchNorm) and context.method_name == "statistics":
            # ``statistics`` serves the layer's own call and a conv folding it alike.
            x = args[0] if args else kwargs["x"]
            ctx = args[1] if len(args) > 1 else kwargs.get("ctx")
            mean, _, unbiased = moments(x, tuple(range(x.ndim - 1)))
            records.append((path, mean, unbiased))
            if ctx is not None:
                _set_argument(args, kwargs, 1, "ctx", dataclasses.replace(ctx, mode="bn_stats"))
                return next_fun(*args, **kwargs)
            # A plain model's call: use_running_average (attribute or argument) decides.
            kwargs["use_running_average"] = None
            return _with_batch_statistics(module, next_fun, args, kwargs)
        return next_fun(*args, **kwargs)

    return intercept


def _linen_apply(model) -> Callable:
    """``(variables, *args, **kwargs) -> output`` running ``model`` with eval quantization and
    ``batch_stats`` mutable (so BatchNorm may compute batch statistics; the update is dropped)."""
    from oscqat_jax.nn.intercept import QuantizedModel

    if isinstance(model, QuantizedModel):
        return functools.partial(model.apply, mode="eval", mutable=["batch_stats"])
    if isinstance(model, nn.Module):
        return functools.partial(model.apply, mutable=["batch_stats"])
    raise ValueError(
        f"reestimate_bn needs a QuantizedModel or a flax.linen.Module, got {type(model).__name__}; "
        "for a flax.nnx model use reestimate_bn_nnx."
    )


def reestimate_bn(
    model,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    max_batches: int = BN_MAX_BATCHES,
    **model_kwargs,
) -> dict[str, Any]:
    """Re-estimated BatchNorm statistics of a Linen model (docs/method.md §8; module docstring).

    Args:
      model: a :class:`~oscqat_jax.nn.intercept.QuantizedModel` (run in ``eval`` mode) or any
        ``flax.linen.Module`` (run as it is); its BatchNorm layers are ``flax.linen.BatchNorm``
        or :class:`oscqat_jax.nn.BatchNorm`.
      variables: the model's variables (e.g. after QAT); only ``batch_stats`` changes.
      batches: yields the model's positional input per batch: an array, or a tuple of
        arguments. The first ``max_batches`` are used.
      max_batches: how many batches at most (50 by default, as the trainer).
      **model_kwargs: the model's own keyword arguments on every batch, those of inference
        (e.g. ``train=False``): BatchNorm is switched to batch statistics here whatever its
        ``use_running_average``, and a training flag would also switch on dropout.

    Returns:
      ``variables`` with ``batch_stats/<layer>/{mean, var}`` of every BatchNorm replaced by
      the averages of the per-batch means and unbiased variances (float32, or the dtype the
      statistics had); every other collection, the ``oscillation`` state included, unchanged.
      Runs jitted: one compile per input shape.
    """
    _check_max_batches(max_batches)
    apply = _linen_apply(model)

    def one_batch(variables, args):
        records: list = []
        with nn.intercept_methods(_bn_recorder(records)):
            apply(variables, *args, **model_kwargs)
        return _stacked(records)

    step = jax.jit(one_batch)
    per_batch = []
    for batch in batches:
        per_batch.append(step(variables, batch if isinstance(batch, tuple) else (batch,)))
        if len(per_batch) == max_batches:
            break
    if not per_batch:
        raise ValueError("reestimate_bn needs at least one batch; batches was empty.")
    if not per_batch[0]:
        raise ValueError(_NO_BN.format(kinds="flax.linen.BatchNorm or oscqat_jax.nn.BatchNorm"))
    stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})), sep="/")
    for path, (mean, var) in _average(per_batch).items():
        for name, value in (("mean", mean), ("var", var)):
            key = f"{path}/{name}" if path else name
            if key not in stats:
                raise ValueError(
                    f"The variables have no batch_stats/{key} for the BatchNorm at {path!r}; "
                    "pass the variables of this model (from its init)."
                )
            stats[key] = jnp.asarray(value, jnp.result_type(stats[key]))
    return {**variables, "batch_stats": traverse_util.unflatten_dict(stats, sep="/")}


# --- NNX --------------------------------------------------------------------------------------


def _nnx_recorder(bn, path: str, original: Callable, records: list) -> Callable:
    """A ``promote_dtype`` for the ``nnx.BatchNorm`` ``bn``: records the batch mean and unbiased
    variance of the input and hands the layer the batch mean and biased variance in place of
    its running ones, so it normalises with batch statistics whatever ``use_running_average``
    says (with ``use_running_average=False`` it computes the same ones itself)."""

    def promote(arrays, *args, **kwargs):
        x, mean, var, *rest = arrays
        batch_mean, biased, unbiased = moments(x, _reduction_axes(x.ndim, bn.axis))
        records.append((path, batch_mean, unbiased))
        arrays = (x, batch_mean.astype(mean.dtype), biased.astype(var.dtype), *rest)
        return original(arrays, *args, **kwargs)

    return promote


def reestimate_bn_nnx(
    model,
    batches: Iterable[Any],
    *,
    max_batches: int = BN_MAX_BATCHES,
    **call_kwargs,
):
    """Re-estimates, in place, the statistics of every ``nnx.BatchNorm`` of an NNX model
    (docs/method.md §8; module docstring).

    Puts the model in ``eval()`` and, if :func:`~oscqat_jax.nn.nnx_quant.quantize_nnx`
    quantized it, its quantizers in ``"eval"`` (where they stay, as after
    ``calibrate_nnx``); runs ``model(*batch, **call_kwargs)`` under ``nnx.jit`` on up to
    ``max_batches`` batches (an array or a tuple of positional arguments each;
    ``call_kwargs`` are static and must be hashable); then sets each BatchNorm's ``mean`` and
    ``var`` to the averages of the per-batch means and unbiased variances. Nothing else
    changes: no tracking advance, no quantizer update. Returns ``model``.
    """
    from flax import nnx

    from oscqat_jax.nn.nnx_quant import quantized_modules, set_mode

    if not isinstance(model, nnx.Module):
        raise ValueError(
            f"reestimate_bn_nnx needs a flax.nnx Module, got {type(model).__name__}; for a "
            "Linen model use reestimate_bn."
        )
    _check_max_batches(max_batches)
    layers = {
        "/".join(str(p) for p in path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, nnx.BatchNorm)
    }
    if not layers:
        raise ValueError(_NO_BN.format(kinds="flax.nnx.BatchNorm"))
    model.eval()
    if quantized_modules(model):
        set_mode(model, "eval")
    records: list = []
    originals = {path: bn.promote_dtype for path, bn in layers.items()}
    static_kwargs = tuple(sorted(call_kwargs.items()))

    @nnx.jit
    def one_batch(model, args):
        records.clear()
        model(*args, **dict(static_kwargs))
        return _stacked(records)

    per_batch = []
    try:
        for path, bn in layers.items():
            bn.promote_dtype = _nnx_recorder(bn, path, originals[path], records)
        for batch in batches:
            per_batch.append(one_batch(model, batch if isinstance(batch, tuple) else (batch,)))
            if len(per_batch) == max_batches:
                break
    finally:
        for path, bn in layers.items():
            bn.promote_dtype = originals[path]
    if not per_batch:
        raise ValueError("reestimate_bn_nnx needs at least one batch; batches was empty.")
    for path, (mean, var) in _average(per_batch).items():
        bn = layers[path]
        bn.mean[...] = jnp.asarray(mean, bn.mean[...].dtype)
        bn.var[...] = jnp.asarray(var, bn.var[...].dtype)
    return model


__all__ = ["BN_MAX_BATCHES", "moments", "reestimate_bn", "reestimate_bn_nnx"]
