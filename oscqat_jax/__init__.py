"""oscqat_jax: quantization-aware training that overcomes weight oscillations, in JAX.

The functional core (no Flax) lives in these modules:

- :mod:`oscqat_jax.quant`: LSQ fake quantizers with straight-through gradients.
- :mod:`oscqat_jax.ranges`: range estimators (current/running min-max, MSE grid search).
- :mod:`oscqat_jax.oscillation`: oscillation tracking and iterative weight freezing.
- :mod:`oscqat_jax.dampening`: the oscillation-dampening regulariser.
- :mod:`oscqat_jax.schedules`: freezing-threshold, dampening-weight and learning-rate schedules.
- :mod:`oscqat_jax.toy`: the paper's 1-D toy regression, solved with the core.

Quantizing one's own Flax model (Linen or NNX) by rules: ``oscqat_jax.quantize_model``,
``QuantRule``, ``paper_rules``, ``ActQuant``, ``calibrate``, ``plan``, ``dampening_term`` and
``reestimate_bn`` come from :mod:`oscqat_jax.nn` and load on first use.
"""

import importlib

from oscqat_jax import dampening, oscillation, quant, ranges, schedules, toy

__version__ = "0.1.0"

# Quantizing a user's own Flax model by rules (oscqat_jax.nn): re-exported here for
# convenience and loaded on first use, so that importing the core does not import Flax.
_FROM_NN = (
    "ActQuant",
    "QuantRule",
    "calibrate",
    "dampening_term",
    "paper_rules",
    "plan",
    "quantize_model",
    "reestimate_bn",
)


def __getattr__(name: str):
    if name in _FROM_NN:
        value = getattr(importlib.import_module("oscqat_jax.nn"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'oscqat_jax' has no attribute {name!r}")


__all__ = [
    "dampening",
    "oscillation",
    "quant",
    "ranges",
    "schedules",
    "toy",
    "__version__",
    *_FROM_NN,
]
