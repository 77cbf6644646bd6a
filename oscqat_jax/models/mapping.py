"""The variables of the package's ctx models (``oscqat_jax.models.*``) as the plain models'.

The two trees differ in three places, the same in every family; everything else (BatchNorm
parameters and statistics, weight and input quantizers, oscillation state) keeps its path:

==========================================  ===========================================
ctx model                                   plain model
==========================================  ===========================================
``<layer>/kernel`` of a conv with ``bn``    ``<layer>/conv/kernel`` (ConvBN's inner conv)
``<layer>/output_<kind>``                   ``<layer>_out/output_<kind>`` (its hook)
``<block>/residual_<kind>``                 ``<block>/residual/output_<kind>`` (its hook)
==========================================  ===========================================

``<kind>`` is ``scale``/``zero_point`` in ``params`` and ``signed``/``range`` in
``quant_stats``. The mapping works leaf by leaf, so it also maps gradients and any
collection laid out like the variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import traverse_util

_BN = "bn"


_KINDS = ("scale", "zero_point", "signed", "range")


def _plain_key(key: tuple[str, ...], conv_bn_layers: set[tuple[str, ...]]) -> tuple[str, ...]:
    if key[-1] == "kernel" and key[:-1] in conv_bn_layers:
        return (*key[:-1], "conv", "kernel")
    for i, name in enumerate(key):
        for kind in _KINDS:
            # A range accumulator is a dict: its leaves lie below <quantizer>_range.
            if name == f"output_{kind}" and i > 0:
                return (*key[: i - 1], f"{key[i - 1]}_out", name, *key[i + 1 :])
            if name == f"residual_{kind}":
                return (*key[:i], "residual", f"output_{kind}", *key[i + 1 :])
    return key


def from_package(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``{collection: tree}`` of a ctx model mapped onto the plain model of the same family,
    width and block setting (see the module docstring); arrays are not copied."""
    flat = {
        collection: traverse_util.flatten_dict(dict(tree)) for collection, tree in variables.items()
    }
    conv_bn_layers = {
        key[:-2] for tree in flat.values() for key in tree if len(key) >= 2 and key[-2] == _BN
    }
    return {
        collection: traverse_util.unflatten_dict(
            {_plain_key(key, conv_bn_layers): value for key, value in tree.items()}
        )
        for collection, tree in flat.items()
    }


__all__ = ["from_package"]
