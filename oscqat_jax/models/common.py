"""Building blocks shared by the model families.

Every quantized site of a model gets its :class:`~oscqat_jax.nn.config.LayerQuant` from the
model's :class:`~oscqat_jax.nn.setups.QuantSetup` through :class:`BlockConfig`, keyed by the
site's module path (``/``-joined, as in the parameter tree) and its role; models only say
what each layer *is*, never how it is quantized.

Output quantizers sit after BatchNorm **and the activation** (the reference's placement,
which gives post-ReLU tensors an unsigned grid), so :class:`ConvBNAct`, :class:`ConvAct` and
:class:`DenseAct` extend the quantized layers with an activation and take the output
quantizer out of the layer's ``quant``; the output quantizer keeps the layers' variable names
(``params/output_scale``, ``quant_stats/output_signed``). Residual adds quantize their sum
with variables ``residual_scale``/``residual_signed`` in the block that owns the add.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oscqat_jax import quant
from oscqat_jax.nn.config import FLOAT, LayerQuant, QuantContext, QuantizerSpec
from oscqat_jax.nn.layers import QuantConv, QuantConvBN, QuantDense
from oscqat_jax.nn.linen_store import quantize_activation
from oscqat_jax.nn.quantizer import QUANT_STATS
from oscqat_jax.nn.setups import QuantSetup

Activation = Callable[[jax.Array], jax.Array]

# torchvision's and timm's conv initialisation (Kaiming normal, fan-out); it only matters
# when training from scratch, since QAT starts from converted pretrained weights.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
DENSE_INIT = nn.initializers.normal(0.01)
TRAIN_MODES = ("train", "float_train")
"""Modes in which dropout is active."""


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of ``divisor`` to ``value`` (at least ``divisor``), rounded up when
    rounding would lose more than ``1 - round_limit`` of ``value``: torchvision's
    ``_make_divisible`` and timm's ``make_divisible``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def torch_padding(kernel_size: int) -> int:
    """Symmetric padding of PyTorch's ``padding=(k - 1) // 2`` convs (differs from ``"SAME"``
    for strided convs on even inputs, so converted weights see the same pixels)."""
    return (kernel_size - 1) // 2


def split_output(layer_quant: LayerQuant) -> tuple[LayerQuant, QuantizerSpec]:
    """``(layer_quant without its output quantizer, that output quantizer)``."""
    return dataclasses.replace(layer_quant, output=FLOAT), layer_quant.output


def _activate_and_quantize(
    module: nn.Module, y: jax.Array, activation: Activation | None, spec: QuantizerSpec, ctx
) -> jax.Array:
    if module.quant.output.enabled:
        raise ValueError(
            f"Layer {'/'.join(module.scope.path)} quantizes its output after the activation; "
            "pass that quantizer as output_quant and leave quant.output disabled."
        )
    if activation is not None:
        y = activation(y)
    return quantize_activation(module, "output", y, spec, ctx).astype(y.dtype)


class ConvBNAct(QuantConvBN):
    """:class:`~oscqat_jax.nn.layers.QuantConvBN`, then ``activation``, then ``output_quant``.

    ``(N, H, W, C_in) -> (N, Ho, Wo, features)`` in the compute dtype.
    """

    activation: Activation | None = None
    output_quant: QuantizerSpec = FLOAT

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        y = super().__call__(x, ctx)
        return _activate_and_quantize(self, y, self.activation, self.output_quant, ctx)


class ConvAct(QuantConv):
    """:class:`~oscqat_jax.nn.layers.QuantConv` (no BN), then ``activation``, then ``output_quant``."""

    activation: Activation | None = None
    output_quant: QuantizerSpec = FLOAT

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        y = super().__call__(x, ctx)
        return _activate_and_quantize(self, y, self.activation, self.output_quant, ctx)


class DenseAct(QuantDense):
    """:class:`~oscqat_jax.nn.layers.QuantDense`, then ``activation``, then ``output_quant``."""

    activation: Activation | None = None
    output_quant: QuantizerSpec = FLOAT

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        y = super().__call__(x, ctx)
        return _activate_and_quantize(self, y, self.activation, self.output_quant, ctx)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What every layer of one model shares; builds its quantized layers.

    The ``parent`` argument of the builders is the module that will own the new layer (call
    them from its compact method); the site path is ``parent``'s path plus ``name``.
    """

    quant_setup: QuantSetup
    fold_bn: bool = False  # fold BN into the quantized conv weights
    bn_momentum: float = 0.9  # Flax convention (PyTorch's momentum=0.1)
    bn_epsilon: float = 1e-5
    dtype: Any = None  # compute dtype (None: float32)
    depthwise_impl: str = "auto"  # see oscqat_jax.nn.depthwise

    def quant(self, parent: nn.Module, name: str, role: str) -> LayerQuant:
        """The setup's :class:`LayerQuant` for site ``name`` of ``parent`` with ``role``."""
        path = "/".join((*parent.scope.path, name))
        return self.quant_setup.layer_quant(path, role)

    def conv_bn_act(
        self,
        parent: nn.Module,
        name: str,
        role: str,
        features: int,
        kernel_size: int,
        *,
        strides: int = 1,
        groups: int = 1,
        activation: Activation | None = None,
    ) -> ConvBNAct:
        """A bias-free ``kernel_size`` conv with PyTorch padding, BN and ``activation``."""
        layer_quant, output = split_output(self.quant(parent, name, role))
        return ConvBNAct(
            features=features,
            kernel_size=(kernel_size, kernel_size),
            strides=(strides, strides),
            padding=torch_padding(kernel_size),
            feature_group_count=groups,
            quant=layer_quant,
            kernel_init=CONV_INIT,
            dtype=self.dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            fold_bn=self.fold_bn,
            depthwise_impl=self.depthwise_impl,
            activation=activation,
            output_quant=output,
            name=name,
        )

    def conv_act(
        self,
        parent: nn.Module,
        name: str,
        role: str,
        features: int,
        *,
        activation: Activation | None = None,
    ) -> ConvAct:
        """A 1x1 conv with bias and no BN (squeeze-excite), then ``activation``."""
        layer_quant, output = split_output(self.quant(parent, name, role))
        return ConvAct(
            features=features,
            kernel_size=(1, 1),
            padding=0,
            use_bias=True,
            quant=layer_quant,
            kernel_init=CONV_INIT,
            dtype=self.dtype,
            activation=activation,
            output_quant=output,
            name=name,
        )

    def dense(
        self,
        parent: nn.Module,
        name: str,
        role: str,
        features: int,
        *,
        activation: Activation | None = None,
    ) -> DenseAct:
        """A dense layer with bias, then ``activation``."""
        layer_quant, output = split_output(self.quant(parent, name, role))
        return DenseAct(
            features=features,
            quant=layer_quant,
            kernel_init=DENSE_INIT,
            dtype=self.dtype,
            activation=activation,
            output_quant=output,
            name=name,
        )


def residual_add(
    block: nn.Module,
    cfg: BlockConfig,
    x: jax.Array,
    shortcut: jax.Array,
    ctx: QuantContext,
    *,
    role: str = "residual",
    activation: Activation | None = None,
) -> jax.Array:
    """``quantize(activation(x + shortcut))`` with the quantizer ``residual`` of ``block``.

    Call from ``block``'s compact method; shapes ``(N, H, W, C)`` in and out.
    """
    y = x + shortcut
    if activation is not None:
        y = activation(y)
    spec = cfg.quant(block, "residual", role).output
    return quantize_activation(block, "residual", y, spec, ctx).astype(y.dtype)


def global_pool(
    model: nn.Module,
    cfg: BlockConfig,
    x: jax.Array,
    ctx: QuantContext,
    *,
    source: nn.Module,
    source_quantizer: str,
    source_spec: QuantizerSpec,
) -> jax.Array:
    """Global average pooling ``(N, H, W, C) -> (N, C)``, re-quantized when the setup says so.

    As the reference's tied quantizers, the pooled features go through the quantizer that
    produced ``x`` (``source_quantizer`` of the layer or block ``source``, specified by
    ``source_spec``) again, with its current scale and without updating its range; the
    ``pool`` role of the setup switches this on or off.
    """
    pooled = jnp.mean(x, axis=(1, 2))
    if not (cfg.quant(model, "pool", "pool").output.enabled and source_spec.enabled):
        return pooled
    if not ctx.quantize:
        return pooled
    params = source.variables["params"]
    zero_point = params.get(f"{source_quantizer}_zero_point")
    signed = source.variables[QUANT_STATS][f"{source_quantizer}_signed"]
    requantized = quant.fake_quant(
        pooled.astype(jnp.float32),
        params[f"{source_quantizer}_scale"],
        zero_point,
        n_bits=source_spec.n_bits,
        signed=signed,
        grad_scale=source_spec.grad_scale,
    )
    return requantized.astype(pooled.dtype)


def dropout(model: nn.Module, rate: float, x: jax.Array, ctx: QuantContext) -> jax.Array:
    """Dropout in the training modes (needs a ``"dropout"`` rng there); identity for rate 0."""
    if rate == 0:
        return x
    return nn.Dropout(rate, deterministic=ctx.mode not in TRAIN_MODES)(x)


@dataclasses.dataclass(frozen=True, eq=False)
class _RecordingSetup(QuantSetup):
    """A :class:`QuantSetup` that remembers every site it was asked about."""

    record: dict = dataclasses.field(default_factory=dict)

    def layer_quant(self, path: str, role: str) -> LayerQuant:
        layer_quant = super().layer_quant(path, role)
        self.record[path] = (role, layer_quant)
        return layer_quant


def quant_plan(
    model: nn.Module, input_shape: tuple[int, ...] = (1, 224, 224, 3)
) -> dict[str, tuple[str, LayerQuant]]:
    """``{site path: (role, LayerQuant)}`` for every quantization site of ``model``.

    Traces ``model.init`` on an input of ``input_shape`` abstractly (no compilation, no
    arrays allocated), with the model's own ``quant_setup``.
    """
    setup = model.quant_setup
    fields = {f.name: getattr(setup, f.name) for f in dataclasses.fields(QuantSetup)}
    recording = _RecordingSetup(**fields)
    ctx = QuantContext.create("eval")
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    jax.eval_shape(model.clone(quant_setup=recording).init, jax.random.key(0), x, ctx)
    return dict(recording.record)
