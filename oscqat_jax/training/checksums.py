"""Content checksums of checkpoint items: the SHA-256 of every file of an item, written into
it as ``sha256sums.json`` when orbax finalises the item (before the step is renamed into
place) and verified before a restore reads anything.

Orbax itself has no content checksum to switch on: its zarr3 ``crc32c`` codec covers only
the index of a shard, and OCDBT's checksums only its b-tree nodes, not the chunk data.
"""

from __future__ import annotations

import hashlib
import json
import logging

import orbax.checkpoint as ocp
from etils import epath

CHECKSUMS = "sha256sums.json"


def first_line(err: Exception) -> str:
    """``"Type: first line of the message"`` of an error, for one-sentence reports."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class _Checksummed:
    """Writes the item's checksums once orbax has finalised its files (on the primary
    process, after every process has written), before the step directory is renamed."""

    def finalize(self, directory: epath.Path) -> None:
        super().finalize(directory)
        write_checksums(directory)


class _ChecksummedState(_Checksummed, ocp.StandardCheckpointHandler):
    pass


class _ChecksummedJson(_Checksummed, ocp.JsonCheckpointHandler):
    pass


def handler_registry(
    state_item: str, metadata_item: str
) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Orbax handlers of the two items that write checksums when they finalise."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state, metadata = _ChecksummedState(), _ChecksummedJson()
    registry.add(state_item, ocp.args.StandardSave, state)
    registry.add(state_item, ocp.args.StandardRestore, state)
    registry.add(metadata_item, ocp.args.JsonSave, metadata)
    registry.add(metadata_item, ocp.args.JsonRestore, metadata)
    return registry


def _sha256(path: epath.Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: epath.Path) -> list[epath.Path]:
    """Every file under ``directory`` (epath has no recursive glob on every backend)."""
    files = []
    for path in sorted(directory.iterdir()):
        files.extend(_files(path) if path.is_dir() else [path])
    return files


def write_checksums(item_dir: epath.Path) -> None:
    files = [p for p in _files(item_dir) if p.name != CHECKSUMS]
    digests = {p.relative_to(item_dir).as_posix(): _sha256(p) for p in files}
    (item_dir / CHECKSUMS).write_text(json.dumps({"sha256": digests}, indent=1))


def verify_checksums(item_dir: epath.Path) -> str | None:
    """What differs from the checksums written into ``item_dir``, or ``None`` if nothing.

    Files written after the checksums (orbax's ``commit_success.txt``) are not checked. An
    item without checksums (written by an earlier version) is logged and passes.
    """
    item = item_dir.name
    if not item_dir.exists():
        return f"its {item} directory is missing"
    listing = item_dir / CHECKSUMS
    if not listing.exists():
        logging.warning(
            "%s has no checksums (an earlier version wrote it); not verified.", item_dir
        )
        return None
    try:
        digests = json.loads(listing.read_text())["sha256"]
    except Exception as err:  # json, a damaged listing without the key, I/O
        return f"its checksum file {item}/{CHECKSUMS} cannot be read ({first_line(err)})"
    for name, digest in digests.items():
        path = item_dir / name
        if not path.exists():
            return f"{item}/{name} is missing"
        if _sha256(path) != digest:
            return f"{item}/{name} differs from the checksum written with it"
    return None
