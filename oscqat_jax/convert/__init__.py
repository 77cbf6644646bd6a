"""Pretrained PyTorch weights -> this package's ``params`` and ``batch_stats``.

QAT starts from a pretrained float network (docs/method.md §9). This module reads a PyTorch
state dict and places every tensor in the variables of one of our models, the plain Flax
models of :mod:`oscqat_jax.models` (the ones the training program runs):

- conv weights OIHW ``(O, I, kh, kw)`` -> HWIO ``(kh, kw, I, O)`` (depth-wise:
  ``(C, 1, kh, kw)`` -> ``(kh, kw, 1, C)``) at ``<layer>/conv/kernel`` of a ``ConvBN`` (or
  ``<layer>/kernel`` of a conv without BN); linear weights ``(out, in)`` -> ``(in, out)``;
  biases as they are;
- BatchNorm ``weight``/``bias`` -> ``params .../bn/{scale, bias}``, ``running_mean``/
  ``running_var`` -> ``batch_stats .../bn/{mean, var}``; ``num_batches_tracked`` is ignored;
- quantizer parameters (``weight_scale``, ``input_scale``, ...) have no PyTorch counterpart
  and are left to range initialisation (the ``calibrate`` mode), which also restarts the
  oscillation state from the loaded weights; the conversion reports them.

Layouts (the key names of the source), per model family:

===================  =======================================================================
family               layouts
===================  =======================================================================
mobilenet_v2         ``reference`` (the reference's tonylins/pytorch-mobilenet-v2 checkpoint:
                     ``features.i.conv.{0, 1, 3, ...}``), ``torchvision`` (``mobilenet_v2``)
mobilenet_v3_*       ``torchvision`` (``mobilenet_v3_small``, ``mobilenet_v3_large``)
resnet18, resnet50   ``torchvision``; ``reference`` is the same (the reference loads torchvision)
efficientnet_lite*   ``timm``; ``reference`` is the same (the reference loads timm)
every model          ``converted``: the ``.npz`` written by this module's command, keys
                     ``params/<module path>/<name>`` and ``batch_stats/...`` (a file written
                     for the earlier ctx models, kernels at ``<layer>/kernel``, is read too)
===================  =======================================================================

Where each tensor goes is in :mod:`oscqat_jax.convert.layouts`; the module trees are in the
docstrings of the plain model files. The target tree always comes from the model
(``jax.eval_shape(model.init, ...)`` is enough); every source tensor must be used exactly
once with the right shape, otherwise a ``ValueError`` names the first key that is missing,
unexpected or mis-shaped.

API: :func:`load_torch_state_dict` reads ``.pth``/``.pt``/``.pth.tar`` (with torch, imported
only then), ``.safetensors`` and ``.npz`` into ``{key: numpy array}`` through
:mod:`oscqat_jax.weight_files`; :func:`convert_state_dict` maps one onto a model's variable
tree and returns a :class:`Conversion`; :func:`load_pretrained` does both and merges the
result into initialised variables; :func:`save_converted` writes the ``converted`` layout.
The key mappers are in :mod:`oscqat_jax.convert.layouts`, the rest in ``conversion``.

Command (writes the ``converted`` layout and prints a summary)::

    python -m oscqat_jax.convert --model=mobilenet_v2 --layout=torchvision \\
        mobilenet_v2-b0353104.pth mobilenet_v2.npz
"""

from oscqat_jax.convert.conversion import (
    DATA_PARALLEL_PREFIX,
    IGNORED_SUFFIX,
    Conversion,
    StateDict,
    convert_state_dict,
    detect_layout,
    load_pretrained,
    load_torch_state_dict,
    main,
    save_converted,
    save_variables,
)
from oscqat_jax.convert.layouts import (
    AUTO,
    CONVERTED,
    FAMILIES,
    LAYOUTS,
    family_of,
    layouts_of,
    model_name_of,
)
from oscqat_jax.weight_files import STATE_DICT_ENTRIES, TORCH_SUFFIXES

__all__ = [
    "AUTO",
    "CONVERTED",
    "DATA_PARALLEL_PREFIX",
    "FAMILIES",
    "IGNORED_SUFFIX",
    "LAYOUTS",
    "STATE_DICT_ENTRIES",
    "TORCH_SUFFIXES",
    "Conversion",
    "StateDict",
    "convert_state_dict",
    "detect_layout",
    "family_of",
    "layouts_of",
    "load_pretrained",
    "load_torch_state_dict",
    "main",
    "model_name_of",
    "save_converted",
    "save_variables",
]
