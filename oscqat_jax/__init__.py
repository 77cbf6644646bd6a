"""oscqat_jax: quantization-aware training that overcomes weight oscillations, in JAX.

The functional core (no Flax) lives in these modules:

- :mod:`oscqat_jax.quant`: LSQ fake quantizers with straight-through gradients.
- :mod:`oscqat_jax.ranges`: range estimators (current/running min-max, MSE grid search).
- :mod:`oscqat_jax.oscillation`: oscillation tracking and iterative weight freezing.
- :mod:`oscqat_jax.dampening`: the oscillation-dampening regulariser.
- :mod:`oscqat_jax.schedules`: freezing-threshold, dampening-weight and learning-rate schedules.
- :mod:`oscqat_jax.toy`: the paper's 1-D toy regression, solved with the core.
"""

from oscqat_jax import dampening, oscillation, quant, ranges, schedules, toy

__version__ = "0.1.0"

__all__ = ["dampening", "oscillation", "quant", "ranges", "schedules", "toy", "__version__"]
