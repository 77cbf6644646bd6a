"""The package's native integer export: one file (``.safetensors`` or ``.npz``) holding what
quantized inference needs, and loading it back into the model it came from.

- :mod:`~oscqat_jax.export.native`: :func:`export_model` and :func:`load_export`, and the
  file layout (format version 5);
- :mod:`~oscqat_jax.export.fileformat`: the manifest, its digest, the checks a file passes
  before it is trusted, and 4-bit packing;
- :mod:`~oscqat_jax.export.tensors`: the arrays every kind of model stores;
- :mod:`~oscqat_jax.export.rules_model`, :mod:`~oscqat_jax.export.nnx_model`: what differs
  between Linen models quantized by rules (the package's families among them; BN folded at
  ConvBN sites) and NNX models.
"""

from oscqat_jax.export.fileformat import (
    FORMAT,
    FORMAT_VERSION,
    KERNEL_INT,
    KERNEL_PACKED,
    MANIFEST_KEY,
    READ_VERSIONS,
    SUFFIXES,
)
from oscqat_jax.export.native import export_model, load_export
from oscqat_jax.export.tensors import check_suffix

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KERNEL_INT",
    "KERNEL_PACKED",
    "MANIFEST_KEY",
    "READ_VERSIONS",
    "SUFFIXES",
    "check_suffix",
    "export_model",
    "load_export",
]
