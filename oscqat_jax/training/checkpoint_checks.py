"""What a checkpoint is compared with before it is restored (:mod:`.checkpoint`): the format
of its variable layout (:data:`FORMAT_VERSION`), the config fields whose recorded values
changed, in one line, and the leaves of the saved state that do not fit the state a config
builds (path, shape, dtype), named in one sentence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax

_NOT_SET = "(not recorded)"

FORMAT_VERSION = 2
"""The layout of the saved variables, recorded in every checkpoint's metadata: 1 (metadata
without a version) for the package's ctx models, 2 since the training program runs the plain
Flax models (``oscqat_jax.models``: a ConvBN's kernel at ``<layer>/conv/kernel``, output
quantizers at ``<layer>_out/output_scale``)."""
VERSION_KEY = "format_version"
_UNVERSIONED = 1


def check_version(directory: str, step: int, saved: Mapping[str, Any]) -> None:
    """Raises ValueError when the metadata ``saved`` records another :data:`FORMAT_VERSION`
    (none recorded: version 1), before the state is read."""
    version = saved.get(VERSION_KEY, _UNVERSIONED) if "fixed" in saved else _UNVERSIONED
    if version == FORMAT_VERSION:
        return
    why = (
        "the variable paths of the package's models changed since"
        if version < FORMAT_VERSION
        else "a newer oscqat_jax wrote it"
    )
    raise ValueError(
        f"The checkpoint of step {step} in {directory} has checkpoint format {version} and "
        f"this program reads format {FORMAT_VERSION} ({why}), so it cannot be resumed, "
        "evaluated or exported; train again in another --workdir, or use the oscqat_jax "
        "version that wrote it."
    )


def changes(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """The fields whose values differ, as ``"field old → new, ..."`` (empty if none)."""
    saved, wanted = _flatten(saved), _flatten(wanted)
    keys = sorted(
        k for k in saved.keys() | wanted.keys() if saved.get(k, _NOT_SET) != wanted.get(k, _NOT_SET)
    )
    return ", ".join(
        f"{k} {_show(saved.get(k, _NOT_SET))} → {_show(wanted.get(k, _NOT_SET))}" for k in keys
    )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (so messages name ``quant.n_bits``)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_fits(directory: str, step: int, saved_tree: Any, target: Any) -> None:
    """Raises ValueError naming the first leaf whose path, shape or dtype differs between the
    saved state and ``target`` (a config change no fingerprint field names)."""
    saved, wanted = _leaf_specs(saved_tree), _leaf_specs(target, keys_as_data=True)
    differing = [k for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k)]
    if not differing:
        return
    first = differing[0]
    more = f"; {len(differing) - 1} more leaves differ" if len(differing) > 1 else ""
    raise ValueError(
        f"The checkpoint of step {step} in {directory} holds a state that does not fit this "
        f"config ({first}: {_spec(saved.get(first))} saved, {_spec(wanted.get(first))} "
        f"wanted{more}); use another --workdir, or the config it was written with."
    )


def _leaf_specs(tree: Any, keys_as_data: bool = False) -> dict[str, tuple]:
    """``{"params.conv.kernel": (shape, dtype name)}`` of a state or of orbax's metadata of
    one; typed PRNG keys as their key data, as orbax stores them."""
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if keys_as_data and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        name = ".".join(
            str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path
        )
        specs[name] = (tuple(leaf.shape), str(leaf.dtype))
    return specs


def _spec(spec: tuple | None) -> str:
    return "absent" if spec is None else f"{spec[1]}{list(spec[0])}"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
