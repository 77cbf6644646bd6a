"""The native export of a Linen model quantized by rules (``oscqat_jax.nn.quantize_model``):
every site the rules quantize stored as :mod:`oscqat_jax.export.tensors` stores it, and the
manifest's ``"kind": "rules"`` with the rules and the model's keyword arguments of the traced
call, so that loading can check a file against the model it is given
(:mod:`oscqat_jax.export.native`).

BatchNorm is folded where the model says the conv and its BN are one site
(:class:`~oscqat_jax.nn.convbn.ConvBN`, docs/method.md §4): a quantized ConvBN site stores its
trained integers, its weight scale times ``gamma / sqrt(var + eps)`` per output channel (or,
with a rule's ``fold_bn``, the integers and scale of the already folded kernel) and one
``folded_bias`` per channel instead of the BN's parameters and statistics (format version 5).
A user's own separate BatchNorm is left unfolded, wherever the model applies it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
from collections.abc import Mapping
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax.export import fileformat, tensors
from oscqat_jax.nn import batchnorm, collect
from oscqat_jax.nn.convbn import ConvBN
from oscqat_jax.nn.intercept import QuantizedModel
from oscqat_jax.nn.quantizer import OSCILLATION, QUANT_STATS


def _rules_json(qmodel: QuantizedModel) -> list:
    return [fileformat.to_json("rules", dataclasses.asdict(rule)) for rule in qmodel.rules]


def _check_rules_model(model, what: str) -> None:
    if not isinstance(model, QuantizedModel):
        raise ValueError(
            f"{what} takes model=<a QuantizedModel from oscqat_jax.nn.quantize_model>, got "
            f"{type(model).__name__}."
        )


class _ConvBNCall(NamedTuple):
    """What the traced call of a ConvBN site says about its BN: the epsilon, and whether it
    normalised with batch statistics (``train``) instead of the running ones."""

    epsilon: float
    train: bool


@contextlib.contextmanager
def _recording_conv_bns(found: dict[str, _ConvBNCall]):
    """Within it, every call of a :class:`ConvBN` records ``{path: _ConvBNCall}`` in ``found``."""

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, ConvBN) and context.method_name == "__call__":
            train = args[1] if len(args) > 1 else kwargs.get("train", False)
            found["/".join(module.scope.path)] = _ConvBNCall(float(module.bn_epsilon), bool(train))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        yield


def _folded_sites(plan: Mapping, calls: Mapping[str, _ConvBNCall]) -> dict[str, _ConvBNCall]:
    """The ConvBN sites whose kernel the rules quantize (their BN is folded), with their
    calls; one sentence if one normalises with batch statistics, which no fold reproduces."""
    quantized = [s for s, lq in plan.items() if lq.kind == "conv_bn" and lq.weight.enabled]
    unseen = sorted(set(quantized) - set(calls))
    if unseen:
        raise ValueError(
            f"The ConvBN site {unseen[0]} was not called as a ConvBN module in the traced "
            "call, so its BatchNorm cannot be folded; call ConvBN modules directly."
        )
    sites = {site: calls[site] for site in quantized}
    training = sorted(site for site, call in sites.items() if call.train)
    if training:
        raise ValueError(
            f"The ConvBN site {training[0]} normalises with batch statistics in the traced "
            "call; export with the model's inference arguments (e.g. train=False)."
        )
    return sites


def _fold_kind(plan: Mapping, site: str) -> str:
    """Where a ConvBN site's BN multiplier goes (:class:`tensors.Fold`): into the stored
    scale, or already into the kernel the rule's ``fold_bn`` quantizes."""
    rule = plan[site].rule
    return "kernel" if rule is not None and rule.fold_bn else "scale"


def _folded_keys(site: str) -> tuple[str, ...]:
    """The file keys a folded ConvBN site does not store: the float kernel (its integers are
    stored), the conv's bias and the BN's parameters and statistics."""
    return (
        f"params/{site}/conv/kernel",
        f"params/{site}/conv/bias",
        f"params/{site}/bn/scale",
        f"params/{site}/bn/bias",
        f"batch_stats/{site}/bn/mean",
        f"batch_stats/{site}/bn/var",
    )


def _bn_folds(
    plan: Mapping, sites: Mapping[str, _ConvBNCall], params: Mapping, batch_stats: Mapping
) -> dict[str, tensors.Fold]:
    """``{site: fold}`` of the folded ConvBN sites, from the running statistics and each BN's
    epsilon, as the eval forward computes them (:func:`oscqat_jax.nn.batchnorm.fold`)."""
    if not sites:
        return {}
    stats = {
        site: batchnorm.BNStatistics(
            batch_stats[f"{site}/bn/mean"],
            batch_stats[f"{site}/bn/var"],
            params[f"{site}/bn/scale"],
            params[f"{site}/bn/bias"],
        )
        for site in sites
    }
    biases = {
        site: params.get(f"{site}/conv/bias", np.zeros(np.shape(stats[site].mean), np.float32))
        for site in sites
    }
    epsilons = {site: call.epsilon for site, call in sites.items()}
    folded = jax.jit(
        lambda stats, biases: {
            site: batchnorm.fold(stats[site], epsilons[site], biases[site]) for site in stats
        }
    )(stats, biases)
    return {
        site: tensors.Fold(
            np.asarray(mul, np.float32), np.asarray(offset, np.float32), _fold_kind(plan, site)
        )
        for site, (mul, offset) in folded.items()
    }


def export_rules_model(
    path, qmodel: QuantizedModel, variables: Mapping, input_shape, call_kwargs: dict
) -> dict:
    """:func:`export_model` of a model quantized by rules (module docstring)."""
    _check_rules_model(qmodel, "export_model")
    path = tensors.check_suffix(path)
    input_shape = fileformat.check_input_shape(input_shape)
    fileformat.check_variables(variables)
    image = np.zeros((1, *input_shape), np.float32)
    x = jax.ShapeDtypeStruct(image.shape, jnp.float32)
    calls: dict[str, _ConvBNCall] = {}

    def trace():
        with _recording_conv_bns(calls):
            return jax.eval_shape(
                lambda v, x: qmodel.model.apply(v, x, **call_kwargs), variables, x
            )

    fileformat.fitting(input_shape, trace)
    site_plans = qmodel.plan(image, **call_kwargs)
    sites = _folded_sites(site_plans, calls)
    plan = {site: (fileformat.RULES_KIND, lq) for site, lq in site_plans.items()}
    variables = flax.core.unfreeze(variables)
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    quant_stats = traverse_util.flatten_dict(variables.get(QUANT_STATS, {}), sep="/")
    tensors.check_calibrated(plan, params, quant_stats)
    weights = collect.quantized_weights(qmodel, variables, image, **call_kwargs)
    batch_stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
    return write_by_rules(
        path,
        {"kind": fileformat.RULES_KIND, "name": type(qmodel.model).__name__},
        _rules_json(qmodel),
        {k: fileformat.to_json(k, v) for k, v in call_kwargs.items()},
        input_shape,
        plan,
        params,
        quant_stats,
        weights,
        traverse_util.flatten_dict(variables.get(OSCILLATION, {}), sep="/"),
        batch_stats,
        folds=_bn_folds(site_plans, sites, params, batch_stats),
    )


def write_by_rules(
    path,
    model_entry: dict,
    rules_json: list,
    call_kwargs: dict,
    input_shape,
    plan: Mapping,
    params: Mapping,
    quant_stats: Mapping,
    weights: Mapping,
    oscillation_state: Mapping,
    batch_stats: Mapping,
    *,
    folds: Mapping[str, tensors.Fold] | None = None,
) -> dict:
    """Writes the file of a model quantized by rules (Linen or NNX; flat ``/``-keyed
    collections, ``plan`` as ``{site: (kind, SitePlan)}``, ``folds`` the ConvBN sites whose
    BN is folded); returns its manifest."""
    folds = folds or {}
    arrays, weight_entries = tensors.weight_arrays(weights, plan, oscillation_state, folds)
    float_arrays, activation_entries = tensors.param_arrays(params, set(weights), plan, quant_stats)
    dropped = {key for site in folds for key in _folded_keys(site)}
    arrays.update({k: v for k, v in float_arrays.items() if k not in dropped})
    for key, value in batch_stats.items():
        if f"batch_stats/{key}" not in dropped:
            arrays[f"batch_stats/{key}"] = np.asarray(value, np.float32)
    manifest = {
        "format": fileformat.FORMAT,
        "format_version": fileformat.FORMAT_VERSION,
        "model": {**model_entry, "num_classes": None, "options": {}},
        "rules": rules_json,
        "call_kwargs": call_kwargs,
        "quant_setup": None,
        "input_shape": list(input_shape),
        "weights": weight_entries,
        "activations": activation_entries,
    }
    return tensors.write(path, arrays, manifest)


def load_rules_model(path: pathlib.Path, qmodel, arrays: Mapping, manifest: dict) -> dict:
    """The variables of a (digest-checked) rules export for ``qmodel``, after checking that
    the file is one of ``qmodel``: its kind, rules, tensors, bit widths and folded sites."""
    name = manifest["model"].get("name")
    if qmodel is None:
        raise ValueError(
            f"{path} holds the model {name} quantized by rules; pass that QuantizedModel: "
            "load_export(path, model=qmodel)."
        )
    _check_rules_model(qmodel, "load_export")
    if manifest.get("rules") != _rules_json(qmodel):
        raise ValueError(
            f"{path} was exported with other quantization rules than the QuantizedModel given; "
            "pass the model it was exported from."
        )
    call_kwargs = {
        k: fileformat.from_json(k, v) for k, v in manifest.get("call_kwargs", {}).items()
    }
    arrays, packed_layers = fileformat.unpacked_kernels(path, arrays, manifest)
    x = jax.ShapeDtypeStruct((1, *(int(d) for d in manifest["input_shape"])), jnp.float32)
    abstract = jax.eval_shape(functools.partial(qmodel.init, **call_kwargs), jax.random.key(0), x)
    calls: dict[str, _ConvBNCall] = {}
    with _recording_conv_bns(calls):
        jax.eval_shape(functools.partial(qmodel.model.init, **call_kwargs), jax.random.key(0), x)
    plan = qmodel.plan(x, **call_kwargs)
    sites = _folded_sites(plan, calls)
    _check_folds(path, manifest, {site: _fold_kind(plan, site) for site in sites})
    shapes = {}
    for collection in ("params", "batch_stats", QUANT_STATS):
        for key, leaf in traverse_util.flatten_dict(abstract.get(collection, {}), sep="/").items():
            layer, leaf_name = tensors.split_key(key)
            if collection == "params" and leaf_name == "kernel" and layer in manifest["weights"]:
                key = tensors.join(layer, fileformat.KERNEL_INT)
            if collection != QUANT_STATS or leaf_name.endswith("_signed"):
                shapes[f"{collection}/{key}"] = tuple(leaf.shape)
    fileformat.check_tensors(path, arrays, _stored_shapes(shapes, manifest["weights"], sites))
    bits = {site: lq.weight.n_bits for site, lq in plan.items() if lq.weight.enabled}
    fileformat.check_bits(path, manifest["weights"], bits, arrays)
    fileformat.check_packing(path, manifest, packed_layers)
    params, collections = tensors.stored_collections(arrays)
    for site, call in sites.items():
        _unfold_site(
            site, manifest["weights"][site]["bn"], call.epsilon, shapes, params, collections
        )
    kernel_keys = {site: f"{site}/conv/kernel" for site in sites}
    variables = tensors.with_kernels(
        path, manifest, arrays, params, collections, kernel_keys=kernel_keys
    )
    # The file holds trained scales, not range accumulators: mark every quantizer as
    # calibrated (a counter without an accumulator, which a later calibration restarts).
    for site, lq in plan.items():
        for q in ("weight", "input", "output"):
            if getattr(lq, q).enabled:
                variables[QUANT_STATS][f"{site}/{q}_range"] = {"num_batches": np.int32(1)}
    return tensors.nested(variables, keep_empty=False)


def _check_folds(path: pathlib.Path, manifest: dict, expected: Mapping[str, str]) -> None:
    """The manifest folds exactly the ConvBN sites the model's rules quantize, each the way
    its rule says; a file of a version before the ConvBN sites were folded is refused if the
    model has any."""
    version = manifest["format_version"]
    if expected and version < fileformat.FOLDED_RULES_SINCE:
        raise ValueError(
            f"{path} is an export of format version {version}, which stores the ConvBN sites "
            f"of a model quantized by rules unfolded, and this code reads them from version "
            f"{fileformat.FOLDED_RULES_SINCE} on; export the model again with this version."
        )
    for layer in sorted(set(expected) | set(manifest["weights"])):
        entry = manifest["weights"].get(layer)
        listed = entry.get("bn") if isinstance(entry, dict) else None
        if listed != expected.get(layer):
            said = (
                f"folds the BN of {layer} into the {listed!r}"
                if listed
                else (f"does not fold the BN of {layer}")
            )
            does = (
                f"folds it into the {expected[layer]!r}"
                if layer in expected
                else "has no quantized ConvBN site there"
            )
            raise ValueError(
                f"{path}: its manifest {said}, but the model given {does}; export the model again."
            )


def _stored_shapes(
    shapes: Mapping[str, tuple], weight_entries: Mapping[str, dict], sites: Mapping
) -> dict[str, tuple]:
    """The tensors a file holds for the model of variable shapes ``shapes``: those of the
    model, except that a folded ConvBN site has its integers at ``<site>/kernel_int``, a
    ``folded_bias`` ``(out,)``, a ``weight_scale`` ``(out,)`` when folded into the scale,
    and no BN or float kernel."""
    stored = dict(shapes)
    for site in sites:
        kernel = stored[f"params/{site}/conv/kernel"]
        for key in _folded_keys(site):
            stored.pop(key, None)
        stored[f"params/{site}/{fileformat.KERNEL_INT}"] = kernel
        out = (kernel[-1],)
        stored[f"params/{site}/{fileformat.FOLDED_BIAS}"] = out
        if weight_entries[site]["bn"] == "scale":
            stored[f"params/{site}/weight_scale"] = out
    return stored


def _unfold_site(
    site: str, into: str, epsilon: float, shapes: Mapping, params: dict, collections: dict
) -> None:
    """A folded ConvBN site of a (checked) file as the model's variables, in place
    (:func:`tensors.unfolded_bn`)."""
    unfolded = tensors.unfolded_bn(
        params.pop(f"{site}/{fileformat.FOLDED_BIAS}"),
        params[f"{site}/weight_scale"],
        into,
        shapes[f"params/{site}/weight_scale"],
        epsilon,
    )
    params[f"{site}/weight_scale"] = unfolded.weight_scale
    params[f"{site}/bn/scale"] = unfolded.gamma
    params[f"{site}/bn/bias"] = unfolded.beta
    if f"params/{site}/conv/bias" in shapes:
        params[f"{site}/conv/bias"] = np.zeros_like(unfolded.beta)
    collections["batch_stats"][f"{site}/bn/mean"] = unfolded.mean
    collections["batch_stats"][f"{site}/bn/var"] = unfolded.var
