"""How the training program calls a ``flax.nnx`` model quantized in place by rules: the
forward of :mod:`.forward`'s interface for NNX models.

The model itself never enters the trainer's state. :meth:`NNXForward.create` builds it twice
at start-up: the float model (for ``init``, the float phase and ``float_eval``) and a copy
quantized by :func:`oscqat_jax.nn.quantize_model` (the quantizers exist from then on); of
each it keeps the ``nnx.GraphDef`` and the state that is not the trainer's. Each call merges
a graph with the trainer's collections, pure dicts of the ``nnx.to_pure_dict`` layout (keys
as strings, ``nnx.List`` items ``"0"``, ``"1"``, ... ; the layout the Linen rules path gives
the same layers, so checkpoints, summaries and the learning-rate split read them alike):

- ``params``: the ``nnx.Param`` state (kernels, biases, BN scales, quantizer scales);
- ``batch_stats``: ``nnx.BatchStat`` (BatchNorm running mean and variance);
- ``oscillation``: :class:`~oscqat_jax.nn.nnx_layers.Oscillation` (tracking and freezing);
- ``quant_stats``: :class:`~oscqat_jax.nn.nnx_layers.QuantStats` (signedness, range sums).

Everything else is rebuilt per call from the start-up copy: the quantizers'
:class:`~oscqat_jax.nn.nnx_layers.QuantControl` (the freezing threshold and EMA momentum,
set from the call's traced float32 values, so a moving threshold never recompiles), their
:class:`~oscqat_jax.nn.nnx_layers.Dampening` terms (rewritten by every forward) and the RNG
streams (reseeded from the step's ``rng``, so dropout follows the train state's key and a
resumed run draws what an uninterrupted one draws). The quantizers' mode and static settings
are set on the merged model's layers directly: ``set_mode`` checks calibration by reading
the range accumulators, which a traced call cannot. BatchNorm and dropout switch with
``model.train()`` / ``model.eval()`` (and the model's own ``train_flag`` keyword, if named).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from oscqat_jax.nn import calibrate as calibrate_model
from oscqat_jax.nn import dampening_term, quantize_model, set_schedule
from oscqat_jax.nn.bn import _nnx_recorder, _stacked
from oscqat_jax.nn.nnx_layers import SETTINGS, Oscillation, QuantStats
from oscqat_jax.nn.nnx_quant import quantized_modules
from oscqat_jax.nn.quantizer import OSCILLATION, QUANT_STATS
from oscqat_jax.nn.rules import QuantRule
from oscqat_jax.training.forward import _abstract, load_saved_variables, with_values

FLOAT_KINDS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}
"""The float model's collections and the NNX variable types they hold."""
KINDS = {**FLOAT_KINDS, OSCILLATION: Oscillation, QUANT_STATS: QuantStats}
"""The quantized model's collections (the train state's) and their variable types."""


def _str_keys(tree):
    """A pure dict with every key a string (``nnx.List`` indices as digits)."""
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def pure_state(model: nnx.Module, kind: type) -> dict:
    """The pure dict of ``model``'s variables of type ``kind``, keys as strings."""
    return _str_keys(nnx.to_pure_dict(nnx.state(model, kind)))


def _collections(model: nnx.Module, kinds: Mapping[str, type]) -> dict:
    """``{collection: pure dict}`` of ``model`` for each collection of ``kinds``."""
    return {collection: pure_state(model, kind) for collection, kind in kinds.items()}


def _poured(state, pure: Mapping | None = None):
    """New variables for ``state``, each with its value read from the pure dict ``pure``
    (string keys; a variable whose value is a dict, as the range accumulators, takes the
    dict), or its own value when ``pure`` is None. New ones: a jitted call may set only
    variables created in its own trace."""
    flat = []
    for path, variable in nnx.to_flat_state(state):
        node = variable.get_value() if pure is None else pure
        for key in path if pure is not None else ():
            node = node[str(key)]
        flat.append((path, variable.replace(node)))
    return nnx.from_flat_state(flat)


@dataclasses.dataclass(frozen=True)
class _Graph:
    """One of the two models as the calls merge it: its graph, its state of each collection
    as built (the structure pure dicts are poured into) and the rest of its state."""

    graphdef: nnx.GraphDef
    kinds: Mapping[str, type]
    states: tuple
    rest: Any

    @classmethod
    def of(cls, model: nnx.Module, kinds: Mapping[str, type]) -> _Graph:
        graphdef, *states, rest = nnx.split(model, *kinds.values(), ...)
        return cls(graphdef, kinds, tuple(states), rest)

    def merge(self, variables: Mapping[str, Any], rng: jax.Array | None = None) -> nnx.Module:
        """The model holding ``variables`` (pure dicts; a collection not given keeps its
        start-up values), its RNG streams reseeded from ``rng`` when given."""
        states = [
            _poured(state, variables.get(collection))
            for collection, state in zip(self.kinds, self.states, strict=True)
        ]
        model = nnx.merge(self.graphdef, *states, _poured(self.rest))
        if rng is not None:
            streams = {s.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)}
            if streams:
                key = jax.random.wrap_key_data(rng) if rng.dtype == jnp.uint32 else rng
                nnx.reseed(model, **dict.fromkeys(streams, key))
        return model

    def pure(self, model: nnx.Module, collections: Iterable[str]) -> dict:
        return _collections(model, {c: self.kinds[c] for c in collections})


def _set_quantizers(model: nnx.Module, mode: str, **settings) -> None:
    """The quantizers' mode (``"train"``, ``"eval"``) and static settings, without
    ``set_mode``'s calibration check (it reads traced range accumulators)."""
    for module in quantized_modules(model).values():
        current = dict(zip(SETTINGS, module.quant_settings, strict=True))
        current.update(settings)
        module.quant_mode = mode
        module.quant_settings = tuple(current[k] for k in SETTINGS)


@dataclasses.dataclass(frozen=True)
class NNXForward:
    """A ``flax.nnx`` model quantized in place by rules, called as ``model(images)`` (and
    ``train_flag=True/False`` when ``train_flag`` names such a keyword); built by
    :meth:`create`. The float modes run the user's model untouched."""

    build: Callable[[nnx.Rngs], nnx.Module]  # the float model for a seed's nnx.Rngs
    rules: tuple[QuantRule, ...]
    float_graph: _Graph
    graph: _Graph
    quantized_state: dict  # the quantized model's collections as quantize_model left them
    train_flag: str = ""
    has_batchnorm: bool = True
    description: str = ""

    @classmethod
    def create(
        cls,
        build: Callable[[nnx.Rngs], nnx.Module],
        rules: Sequence[QuantRule],
        *,
        train_flag: str = "",
        description: str = "",
    ) -> NNXForward:
        """Builds the float model (``build(nnx.Rngs(0))``) and a copy quantized by
        ``rules``; raises quantize_model's ValueError when the rules do not fit."""
        model = build(nnx.Rngs(0))
        float_graph = _Graph.of(model, FLOAT_KINDS)
        quantized = quantize_model(nnx.clone(model), list(rules))
        graph = _Graph.of(quantized, KINDS)
        has_bn = any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model))
        return cls(
            build,
            tuple(rules),
            float_graph,
            graph,
            _collections(quantized, KINDS),
            train_flag=train_flag,
            has_batchnorm=has_bn,
            description=description,
        )

    def _call(self, model: nnx.Module, images: jax.Array, training: bool) -> jax.Array:
        model.train() if training else model.eval()
        return model(images, **({self.train_flag: training} if self.train_flag else {}))

    def init(self, key: jax.Array, images: jax.Array) -> dict:
        """The float model's ``params`` and ``batch_stats``, its ``nnx.Rngs`` seeded by ``key``."""
        del images
        return _collections(self.build(nnx.Rngs(key)), FLOAT_KINDS)

    def train(self, variables, images, *, mode, osc, freeze_threshold, dampen, track, rng):
        if mode == "float_train":
            model = self.float_graph.merge(variables, rng)
            logits = self._call(model, images, True)
            return logits, self.float_graph.pure(model, ["batch_stats"]), _no_dampening()
        model = self.graph.merge(variables, rng)
        _set_quantizers(
            model,
            "train",
            use_ema_freeze=osc.use_ema_freeze,
            dampening_aggregation=osc.dampening_aggregation,
            track_oscillations=track,
            dampen=dampen,
        )
        set_schedule(model, freeze_threshold=freeze_threshold, osc_momentum=osc.momentum)
        logits = self._call(model, images, True)
        updates = self.graph.pure(model, ["batch_stats", *([OSCILLATION] if track else [])])
        return logits, updates, dampening_term(model) if dampen else _no_dampening()

    def logits(self, variables, images, mode: str) -> jax.Array:
        if mode == "float_eval":
            return self._call(self.float_graph.merge(variables), images, False)
        model = self.graph.merge(variables)
        _set_quantizers(model, "eval")
        return self._call(model, images, False)

    def bn_statistics(self, variables, images) -> dict:
        """One batch's BN means and unbiased variances, as ``batch_stats`` (each BatchNorm
        normalising with the batch's statistics, the quantizers in eval: docs/method.md §8;
        the recorder of :func:`oscqat_jax.nn.reestimate_bn_nnx`)."""
        model = self.graph.merge(variables)
        _set_quantizers(model, "eval")
        layers = {
            "/".join(map(str, path)): bn
            for path, bn in nnx.iter_modules(model)
            if isinstance(bn, nnx.BatchNorm)
        }
        records: list = []
        for path, bn in layers.items():
            bn.promote_dtype = _nnx_recorder(bn, path, bn.promote_dtype, records)
        self._call(model, images, False)
        stats = {}
        for path, (means, variances) in _stacked(records).items():
            node = stats
            for key in path.split("/"):
                node = node.setdefault(key, {})
            # A layer called several times per batch: the average of its calls.
            node.update(mean=jnp.mean(means, axis=0), var=jnp.mean(variances, axis=0))
        return stats

    def average_bn(self, per_batch: list) -> dict:
        """The plain average over batches (each of one batch's statistics)."""
        return jax.tree_util.tree_map(lambda *v: jnp.mean(jnp.stack(v), axis=0), *per_batch)

    def calibrate(self, variables, batches: Iterable, key, compiler_options=None) -> dict:
        """The quantized model's variables (as ``quantize_model`` made them) around the float
        ``variables``, the ranges then set on ``batches`` (``calibrate`` of an NNX model,
        jitted by it; ``key`` and ``compiler_options`` are not used: nothing is drawn)."""
        del key, compiler_options
        model = self.graph.merge(with_values(self.quantized_state, jax.device_get(variables)))
        calibrate_model(model, batches)
        return self.graph.pure(model, KINDS)

    def template(self, key, image_shape, first_batch: Callable) -> dict:
        """The shapes of calibrated variables: those ``quantize_model`` created."""
        del key, image_shape, first_batch
        return _abstract(self.quantized_state)

    def load_pretrained(self, path: str, variables: dict, layout: str) -> dict:
        del layout  # a file of this program (float_train.save_weights) has one layout
        return load_saved_variables(path, variables)

    def bound(self, variables: Mapping[str, Any]) -> nnx.Module:
        """The quantized model holding ``variables`` (host arrays), in eval: what both
        export formats take, since an NNX model holds its own variables."""
        model = self.graph.merge(jax.device_get(dict(variables)))
        _set_quantizers(model, "eval")
        model.eval()
        return model

    def native_export(self, variables: Mapping[str, Any]) -> dict:
        """Keyword arguments of :func:`oscqat_jax.export.export_model` besides the path and
        the input shape (the variables are in the model)."""
        if self.train_flag:
            raise ValueError(_NO_FLAG_EXPORT.format(flag=self.train_flag))
        return dict(model=self.bound(variables))

    def onnx_export(self, variables: Mapping[str, Any]) -> tuple[Any, dict]:
        """The model (holding ``variables``) and keyword arguments of ``export_model_onnx``."""
        return self.bound(variables), self._flag_kwargs()

    def _flag_kwargs(self) -> dict:
        return {self.train_flag: False} if self.train_flag else {}


_NO_FLAG_EXPORT = (
    "The native export calls an NNX model as model(images), but this one takes the keyword "
    "{flag!r} (config.model.train_flag); export it with --format=onnx, or drop the keyword."
)


def _no_dampening() -> jax.Array:
    return jnp.zeros((), jnp.float32)
