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
families (plain Flax models, :mod:`oscqat_jax.models.plain`) and for a user's own model
(:mod:`.models`). :class:`PackageForward` runs the package's ctx models
(``model.apply(v, x, ctx)``); the training program no longer builds them, and it goes with
them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax.nn import QuantizedModel, api, collect, reestimate_bn
from oscqat_jax.nn.batchnorm import BN_BATCH_STATS
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.quantizer import DAMPENING, OSCILLATION


def _no_dampening() -> jax.Array:
    return jnp.zeros((), jnp.float32)


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@dataclasses.dataclass(frozen=True)
class PackageForward:
    """One of the package's models (:func:`oscqat_jax.models.create_model`), called as
    ``model.apply(variables, images, QuantContext)``: ``model`` quantized, ``float_model``
    (the same architecture without quantizers) for the float modes and ``init``."""

    model: nn.Module
    float_model: nn.Module | None = None  # None: ``model`` serves the float modes too
    export_arguments: Mapping[str, Any] | None = None  # create_model's, for the native export
    description: str = ""

    has_batchnorm = True

    def _module(self, mode: str) -> nn.Module:
        floating = mode.startswith("float") and self.float_model is not None
        return self.float_model if floating else self.model

    def init(self, key: jax.Array, images: jax.Array) -> dict:
        module = self._module("float_eval")
        return dict(module.init(key, images, QuantContext.create("float_eval")))

    def train(self, variables, images, *, mode, osc, freeze_threshold, dampen, track, rng):
        mutable = ["batch_stats"]
        if track:
            mutable.append(OSCILLATION)
        if dampen:
            mutable.append(DAMPENING)
        ctx = QuantContext.create(
            mode,
            freeze_threshold=freeze_threshold,
            osc_momentum=osc.momentum,
            use_ema_freeze=osc.use_ema_freeze,
            dampening_aggregation=osc.dampening_aggregation,
            # Static: the layers check that the collections these need are mutable.
            dampen=dampen,
            track_oscillations=track,
        )
        logits, mutated = self._module(mode).apply(
            variables, images, ctx, mutable=mutable, rngs={"dropout": rng}
        )
        damp = collect.dampening_total(mutated) if dampen else _no_dampening()
        return logits, mutated, damp

    def logits(self, variables, images, mode: str) -> jax.Array:
        return self._module(mode).apply(variables, images, QuantContext.create(mode))

    def bn_statistics(self, variables, images) -> dict:
        """One batch's BN means and unbiased variances (the ``bn_stats`` mode's collection)."""
        ctx = QuantContext.create("bn_stats")
        _, mutated = self.model.apply(variables, images, ctx, mutable=[BN_BATCH_STATS])
        return mutated[BN_BATCH_STATS]

    def average_bn(self, per_batch: list) -> dict:
        return collect.reestimated_batch_stats(per_batch)

    def calibrate(self, variables, batches: Iterable, key, compiler_options=None) -> dict:
        step = api.calibration_step(self.model)
        fn = jax.jit(lambda v, x, k: step(v, (x,), k), compiler_options=compiler_options)
        for images in batches:
            variables = fn(variables, images, key)
        return variables

    def template(self, key, image_shape, first_batch: Callable) -> dict:
        """The shapes of calibrated variables, computed abstractly (nothing runs)."""
        del first_batch
        x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        floats = jax.eval_shape(self.init, key, x)
        step = api.calibration_step(self.model)
        return jax.eval_shape(lambda v, x, k: step(v, (x,), k), floats, x, key)

    def load_pretrained(self, path: str, variables: dict, layout: str) -> dict:
        from oscqat_jax import convert

        return convert.load_pretrained(path, self._module("float_eval"), variables, layout=layout)

    def native_export(self) -> dict:
        """Keyword arguments of :func:`oscqat_jax.export.export_model` besides the path,
        the variables and the input shape."""
        return dict(self.export_arguments or {})

    def onnx_export(self) -> tuple[Any, dict]:
        """The model and keyword arguments of :func:`export_model_onnx`."""
        return self.model, {}


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
        return self.quantized.calibrate(variables, _chain(first, batches), **self._flag(False))

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


Forward = PackageForward | RulesForward
"""What the steps call (module docstring)."""


def as_forward(model) -> Forward:
    """``model`` as a forward: a forward itself, or one of the package's modules (serving
    every mode, as the steps took them before forwards)."""
    if isinstance(model, (PackageForward, RulesForward)):
        return model
    if isinstance(model, nn.Module):
        return PackageForward(model)
    if callable(getattr(model, "train", None)) and callable(getattr(model, "logits", None)):
        return model  # a forward of its own module (nnx_forward.NNXForward imports this one)
    raise ValueError(f"Expected a forward or a package model, got {type(model).__name__}.")
