"""The jitted steps of the training program, compiled once per shape over a device mesh.

State is replicated over a one-axis :class:`jax.sharding.Mesh` of all devices and each batch
is split along its first axis; ``jax.jit`` with ``NamedSharding`` partitions the computation
(GSPMD), so BatchNorm means over the batch are means over the *global* batch. The train step
donates its input state.

Everything that changes during training (learning rates, the freezing threshold, the
dampening weight) enters the train step as float32 array arguments, never as Python
constants: moving a schedule never recompiles the step, and recipes that differ only in
their schedules share one compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from oscqat_jax import oscillation
from oscqat_jax.nn import collect
from oscqat_jax.nn.quantizer import OSCILLATION, QUANT_STATS
from oscqat_jax.training import optim
from oscqat_jax.training.forward import Forward

DATA_AXIS = "data"
COLLECTIONS = ("batch_stats", OSCILLATION, QUANT_STATS)
"""Variable collections carried by the train state besides ``params``."""


@flax.struct.dataclass
class TrainState:
    """Everything a run carries from step to step (and into checkpoints).

    ``rng`` is a raw ``uint32[2]`` key (checkpoint-friendly); ``step`` counts optimizer
    updates of the current phase (int32).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    oscillation: Any
    quant_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict:
        """The model variables in the form ``Module.apply`` takes."""
        return {
            "params": self.params,
            "batch_stats": self.batch_stats,
            OSCILLATION: self.oscillation,
            QUANT_STATS: self.quant_stats,
        }


def create_state(variables: dict, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state (step 0, new optimizer state) around existing model variables."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        oscillation=variables.get(OSCILLATION, {}),
        quant_stats=variables.get(QUANT_STATS, {}),
        opt_state=tx.init(params),
        rng=rng,
    )


@dataclasses.dataclass(frozen=True)
class Schedules:
    """The values a train step receives as arguments, as ``optax.Schedule`` callables."""

    model_lr: optax.Schedule
    quant_lr: optax.Schedule
    freeze_threshold: optax.Schedule
    dampening_weight: optax.Schedule | None = None  # None: dampening switched off

    def table(self, total_steps: int) -> dict[str, np.ndarray]:
        """Every step's values, float32 arrays of length ``total_steps`` (index = 0-based step).

        Learning rates follow optax's 0-based update count; the freezing threshold and the
        dampening weight, like the reference's, the 1-based iteration number.
        """
        steps = jnp.arange(total_steps, dtype=jnp.int32)
        values = {
            "model_lr": jax.vmap(self.model_lr)(steps),
            "quant_lr": jax.vmap(self.quant_lr)(steps),
            "freeze_threshold": jax.vmap(self.freeze_threshold)(steps + 1),
            "dampening_weight": jnp.zeros(total_steps, jnp.float32)
            if self.dampening_weight is None
            else jax.vmap(self.dampening_weight)(steps + 1),
        }
        return {k: np.asarray(v, np.float32) for k, v in values.items()}


def hparams_at(table: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """The step's row of a :meth:`Schedules.table` (float32 scalars)."""
    return {k: v[step] for k, v in table.items()}


@dataclasses.dataclass(frozen=True)
class OscillationSettings:
    """How the QAT step tracks, freezes and dampens oscillations (docs/method.md §5-7);
    static, so a change compiles a new step. The freezing threshold and the dampening weight
    change every step and are not here: they are rows of :meth:`Schedules.table`."""

    track: bool = True  # advance oscillation tracking/freezing
    momentum: float = oscillation.EMA_MOMENTUM  # EMA momentum of tracking and freezing
    use_ema_freeze: bool = True  # freeze to the rounded EMA of the integer value
    level: float = oscillation.OSC_LEVEL  # ema_osc above this counts as oscillating
    dampen: bool = False  # add the dampening term (weighted by hparams["dampening_weight"])
    dampening_aggregation: str = "kernel_mean"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of a train step (changing one compiles a new step)."""

    mode: str = "train"  # "train" (QAT) or "float_train"
    oscillations: OscillationSettings = OscillationSettings()


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example 1.0 where the label is among the ``k`` largest logits."""
    k = min(k, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def make_train_step(
    model: Forward, tx: optax.GradientTransformation, cfg: StepConfig
) -> Callable[[TrainState, tuple, dict], tuple[TrainState, dict]]:
    """``step(state, (images, labels), hparams) -> (state, metrics)`` of the forward
    ``model`` (:mod:`.forward`), not yet jitted.

    ``hparams`` holds float32 scalars ``model_lr``, ``quant_lr``, ``freeze_threshold`` and
    ``dampening_weight`` (see :meth:`Schedules.table`); ``tx`` gives update directions that
    the step scales by the learning rates (:func:`optim.apply_learning_rates`).
    """
    osc = cfg.oscillations
    dampen = osc.dampen and cfg.mode == "train"
    track = osc.track and cfg.mode == "train"

    def step(state: TrainState, batch: tuple, hparams: dict) -> tuple[TrainState, dict]:
        images, labels = batch
        lam = hparams["dampening_weight"] if dampen else jnp.zeros((), jnp.float32)
        rng, dropout_rng = jax.random.split(state.rng)

        def loss_fn(params):
            variables = dict(state.variables, params=params)
            logits, mutated, damp = model.train(
                variables,
                images,
                mode=cfg.mode,
                osc=osc,
                freeze_threshold=hparams["freeze_threshold"],
                dampen=dampen,
                track=track,
                rng=dropout_rng,
            )
            task = cross_entropy(logits, labels)
            return task + lam * damp, (task, damp, logits, mutated)

        grads, (task, damp, logits, mutated) = jax.grad(loss_fn, has_aux=True)(state.params)
        directions, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = optim.apply_learning_rates(
            directions, state.params, hparams["model_lr"], hparams["quant_lr"]
        )
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=mutated.get("batch_stats", state.batch_stats),
            oscillation=mutated.get(OSCILLATION, state.oscillation),
            opt_state=opt_state,
            rng=rng,
        )
        metrics = {
            "loss": task + lam * damp,
            "task_loss": task,
            "dampening_loss": damp,
            "top1": topk_correct(logits, labels, 1).mean(),
            "lr": hparams["model_lr"],
            "quant_lr": hparams["quant_lr"],
            "dampening_weight": lam,
            "freeze_threshold": hparams["freeze_threshold"],
            "grad_norm": optax.tree.norm(grads),
        }
        if cfg.mode == "train" and new_state.oscillation:
            summary = collect.oscillation_summary(new_state.oscillation, osc.level)
            metrics.update({f"osc/{k}": v for k, v in summary["overall"].items()})
        return new_state, metrics

    return step


def make_multi_step(step: Callable, fetch: Callable) -> Callable:
    """``multi(state, data, rows) -> (state, metrics)``: up to K train steps in one call (a
    ``jax.lax.scan``), not yet jitted.

    ``rows`` holds one row per step, K in all: ``active`` bool ``[K]``, ``hparams`` (each a
    float32 ``[K]`` column of :meth:`Schedules.table`) and ``inputs`` (each ``[K, ...]``),
    which ``fetch(data, inputs_row)`` turns into the step's ``(images, labels)``: the batch
    itself, or a plan of the rows of ``data`` (images kept on the device). A row whose
    ``active`` is False leaves the state as it is, so a shorter call reuses the compiled
    K-step program. ``metrics``: each of ``step``'s metrics as ``[K]``, zero in inactive rows.
    """

    def multi(state: TrainState, data, rows: dict) -> tuple[TrainState, dict]:
        def run(state, row):
            return step(state, fetch(data, row["inputs"]), row["hparams"])

        first = jax.tree_util.tree_map(lambda a: a[0], rows)
        shapes = jax.eval_shape(run, state, first)[1]

        def one(state, row):
            def skip(state, row):
                return state, jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            return jax.lax.cond(row["active"], run, skip, state, row)

        return jax.lax.scan(one, state, rows)

    return multi


def make_eval_step(model: Forward, mode: str) -> Callable:
    """``eval(variables, (images, labels, mask)) -> sums`` of loss, top-1, top-5 and count
    of the forward ``model``; ``mode`` ``"eval"`` or ``"float_eval"``."""

    def step(variables: dict, batch: tuple) -> dict:
        images, labels, mask = batch
        logits = model.logits(variables, images, mode)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return {
            "loss": jnp.sum(losses * mask),
            "top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
            "top5": jnp.sum(topk_correct(logits, labels, 5) * mask),
            "count": jnp.sum(mask),
        }

    return step


def make_bn_stats_step(model: Forward) -> Callable:
    """``bn(variables, images) -> statistics``: one batch's BN means and unbiased variances,
    which the forward's ``average_bn`` turns into ``batch_stats``."""
    return model.bn_statistics


FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
    "xla_llvm_disable_expensive_passes": True,
}
"""XLA CPU options that compile a QAT step about 2x faster and run it about 4x slower."""


@dataclasses.dataclass(frozen=True)
class Sharded:
    """Jitted, mesh-partitioned versions of the steps plus the helpers that place data."""

    mesh: Mesh
    compiler_options: dict | None = None  # e.g. FAST_COMPILE for short runs on CPU

    @classmethod
    def over_all_devices(cls, *, fast_compile: bool = False) -> Sharded:
        """A one-axis mesh of every device of every process (``jax.devices()``);
        ``fast_compile`` applies ``FAST_COMPILE`` on CPU."""
        options = FAST_COMPILE if fast_compile and jax.default_backend() == "cpu" else None
        return cls(Mesh(np.asarray(jax.devices()), (DATA_AXIS,)), options)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def put_batch(self, arrays):
        """Places host arrays (this process's part of the global batch) split over devices."""
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(self.batch, np.asarray(a)), arrays
        )

    @property
    def stacked_batch(self) -> NamedSharding:
        """K steps' batches ``[K, batch, ...]``: each step's batch split as :attr:`batch`."""
        return NamedSharding(self.mesh, PartitionSpec(None, DATA_AXIS))

    def put_stacked(self, arrays):
        """Places host arrays ``[K, rows of this process, ...]`` split along their second axis."""
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(self.stacked_batch, np.asarray(a)),
            arrays,
        )

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)

    def jit_train_step(self, step: Callable) -> Callable:
        """``step(state, batch, hparams)`` jitted: batch split, the rest replicated, state donated."""
        return jax.jit(
            step,
            in_shardings=(self.replicated, self.batch, self.replicated),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
            compiler_options=self.compiler_options,
        )

    def jit_multi_step(self, step: Callable, fetch: Callable) -> Callable:
        """:func:`make_multi_step` of ``step`` jitted: each step's batch split over the
        devices, ``data``, the hparams and the state replicated, the state donated."""
        batch = self.batch

        def split_fetch(data, inputs):
            return jax.lax.with_sharding_constraint(fetch(data, inputs), batch)

        rows = {"active": self.replicated, "hparams": self.replicated, "inputs": self.stacked_batch}
        return jax.jit(
            make_multi_step(step, split_fetch),
            in_shardings=(self.replicated, self.replicated, rows),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
            compiler_options=self.compiler_options,
        )

    def jit_batch_fn(self, fn: Callable) -> Callable:
        """For ``fn(variables, batch)`` steps that return replicated results."""
        return jax.jit(
            fn,
            in_shardings=(self.replicated, self.batch),
            out_shardings=self.replicated,
            compiler_options=self.compiler_options,
        )
