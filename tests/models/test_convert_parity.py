"""Parity of converted checkpoints with PyTorch: every architecture and layout of oscqat_jax.convert.

For each network of ``torch_references`` (written after torchvision, timm and the official
reference): random weights, BN scales and shifts, and BN statistics averaged over a few
train-mode passes on random batches (so eval-mode activations stay O(1) and the logits depend
on the input); the state dict goes through a ``.pth`` file and ``convert.load_pretrained``
into our plain model (``oscqat_jax.models``, what the training program runs). Three checks, measured as the largest absolute logit difference over
the largest absolute PyTorch logit:

- the converted model gives PyTorch's eval-mode logits within ``TOLERANCE`` (float32);
- the guard: PyTorch's logits for two inputs differ by at least ``MARGIN * TOLERANCE``, so
  agreement is not an accident of logits that ignore the input;
- the negative control: swapping H and W of one depth-wise kernel (a 3x3 conv's in ResNets)
  after loading moves the logits by at least ``MARGIN * TOLERANCE``, so a conv weight loaded
  transposed cannot pass.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_references
from flax import traverse_util

from oscqat_jax import convert
from oscqat_jax import models as families
from oscqat_jax.training.step import FAST_COMPILE

TOLERANCE = 1e-4
"""Largest |our logit - PyTorch's| over the largest |PyTorch logit|, float32 on CPU."""
MARGIN = 100
"""How many tolerances the guard and the negative control must exceed."""
NUM_CLASSES = 10
INPUT_SIZE = torch_references.INPUT_SIZE
CALIBRATION_BATCHES = 4
CALIBRATION_BATCH_SIZE = 8

SWAPPED_KERNEL = {
    ("mobilenet_v2", "reference"): ("features_2", "depthwise"),
    ("mobilenet_v2", "torchvision"): ("features_2", "depthwise"),
    ("mobilenet_v3_small", "torchvision"): ("features_1", "depthwise"),
    ("mobilenet_v3_large", "torchvision"): ("features_2", "depthwise"),
    ("efficientnet_lite0", "timm"): ("blocks_1_0", "conv_dw"),
    ("resnet18", "torchvision"): ("layer1_0", "conv1"),
    ("resnet50", "torchvision"): ("layer1_0", "conv2"),
}
"""The layer whose 3x3 kernel the negative control transposes: a depth-wise conv of an early
block (a 3x3 conv in ResNets, which have no depth-wise conv), where the maps are large."""


class Parity(NamedTuple):
    """Relative logit differences (see the module docstring)."""

    error: float  # converted model vs PyTorch
    input_dependence: float  # PyTorch, input 1 vs input 2
    swapped_error: float  # converted model with one kernel's H and W swapped vs PyTorch


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _reference_network(name: str, layout: str, rng: np.random.Generator) -> torch.nn.Module:
    """The PyTorch network with random weights and calibrated BatchNorm, in eval mode."""
    torch.manual_seed(0)
    net = torch_references.NETWORKS[name, layout](NUM_CLASSES)
    torch_references.randomize_affine(net, torch.Generator().manual_seed(1))
    shape = (CALIBRATION_BATCH_SIZE, 3, INPUT_SIZE, INPUT_SIZE)
    batches = [
        torch.from_numpy(rng.standard_normal(shape, np.float32)) for _ in range(CALIBRATION_BATCHES)
    ]
    return torch_references.calibrate_batch_norm(net, batches)


def _swap_hw(variables: dict, layer: tuple[str, ...]) -> dict:
    flat = traverse_util.flatten_dict(variables["params"])
    kernel = flat[(*layer, "conv", "kernel")]  # HWIO, the ConvBN's conv
    assert kernel.shape[0] == kernel.shape[1] == 3, kernel.shape
    flat[(*layer, "conv", "kernel")] = jnp.swapaxes(kernel, 0, 1)
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


@functools.cache
def _parity(name: str, layout: str) -> Parity:
    """Runs both networks once per architecture (one compilation)."""
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: threads only contend with XLA's
    try:
        net = _reference_network(name, layout, rng)
        x = rng.standard_normal((2, 3, INPUT_SIZE, INPUT_SIZE), np.float32)
        other = rng.standard_normal(x.shape, np.float32)
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
            expected_other = net(torch.from_numpy(other)).numpy()
    finally:
        torch.set_num_threads(threads)

    model = families.create_model(name, num_classes=NUM_CLASSES)
    nhwc = x.transpose(0, 2, 3, 1)
    template = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct(nhwc.shape, jnp.float32)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "net.pth"
        torch.save(net.state_dict(), path)
        variables = convert.load_pretrained(path, model, template, layout=layout)
    apply = jax.jit(model.apply, compiler_options=FAST_COMPILE)  # compiling dominates
    logits = np.asarray(apply(variables, nhwc))
    swapped = np.asarray(apply(_swap_hw(variables, SWAPPED_KERNEL[name, layout]), nhwc))
    return Parity(
        error=_relative(logits, expected),
        input_dependence=_relative(expected_other, expected),
        swapped_error=_relative(swapped, expected),
    )


# The official MobileNetV2 layout in the quick tier; every other layout in the full suite.
NETWORKS = [
    net if net == ("mobilenet_v2", "reference") else pytest.param(*net, marks=pytest.mark.slow)
    for net in torch_references.NETWORKS
]


@pytest.mark.parametrize(("name", "layout"), NETWORKS)
def test_converted_model_gives_the_pytorch_logits(name, layout):
    assert _parity(name, layout).error <= TOLERANCE


@pytest.mark.parametrize(("name", "layout"), NETWORKS)
def test_pytorch_logits_depend_on_the_input(name, layout):
    assert _parity(name, layout).input_dependence >= MARGIN * TOLERANCE


@pytest.mark.parametrize(("name", "layout"), NETWORKS)
def test_one_transposed_kernel_breaks_parity(name, layout):
    assert _parity(name, layout).swapped_error >= MARGIN * TOLERANCE
