"""Shared test set-up: a persistent XLA compilation cache for the session.

Several tests compile the same functions (the same tiny model in different runs); the cache
turns every compile after the first into a read.
"""

import tempfile

import jax

_CACHE = tempfile.mkdtemp(prefix="oscqat_jax_xla_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
