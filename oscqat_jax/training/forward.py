"""How the training program calls a model: one interface, two implementations.

The steps (:mod:`.step`), the phases and the evaluation never call a model themselves; they
call a *forward*, an object with these methods (``variables`` as ``Module.apply`` takes them,
``images`` a float32 batch ``(N, H, W, C)``, logits ``(N, classes)``):

- ``init(key, images) -> variables``: the float model's variables (no quantizers);
- ``train(variables, images, *, mode, osc, freeze_threshold, dampen, track, rng)``, which
  returns ``(logits, updates, dampening)``: one train forward, ``mode`` ``"train"`` (QAT) or
  ``"float_train"``; ``updates`` holds the collections the call changed (``batch_stats``,
  ``oscillation`` while ``track``), ``dampening`` the float32 dampening term (zero unless
  ``dampen``, docs/method.md §7). ``freeze_threshold`` may be traced (docs/method.md §6);
- ``logits(variables, images, mode)``: inference, ``mode`` ``"eval"`` or ``"float_eval"``;
- ``bn_statistics(variables, images)`` and ``average_bn(per_batch) -> batch_stats``: BN
  re-estimation (docs/method.md §8), one batch at a time so each batch runs jitted over the
  device mesh;
- ``calibrate(variables, batches, key, compiler_options) -> variables``: the quantizers added
  to float ``variables`` and their ranges set on ``batches`` (docs/method.md §3);
- ``template(key, image_shape, first_batch)``: the shapes of calibrated variables (a
  checkpoint's layout);
- ``load_pretrained(path, variables, layout)``; ``native_export`` and ``onnx_export``: the
  arguments of the two export formats; ``has_batchnorm``; ``description``.

:class:`RulesForward` runs any ``flax.linen`` model quantized by rules
(:func:`oscqat_jax.nn.quantize_model`): the training program's forward for the package's
families (plain Flax models, :mod:`oscqat_jax.models`) and for a user's own model
(:mod:`.models`); :class:`~.nnx_forward.NNXForward` runs a ``flax.nnx`` model. :class:`Forward`
is the interface both satisfy, what the steps, phases and evaluation take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax.nn import QuantizedModel, reestimate_bn
from oscqat_jax.nn.quantizer import OSCILLATION


def _no_dampening() -> jax.Array:
    return jnp.zeros((), jnp.float32)


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


class Forward(Protocol):
    """What the steps, phases and evaluation call (the module docstring says what each
    method takes and returns): :class:`RulesForward` or :class:`~.nnx_forward.NNXForward`.
    The two exports' arguments differ between them and are not part of it."""

    has_batchnorm: bool
    description: str

    def init(self, key: jax.Array, images: jax.Array) -> dict: ...

    def train(
        self, variables, images, *, mode, osc, freeze_threshold, dampen, track, rng
    ) -> tuple[jax.Array, dict, jax.Array]: ...

    def logits(self, variables, images, mode: str) -> jax.Array: ...

    def bn_statistics(self, variables, images) -> dict: ...

    def average_bn(self, per_batch: list) -> dict: ...

    def calibrate(self, variables, batches: Iterable, key, compiler_options=None) -> dict: ...

    def template(self, key, image_shape, first_batch: Callable) -> dict: ...

    def load_pretrained(self, path: str, variables: dict, layout: str) -> dict: ...


@dataclasses.dataclass(frozen=True)
class RulesForward:
    """A ``flax.linen`` model quantized by rules, called as Flax's examples call their
    models: ``model.apply(variables, images, train=...)``; ``train_flag`` names that keyword
    ("" for a model without one). The float modes run the user's model untouched."""

    quantized: QuantizedModel
    train_flag: str = "train"
    has_batchnorm: bool = True
    description: str = ""
    # One of the package's families: ``model.pretrained`` is a PyTorch checkpoint in one of
    # the converter's layouts (oscqat_jax.convert); otherwise a file of float_train.save_weights.
    pytorch_layouts: bool = False

    @property
    def model(self) -> nn.Module:
        return self.quantized.model

    def _flag(self, training: bool) -> dict:
        return {self.train_flag: training} if self.train_flag else {}

    def init(self, key: jax.Array, images: jax.Array) -> dict:
        return dict(self.model.init(key, images, **self._flag(False)))

    def train(self, variables, images, *, mode, osc, freeze_threshold, dampen, track, rng):
        mutable = ["batch_stats"] if self.has_batchnorm else []
        rngs = {"dropout": rng}
        if mode == "float_train":
            out = self.model.apply(
                variables, images, mutable=mutable or False, rngs=rngs, **self._flag(True)
            )
            logits, mutated = out if mutable else (out, {})
            return logits, dict(mutated), _no_dampening()
        logits, aux = self.quantized.apply(
            variables,
            images,
            mode="train",
            freeze_threshold=freeze_threshold,
            osc_momentum=osc.momentum,
            use_ema_freeze=osc.use_ema_freeze,
            dampening_aggregation=osc.dampening_aggregation,
            mutable=mutable,
            rngs=rngs,
            **self._flag(True),
        )
        updates = dict(aux.updates)
        if not track:  # the tracking state stays as calibrated: nothing oscillates or freezes
            updates.pop(OSCILLATION, None)
        return logits, updates, aux.dampening if dampen else _no_dampening()

    def logits(self, variables, images, mode: str) -> jax.Array:
        if mode == "float_eval":
            return self.model.apply(variables, images, **self._flag(False))
        return self.quantized.apply(variables, images, mode="eval", **self._flag(False))

    def bn_statistics(self, variables, images) -> dict:
        """One batch's BN means and unbiased variances, as ``batch_stats``."""
        one = reestimate_bn(self.quantized, variables, [images], max_batches=1, **self._flag(False))
        return one["batch_stats"]

    def average_bn(self, per_batch: list) -> dict:
        """The plain average over batches (each of one batch's statistics)."""
        return jax.tree_util.tree_map(lambda *v: jnp.mean(jnp.stack(v), axis=0), *per_batch)

    def calibrate(self, variables, batches: Iterable, key, compiler_options=None) -> dict:
        """The rules' quantizer variables (``QuantizedModel.init``, ``key`` seeding them)
        around the float ``variables``, their ranges then set on ``batches``."""
        batches = iter(batches)
        first = next(batches)
        image = jnp.zeros((1, *first.shape[1:]), jnp.float32)
        init = jax.jit(
            lambda k: self.quantized.init(k, image, **self._flag(False)),
            compiler_options=compiler_options,
        )
        variables = with_values(jax.device_get(init(key)), variables)
        return self.quantized.calibrate(
            variables,
            _chain(first, batches),
            compiler_options=compiler_options,
            **self._flag(False),
        )

    def template(self, key, image_shape, first_batch: Callable) -> dict:
        """The shapes of calibrated variables: the range estimators appear only with a
        calibration, so one runs on the batch ``first_batch()`` returns."""
        images = first_batch()
        floats = jax.jit(self.init)(key, jnp.zeros((1, *image_shape), jnp.float32))
        return _abstract(self.calibrate(floats, [images], key))

    def load_pretrained(self, path: str, variables: dict, layout: str) -> dict:
        """``variables`` with the float weights of ``path``: a PyTorch checkpoint of a
        package family in ``layout``, or a file of ``float_train.save_weights`` (which has
        one layout) for any other model."""
        if self.pytorch_layouts:
            from oscqat_jax import convert

            return convert.load_pretrained(path, self.model, variables, layout=layout)
        return load_saved_variables(path, variables)

    def native_export(self) -> dict:
        return dict(model=self.quantized, **self._flag(False))

    def onnx_export(self) -> tuple[Any, dict]:
        return self.quantized, self._flag(False)


def _chain(first, rest):
    yield first
    yield from rest


def with_values(tree: Mapping, values: Mapping) -> dict:
    """``tree`` with every leaf that ``values`` also holds (same path) replaced by it."""
    flat = traverse_util.flatten_dict(dict(tree))
    new = traverse_util.flatten_dict(dict(values))
    flat.update({k: v for k, v in new.items() if k in flat})
    return traverse_util.unflatten_dict(flat)


def load_saved_variables(path: str, variables: Mapping) -> dict:
    """``variables`` with ``params`` and ``batch_stats`` read from a file written by
    ``float_train.save_weights``; one sentence when the file's arrays are not exactly the
    model's (names and shapes)."""
    from oscqat_jax import weight_files

    arrays, _ = weight_files.read(path)
    wanted = {
        "/".join((collection, *k)): np.shape(v)
        for collection in ("params", "batch_stats")
        for k, v in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items()
    }
    found = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    if found != wanted:
        differ = sorted(k for k in found.keys() | wanted.keys() if found.get(k) != wanted.get(k))
        raise ValueError(
            f"config.model.pretrained = {path!r} does not hold this model's weights ({differ[0]}: "
            f"{found.get(differ[0], 'absent')} in the file, {wanted.get(differ[0], 'absent')} "
            "in the model); name a file that float_train.save_weights wrote for this model."
        )
    out = dict(variables)
    for collection in ("params", "batch_stats"):
        flat = {
            tuple(k.split("/")[1:]): jnp.asarray(v)
            for k, v in arrays.items()
            if k.split("/")[0] == collection
        }
        if flat:
            out[collection] = traverse_util.unflatten_dict(flat)
    return out
