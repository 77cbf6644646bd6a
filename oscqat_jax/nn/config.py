"""Static descriptions of how a layer is quantized, and the per-call quantization context.

These are the contract between quant setups, models, quantized layers and the trainer:

- :class:`QuantizerSpec` describes one quantizer (a weight or an activation).
- :class:`LayerQuant` gathers the quantizers of one conv/dense layer.
- :class:`QuantContext` is passed to every quantized layer at call time; it selects the mode
  and carries the values that change during training (the freezing threshold) as arrays,
  so a jitted step never recompiles when a schedule moves.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from oscqat_jax import dampening, oscillation
from oscqat_jax._checks import check_n_bits

RANGE_METHODS = ("mse", "current_minmax", "running_minmax")
MODES = ("float_train", "float_eval", "calibrate", "train", "eval", "bn_stats")
"""Per-call modes.

- ``float_train`` / ``float_eval``: quantizers off (plain float network); BN uses batch
  statistics (updating ``batch_stats``) or running statistics respectively.
- ``calibrate``: range initialisation (docs/method.md §3): BN uses running statistics, each
  quantizer updates its range estimator in the ``quant_stats`` collection and sets its scale
  from it before quantizing, so downstream quantizers see the already-quantized network.
- ``train``: QAT. BN uses batch statistics (updating ``batch_stats``); oscillation tracking
  and freezing advance (the ``oscillation`` collection must be mutable) and dampened layers
  sow their term into ``dampening`` (which must be mutable and must not be passed in), unless
  the context turns them off (``track_oscillations=False`` / ``dampen=False``).
- ``eval``: quantized inference with running BN statistics; nothing advances.
- ``bn_stats``: BN re-estimation pass (docs/method.md §8): quantized like ``eval``, but each
  BN layer normalises with batch statistics and records them; tracking does not advance.
"""


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """One quantizer; ``n_bits=None`` means this tensor stays in floating point."""

    n_bits: int | None = None  # bit width, 2..16; None = not quantized
    symmetric: bool = True  # symmetric (zero point 0) or asymmetric (learnable zero point)
    per_channel: bool = False  # one scale per output channel (weights only)
    range_method: str = "mse"  # initial range: "mse", "current_minmax" or "running_minmax"
    grad_scale: bool = False  # LSQ gradient scaling of the scale (off in the reference)
    num_candidates: int = 100  # MSE grid size
    range_margin: float = 0.5  # MSE search margin added to the largest magnitude
    running_momentum: float = 0.9  # weight of the previous range for running_minmax

    def __post_init__(self):
        if self.n_bits is not None:
            check_n_bits(self.n_bits)
        if self.range_method not in RANGE_METHODS:
            raise ValueError(
                f"range_method must be one of {', '.join(RANGE_METHODS)}, got {self.range_method!r}."
            )

    @property
    def enabled(self) -> bool:
        return self.n_bits is not None


FLOAT = QuantizerSpec()


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """How one conv or dense layer is quantized (see ``oscqat_jax.nn.setups`` for the presets)."""

    weight: QuantizerSpec = FLOAT  # the layer's kernel (weights are always on a signed grid)
    input: QuantizerSpec = FLOAT  # the layer's input activation (signedness learnt from data)
    output: QuantizerSpec = FLOAT  # the layer's output (only the ``all`` setup quantizes it)
    track_oscillations: bool = False  # track/freeze this weight (n_bits <= max_bits)
    dampen: bool = True  # include this weight in the dampening loss when it is quantized

    @property
    def quantized(self) -> bool:
        return self.weight.enabled or self.input.enabled or self.output.enabled


FLOAT_LAYER = LayerQuant()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantContext:
    """Per-call settings shared by every quantized layer of a model.

    ``mode``, ``use_ema_freeze``, ``dampening_aggregation``, ``dampen`` and
    ``track_oscillations`` are static (a change is a different compiled function);
    ``freeze_threshold`` and ``osc_momentum`` are float32 scalar arrays and may change every
    step without recompiling.

    ``dampen`` and ``track_oscillations`` say whether this call means to dampen and to track.
    While they are True (the default), a ``train`` call whose ``apply`` lacks the collection
    the work needs (``"dampening"`` / ``"oscillation"`` in ``mutable``) raises instead of
    silently dropping the term or the tracking; set them False to train without it.
    """

    freeze_threshold: jax.Array  # f_th of docs/method.md §6; freezing is active only while > 0
    osc_momentum: jax.Array  # EMA momentum of tracking and freezing
    mode: str = dataclasses.field(default="eval", metadata=dict(static=True))
    use_ema_freeze: bool = dataclasses.field(default=True, metadata=dict(static=True))
    dampening_aggregation: str = dataclasses.field(
        default="kernel_mean", metadata=dict(static=True)
    )
    dampen: bool = dataclasses.field(default=True, metadata=dict(static=True))
    track_oscillations: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.dampening_aggregation not in dampening.AGGREGATIONS:
            raise ValueError(
                f"dampening_aggregation must be one of {', '.join(dampening.AGGREGATIONS)}, "
                f"got {self.dampening_aggregation!r}."
            )
        for name in ("dampen", "track_oscillations", "use_ema_freeze"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"QuantContext.{name} must be a Python bool (it is static), "
                    f"got {getattr(self, name)!r}."
                )

    @classmethod
    def create(
        cls,
        mode: str = "eval",
        *,
        freeze_threshold=0.0,
        osc_momentum=oscillation.EMA_MOMENTUM,
        use_ema_freeze: bool = True,
        dampening_aggregation: str = "kernel_mean",
        dampen: bool = True,
        track_oscillations: bool = True,
    ) -> QuantContext:
        """Builds a context with float32 scalar arrays for the dynamic fields."""
        return cls(
            freeze_threshold=jnp.asarray(freeze_threshold, jnp.float32),
            osc_momentum=jnp.asarray(osc_momentum, jnp.float32),
            mode=mode,
            use_ema_freeze=use_ema_freeze,
            dampening_aggregation=dampening_aggregation,
            dampen=dampen,
            track_oscillations=track_oscillations,
        )

    @property
    def quantize(self) -> bool:
        """Whether quantizers are active in this mode."""
        return not self.mode.startswith("float")

    @property
    def bn_batch_stats(self) -> bool:
        """Whether BatchNorm normalises with the statistics of the current batch."""
        return self.mode in ("train", "bn_stats", "float_train")

    @property
    def tracking(self) -> bool:
        """Whether oscillation tracking advances in this call (``train`` mode with
        ``track_oscillations``; the ``oscillation`` collection must then be mutable)."""
        return self.mode == "train" and self.track_oscillations

    @property
    def dampening(self) -> bool:
        """Whether dampened layers sow their term in this call (``train`` mode with
        ``dampen``; the ``dampening`` collection must then be mutable)."""
        return self.mode == "train" and self.dampen
