"""Quant setups: which tensors of a model are quantized, and at how many bits (docs/method.md §4).

A model never decides this itself. Each quantized site asks its :class:`QuantSetup` with
:meth:`QuantSetup.layer_quant`, passing its module path (the ``/``-joined Flax path, as in the
parameter tree, e.g. ``"features_3/depthwise"``) and its role:

================  ==================================================================
role              site
================  ==================================================================
``first_conv``    the stem convolution, whose input is the image
``conv``          every other conv/dense with weights: point-wise, expansion,
                  projection, full convs, squeeze-excite convs, hidden dense layers
``depthwise``     depth-wise convolutions
``head``          the conv whose output feeds the global pooling (directly, or through
                  the final residual add as in ResNet)
``classifier``    the last dense layer (its output is the logits)
``residual``      a residual add (output only)
``head_residual`` the residual add whose output feeds the global pooling (ResNet)
``pool``          the pooled features (output only); when enabled, models re-quantize
                  them with the quantizer that produced the pooled tensor (the
                  reference's tied quantizers), so only its on/off status is used
================  ==================================================================

Setups (``n`` = ``n_bits``, ``a`` = ``n_bits_act``; outputs are quantized after BN and the
activation):

- ``LSQ_paper`` (default, the paper): weight layers quantize their **input** (``a``) and
  weight (``n``); residual adds, pooling and logits stay float. First conv: image float,
  weight 8. Classifier: weight 8, input 8.
- ``all``: every weight layer at ``n`` and every output at ``a`` (the image stays float):
  conv outputs, residual adds, pooled features and logits.
- ``FP_logits``: ``all`` with float logits.
- ``LSQ``: ``all`` with first-conv weight 8; the ``head`` and ``head_residual`` outputs (the
  activations feeding the pooling) and so the pooled features at 8; classifier weight 8 and
  float logits.
- ``fc4``: ``all`` with first-conv weight 8 and classifier weight 4.
- ``fc4_dw8``: ``fc4`` with depth-wise weights 8.
- ``float``: nothing quantized (overrides are ignored).

These follow the reference, where each quantized conv/dense owns one activation quantizer
that sits on its input in ``LSQ_paper`` and on its output (after BN and activation) in every
other setup, and residual blocks own one on their sum that ``LSQ_paper`` switches off.
Weights with at most ``max_bits`` bits are tracked for oscillations (and may be frozen); every
quantized weight, 8-bit ones included, takes part in the dampening loss.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers

from oscqat_jax._checks import MAX_BITS, check_n_bits
from oscqat_jax.nn.config import FLOAT, FLOAT_LAYER, RANGE_METHODS, LayerQuant, QuantizerSpec

SETUPS = ("LSQ_paper", "all", "FP_logits", "LSQ", "fc4", "fc4_dw8", "float")
ROLES = (
    "first_conv",
    "conv",
    "depthwise",
    "head",
    "classifier",
    "residual",
    "head_residual",
    "pool",
)
WEIGHT_ROLES = ("first_conv", "conv", "depthwise", "head", "classifier")
FLOAT_BITS = "float"
"""Override value that keeps a tensor in floating point."""

# Bit widths the setups fix regardless of n_bits (the reference's hard-coded values).
_EDGE_BITS = 8
_FC4_BITS = 4


@dataclasses.dataclass(frozen=True)
class _Bits:
    """Bit widths of one site; None = float."""

    weight: int | None = None
    input: int | None = None
    output: int | None = None


def _check_bits_value(value, what: str) -> None:
    if value is None or value == FLOAT_BITS:
        return
    if isinstance(value, str):
        raise ValueError(
            f"{what} must be an int between 2 and {MAX_BITS}, None or 'float', got {value!r}."
        )
    check_n_bits(value, what)


@dataclasses.dataclass(frozen=True)
class QuantSetup:
    """A named quantization recipe plus the bit widths and estimators it uses.

    ``overrides`` give per-layer mixed precision: each entry is
    ``(path_pattern, weight_bits, act_bits)``; ``path_pattern`` is an ``fnmatch`` glob matched
    against the whole module path (``*`` also crosses ``/``), and each bit value is an int in
    2..16, ``None`` (keep the setup's choice) or ``"float"`` (leave that tensor in floating
    point). ``act_bits`` applies to the site's activation quantizer: the input of a weight layer
    in ``LSQ_paper``, the output elsewhere (always the output for residual adds and pooling);
    ``"float"`` switches off input and output. ``weight_bits`` is ignored on sites without
    weights. Later entries win over earlier ones.
    """

    name: str = "LSQ_paper"  # one of SETUPS
    n_bits: int = 4  # weight bit width of the inner layers
    n_bits_act: int | None = None  # activation bit width; None = n_bits
    per_channel: bool = False  # one weight scale per output channel
    weight_range_method: str = "mse"  # initial weight range (the paper's recipes use mse)
    act_range_method: str = "mse"  # initial activation range
    weight_symmetric: bool = True  # weights on a symmetric grid (zero point 0)
    act_symmetric: bool = True  # activations on a symmetric grid
    grad_scale: bool = False  # LSQ gradient scaling of the scales (off in the reference)
    max_bits: int = 4  # track/freeze only weights with n_bits <= max_bits
    overrides: tuple[tuple[str, int | str | None, int | str | None], ...] = ()

    def __post_init__(self):
        if self.name not in SETUPS:
            raise ValueError(f"quant_setup must be one of {', '.join(SETUPS)}, got {self.name!r}.")
        check_n_bits(self.n_bits, "n_bits")
        if self.n_bits_act is not None:
            check_n_bits(self.n_bits_act, "n_bits_act")
        for field in ("weight_range_method", "act_range_method"):
            if getattr(self, field) not in RANGE_METHODS:
                raise ValueError(
                    f"{field} must be one of {', '.join(RANGE_METHODS)}, "
                    f"got {getattr(self, field)!r}."
                )
        if isinstance(self.max_bits, bool) or not isinstance(self.max_bits, numbers.Integral):
            raise ValueError(f"max_bits must be an int, got {self.max_bits!r}.")
        if not 0 <= self.max_bits <= MAX_BITS:
            raise ValueError(f"max_bits must be between 0 and {MAX_BITS}, got {self.max_bits}.")
        overrides = tuple(tuple(o) if isinstance(o, list) else o for o in self.overrides)
        for entry in overrides:
            if not (isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[0], str)):
                raise ValueError(
                    "each override must be a (path_pattern, weight_bits, act_bits) tuple with a "
                    f"string pattern, got {entry!r}."
                )
            _check_bits_value(entry[1], f"weight_bits of override {entry[0]!r}")
            _check_bits_value(entry[2], f"act_bits of override {entry[0]!r}")
        object.__setattr__(self, "overrides", overrides)

    @property
    def act_bits(self) -> int:
        """Activation bit width of the inner layers."""
        return self.n_bits if self.n_bits_act is None else self.n_bits_act

    @property
    def quantizes_inputs(self) -> bool:
        """Whether weight layers quantize their input (``LSQ_paper``) rather than their output."""
        return self.name == "LSQ_paper"

    def layer_quant(self, path: str, role: str) -> LayerQuant:
        """The :class:`LayerQuant` of the site at module ``path`` with the given ``role``."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}.")
        if self.name == "float":
            return FLOAT_LAYER
        bits = self._setup_bits(role)
        for pattern, weight_bits, act_bits in self.overrides:
            if fnmatch.fnmatchcase(path, pattern):
                bits = self._override(bits, role, weight_bits, act_bits)
        weight = self._weight_spec(bits.weight)
        return LayerQuant(
            weight=weight,
            input=self._act_spec(bits.input),
            output=self._act_spec(bits.output),
            track_oscillations=weight.enabled and weight.n_bits <= self.max_bits,
        )

    def _setup_bits(self, role: str) -> _Bits:
        n, a = self.n_bits, self.act_bits
        if self.name == "LSQ_paper":
            if role == "first_conv":
                return _Bits(weight=_EDGE_BITS)
            if role == "classifier":
                return _Bits(weight=_EDGE_BITS, input=_EDGE_BITS)
            if role in WEIGHT_ROLES:
                return _Bits(weight=n, input=a)
            return _Bits()
        # Output-quantizing setups: `all` and its variants.
        weight = n if role in WEIGHT_ROLES else None
        output = a
        if role == "first_conv" and self.name in ("LSQ", "fc4", "fc4_dw8"):
            weight = _EDGE_BITS
        if role == "depthwise" and self.name == "fc4_dw8":
            weight = _EDGE_BITS
        if role == "classifier":
            if self.name in ("fc4", "fc4_dw8"):
                weight = _FC4_BITS
            if self.name == "LSQ":
                weight = _EDGE_BITS
            if self.name in ("LSQ", "FP_logits"):
                output = None
        if role in ("head", "head_residual", "pool") and self.name == "LSQ":
            output = _EDGE_BITS
        return _Bits(weight=weight, output=output)

    def _override(self, bits: _Bits, role: str, weight_bits, act_bits) -> _Bits:
        if weight_bits is not None and role in WEIGHT_ROLES:
            bits = dataclasses.replace(
                bits, weight=None if weight_bits == FLOAT_BITS else weight_bits
            )
        if act_bits == FLOAT_BITS:
            bits = dataclasses.replace(bits, input=None, output=None)
        elif act_bits is not None:
            if self.quantizes_inputs and role in WEIGHT_ROLES:
                bits = dataclasses.replace(bits, input=act_bits)
            else:
                bits = dataclasses.replace(bits, output=act_bits)
        return bits

    def _weight_spec(self, n_bits: int | None) -> QuantizerSpec:
        if n_bits is None:
            return FLOAT
        return QuantizerSpec(
            n_bits=n_bits,
            symmetric=self.weight_symmetric,
            per_channel=self.per_channel,
            range_method=self.weight_range_method,
            grad_scale=self.grad_scale,
        )

    def _act_spec(self, n_bits: int | None) -> QuantizerSpec:
        if n_bits is None:
            return FLOAT
        return QuantizerSpec(
            n_bits=n_bits,
            symmetric=self.act_symmetric,
            range_method=self.act_range_method,
            grad_scale=self.grad_scale,
        )


FLOAT_SETUP = QuantSetup(name="float")
"""A setup that quantizes nothing (the pretrained floating-point network)."""
