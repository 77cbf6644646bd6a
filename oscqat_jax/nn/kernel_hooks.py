"""How the rules interceptor reaches inside a Flax conv or dense call, for one call.

Flax's ``nn.Conv``/``nn.Dense`` family passes its kernel through the ``promote_dtype`` field
right before the convolution or contraction, and ``nn.Conv`` convolves with its
``conv_general_dilated`` field. The context managers here swap those fields on a bound layer
for the duration of one call: :func:`quantized_kernel` fake-quantizes the kernel (tracked,
frozen, dampened; docs/method.md §2, §5-§7), :func:`depthwise_fast_path` convolves a
depth-wise conv with the package's implementation (:mod:`oscqat_jax.nn.depthwise`). Used by
the layer sites of :mod:`oscqat_jax.nn.intercept` and the conv + BatchNorm sites of
:mod:`oscqat_jax.nn.convbn`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from oscqat_jax.nn import depthwise
from oscqat_jax.nn.config import LayerQuant, QuantContext
from oscqat_jax.nn.linen_store import quantize_weight


@contextlib.contextmanager
def quantized_kernel(
    module: nn.Module,
    quant: LayerQuant,
    ctx: QuantContext,
    path: str,
    *,
    seen: dict,
    store: nn.Module | None = None,
    transform: Callable[[jax.Array], jax.Array] | None = None,
):
    """Within the block, ``module`` fake-quantizes its kernel as it passes ``promote_dtype``.

    ``seen`` maps a site's path to (a weak reference to) the kernel value its last call in
    this model call quantized: the same value again is a repeated call of the layer in the
    same step (a tied or looped layer; under a transform that traces its body twice, such as
    ``nn.scan``, each trace has its own values), see :func:`quantize_weight`.

    ``store``: the module whose scope holds the weight quantizer's variables (default
    ``module``; a :class:`~oscqat_jax.nn.convbn.ConvBN` keeps them for its inner conv).
    ``transform``: applied to the float32 kernel before quantization (BN folding's
    per-channel multiplier); the float modes then hand on the transformed kernel too.
    """
    original = module.promote_dtype
    calls = []

    def promote(inputs, kernel, *rest, **kwargs):
        calls.append(path)
        last = seen.get(path)
        repeat = last is not None and last() is kernel
        seen[path] = weakref.ref(kernel)
        w = jnp.asarray(kernel, jnp.float32)
        if transform is not None:
            w = kernel = transform(w)
        w_q = quantize_weight(
            store or module,
            w,
            quant.weight,
            ctx,
            track=quant.track_oscillations,
            dampen=quant.dampen,
            repeat=repeat,
            require_calibration=True,
        )
        # Float modes keep the user's kernel (and its dtype) untouched.
        return original(inputs, w_q if ctx.quantize else kernel, *rest, **kwargs)

    object.__setattr__(module, "promote_dtype", promote)
    try:
        yield
    finally:
        object.__setattr__(module, "promote_dtype", original)
    if len(calls) != 1:
        raise RuntimeError(
            f"Layer {path} ({type(module).__name__}) passed its kernel through promote_dtype "
            f"{len(calls)} times instead of once; this Flax version's layer cannot be quantized "
            "by interception."
        )


@contextlib.contextmanager
def depthwise_fast_path(module: nn.Module, impl: str):
    """Within the block, a depth-wise ``nn.Conv`` convolves with the package's depth-wise
    implementation ``impl`` (:mod:`oscqat_jax.nn.depthwise`: shifted slices on CPU, where
    XLA's grouped convolution is slow) instead of ``lax.conv_general_dilated``; dilated
    convs fall back to the latter. Only the summation order differs between the two."""
    if depthwise.resolve_impl(impl) == "lax" or type(module) is not nn.Conv:
        yield
        return
    original = module.conv_general_dilated
    conv = depthwise.conv_general_dilated_with(impl, original)
    object.__setattr__(module, "conv_general_dilated", conv)
    try:
        yield
    finally:
        object.__setattr__(module, "conv_general_dilated", original)


__all__ = ["depthwise_fast_path", "quantized_kernel"]
