"""Checkpoints of the whole train state, with the run's fingerprint and checksums (orbax).

A checkpoint directory holds one sub-directory per saved step, ``<step>/state`` (the pytree)
and ``<step>/metadata`` (JSON: the :class:`Fingerprint` of the run that wrote it and the
:data:`FORMAT_VERSION` of its variable layout; a checkpoint of another format is refused
before anything is read or moved). Orbax
writes each step into a temporary directory and renames it when complete, so an interrupted
save never counts as a checkpoint, and old steps are only deleted (``max_to_keep``) after the
newer one is finalised; the step named by :meth:`Checkpointer.keep` (the training loop's
newest checkpoint judged good) is never deleted by that rotation. Just before that rename, the
SHA-256 of every file of each item is written into the item as ``sha256sums.json``; a restore
checks them first, so a flipped bit or a truncated file counts as damage (the step is moved
aside and the previous one restored) instead of being read as a different state. Orbax itself
has no content checksum to switch on: its zarr3 ``crc32c`` codec covers only the index of a
shard, not the chunk data.

Saves are asynchronous: :meth:`Checkpointer.save` returns once the arrays are copied to host
memory and the step's directories exist (so the caller may donate or overwrite the arrays),
and the files are written by a background thread. :meth:`Checkpointer.wait` blocks until
that write is done. A save that fails raises :class:`CheckpointSaveError` from ``save`` or
``wait`` and closes orbax's manager, so that none of its threads keeps the process alive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath

from oscqat_jax.training import checkpoint_checks, checksums
from oscqat_jax.training.checkpoint_checks import FORMAT_VERSION, VERSION_KEY

State = TypeVar("State")

_STATE = "state"
_METADATA = "metadata"
_ITEMS = (_STATE, _METADATA)


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a checkpoint records about the config of the run that wrote it (JSON values).

    Flat mappings from a field's dotted name to its value.
    """

    fixed: Mapping[str, Any]
    """Fields a restore must agree on: the saved state has their shape or meaning (model,
    classes, bit widths, quant setup, ...); a config that changes one is refused."""
    tunable: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Fields a resumed run may change (learning rates, epochs, seed, thresholds, ...); the
    changes are printed in one line when the checkpoint is restored."""


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint cannot be read: files that differ from their checksums, truncated or
    missing files."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the complete checkpoints before it are untouched."""


class Checkpointer:
    """Saves and restores a train-state pytree in ``directory``, keeping the newest few.

    ``metadata`` is written with every checkpoint; :meth:`restore` refuses a checkpoint whose
    fixed fields differ and reports the tunable ones that changed. Call every method on all
    processes: orbax synchronises them and writes shared files from process 0.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        metadata: Fingerprint | Mapping[str, Any],
        max_to_keep: int = 3,
        save_every_steps: int | None = None,
    ):
        """Opens (creating if needed) the checkpoint directory.

        Args:
          directory: where checkpoints live; a local path is made absolute (orbax needs it).
          metadata: the run's :class:`Fingerprint`; a plain mapping is all fixed fields.
          max_to_keep: number of newest complete checkpoints kept; older ones are deleted.
          save_every_steps: :meth:`save` writes when ``step`` is a multiple of it; ``None``
            writes only when called with ``force=True``.
        """
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep}.")
        if save_every_steps is not None and save_every_steps < 1:
            raise ValueError(
                f"save_every_steps must be a positive number of steps or None, got {save_every_steps}."
            )
        directory = os.fspath(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        if not isinstance(metadata, Fingerprint):
            metadata = Fingerprint(fixed=metadata)
        try:
            # The JSON round trip makes tuples lists, as they come back from disk.
            self.metadata = json.loads(
                json.dumps(
                    {
                        VERSION_KEY: FORMAT_VERSION,
                        "fixed": dict(metadata.fixed),
                        "tunable": dict(metadata.tunable),
                    }
                )
            )
        except TypeError as err:
            raise ValueError(
                f"Checkpoint metadata must hold only JSON values (str, int, float, bool, None, "
                f"lists and dicts of them): {err}."
            ) from err
        self.save_every_steps = save_every_steps
        self.max_to_keep = max_to_keep
        self._kept = _KeepStep()
        self._pending: int | None = None  # the step being written in the background
        self._closed = False
        self._manager = self._open_manager()

    def _open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                # The newest max_to_keep, and the step named by keep(): orbax asks the policy
                # after each save is finalised, so a newer step never pushes that one out.
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                    [ocp.checkpoint_managers.LatestN(self.max_to_keep), self._kept]
                ),
                # Leftovers of saves that were interrupted (never finalised) are removed.
                cleanup_tmp_directories=True,
                # Created in the background, a directory that cannot be created leaves
                # orbax's item threads waiting for it (for its 20-minute timeout), and the
                # process cannot exit; created in save(), the failure is raised there.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            ),
            handler_registry=checksums.handler_registry(_STATE, _METADATA),
        )

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts saving ``state`` at ``step`` if it is due (or ``force``); returns whether it did.

        ``state`` is any pytree of arrays (typed PRNG keys included). The call first waits for
        the previous save; it returns once ``state`` is copied to host memory, and a
        background thread writes the files. A step that is already saved is not written
        again. Once the new step is complete on disk, steps beyond the newest
        ``max_to_keep`` are deleted.

        Raises:
          CheckpointSaveError: this save, or the previous one, failed.
        """
        due = self.save_every_steps is not None and step % self.save_every_steps == 0
        if not (due or force):
            return False
        self.wait()
        if self._closed:  # an earlier save failed and closed the manager
            self._manager, self._closed = self._open_manager(), False
        if step in self._manager.all_steps():
            return False
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardSave(state),
                        _METADATA: ocp.args.JsonSave(self.metadata),
                    }
                ),
                force=True,
            )
        except Exception as err:  # the directory, tensorstore or the host copy
            self._failed(step, err)
        self._pending = step if started else None
        return started

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk.

        Raises:
          CheckpointSaveError: the pending save failed.
        """
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            self._failed(step, err)

    def _failed(self, step: int | None, err: Exception) -> NoReturn:
        """Closes orbax's manager (its threads end) and raises the error of a failed save."""
        with contextlib.suppress(Exception):  # the error being raised is the one that counts
            self._manager.close()
        self._closed = True
        # orbax listed the failed step; list only what is complete on disk.
        self._manager.reload()
        kept = sorted(self._manager.all_steps())
        after = (
            f"the complete checkpoints there (steps {kept}) are untouched, and re-running the "
            f"same command once it can write there resumes from step {kept[-1]}"
            if kept
            else "no complete checkpoint was written before it, and re-running the same "
            "command once it can write there starts over"
        )
        raise CheckpointSaveError(
            f"Saving the checkpoint of step {step} in {self.directory} failed "
            f"({checksums.first_line(err)}); {after}."
        ) from err

    def close(self) -> None:
        """Waits for the pending save and releases orbax's threads (also after a failure).

        Raises:
          CheckpointSaveError: the pending save failed (the threads are released first).
        """
        try:
            self.wait()
        finally:
            if not self._closed:
                self._manager.close()
                self._closed = True

    def latest_step(self) -> int | None:
        """The newest saved step (complete on disk, or being written), or ``None``."""
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """The saved steps, oldest first (complete on disk, or being written)."""
        return sorted(self._manager.all_steps())

    def keep(self, step: int | None) -> None:
        """Keeps ``step`` whatever ``max_to_keep`` says, until another step is named (``None``:
        none). The training loop names its newest checkpoint judged good, so that saving newer
        ones, which may turn out bad, never deletes it."""
        self._kept.step = step

    def move_aside(self, steps: list[int], tag: str) -> dict[int, str]:
        """Renames the directories of ``steps`` to ``<step>.<tag>`` (``<step>.<tag>-2``, ... if
        that exists) so that orbax no longer lists them; nothing is deleted. Call on every
        process, with the same ``tag``, after :meth:`wait`; returns each step's new path, the
        same on every process (the names are chosen between two barriers)."""
        key = f"oscqat_jax_move_aside_{tag}_" + "_".join(map(str, steps))
        ocp.multihost.sync_global_processes(key + "_before")
        moved = {step: self._free_name(step, tag) for step in steps}
        ocp.multihost.sync_global_processes(key + "_named")
        if jax.process_index() == 0:
            for step, aside in moved.items():
                (epath.Path(self.directory) / str(step)).rename(aside)
        ocp.multihost.sync_global_processes(key + "_moved")
        self._manager.reload()
        return {step: str(aside) for step, aside in moved.items()}

    def _free_name(self, step: int, tag: str) -> epath.Path:
        base = epath.Path(self.directory) / f"{step}.{tag}"
        aside, n = base, 1
        while aside.exists():
            n += 1
            aside = base.parent / f"{base.name}-{n}"
        return aside

    def restore(self, target: State, step: int | None = None) -> State:
        """The saved state with ``target``'s structure, dtypes and shardings.

        Args:
          target: a state of the same structure, either concrete or abstract
            (``jax.ShapeDtypeStruct`` leaves, e.g. from ``jax.eval_shape``). Each leaf is
            restored with the leaf's sharding (e.g. ``NamedSharding`` over a ``Mesh``), or the
            sharding recorded in the checkpoint when an abstract leaf has none.
          step: the step to restore; ``None`` means the newest readable one. Newer
            checkpoints that cannot be read are moved aside to
            ``<step>.unreadable-<unix time>`` (never deleted), with one warning each, so
            that training can save those steps again. Tunable fields that differ from the
            restored checkpoint's are printed in one line.

        Raises:
          ValueError: the checkpoint's fixed fields differ from this Checkpointer's, or its
            state has another structure or shape than ``target``.
          FileNotFoundError: there is no checkpoint (or not ``step``).
          UnreadableCheckpointError: ``step`` (or, for ``None``, every checkpoint) cannot be
            read: files that differ from their checksums, truncated or missing files.
        """
        self.wait()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"There is no checkpoint of step {step} in {self.directory}; saved steps: {sorted(steps)}."
                )
            return self._restore_step(target, step)
        if not steps:
            raise FileNotFoundError(
                f"There is no checkpoint in {self.directory}; train first or check the directory."
            )
        unreadable: dict[int, UnreadableCheckpointError] = {}
        for candidate in steps:
            try:
                restored = self._restore_step(target, candidate)
            except UnreadableCheckpointError as err:
                unreadable[candidate] = err
                continue
            if unreadable:
                self._move_aside(unreadable, candidate)
            return restored
        reasons = "; ".join(str(err).rstrip(".") for err in unreadable.values())
        raise UnreadableCheckpointError(
            f"None of the checkpoints in {self.directory} can be read ({reasons})."
        )

    def _restore_step(self, target: State, step: int) -> State:
        """Checks the checksums, the fingerprint and the shapes of ``step``, then restores it."""
        step_dir = epath.Path(self.directory) / str(step)
        for item in _ITEMS:
            damage = checksums.verify_checksums(step_dir / item)
            if damage:
                raise UnreadableCheckpointError(
                    f"The checkpoint of step {step} in {self.directory} is damaged: {damage}."
                )
        try:
            saved = self._manager.restore(
                step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
            )[_METADATA]
            saved_tree = self._manager.item_metadata(step)[_STATE]
            if saved_tree is None:
                raise FileNotFoundError("orbax finds no tree metadata of the state")
        except Exception as err:  # orbax, tensorstore and json raise many types
            raise _unreadable(self.directory, step, "metadata", err) from err
        checkpoint_checks.check_version(self.directory, step, saved)
        changes = self._check_fingerprint(step, saved)
        checkpoint_checks.check_fits(self.directory, step, saved_tree, target)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )[_STATE]
        except Exception as err:  # as above
            raise _unreadable(self.directory, step, "state", err) from err
        if changes and jax.process_index() == 0:
            print(
                f"The checkpoint of step {step} was written with other settings, safe to "
                f"change: {changes}."
            )
        return restored

    def _check_fingerprint(self, step: int, saved: Mapping[str, Any]) -> str:
        """Raises if ``saved`` differs from this Checkpointer's fixed fields; returns the
        tunable fields that changed (``"field old → new, ..."``, empty if none)."""
        if "fixed" not in saved:  # written before tunable fields were recorded
            saved = {"fixed": saved, "tunable": {}}
        fixed = checkpoint_checks.changes(saved["fixed"], self.metadata["fixed"])
        if fixed:
            raise ValueError(
                f"The checkpoint of step {step} in {self.directory} cannot be used with this "
                f"config, which changes {fixed}: settings the saved state depends on; use "
                "another --workdir, or set them back."
            )
        return checkpoint_checks.changes(saved.get("tunable", {}), self.metadata["tunable"])

    def _move_aside(self, unreadable: dict[int, UnreadableCheckpointError], restored: int):
        """Renames unreadable step directories so that orbax no longer lists them."""
        if jax.process_index() == 0:
            stamp = int(time.time())
            for step, err in unreadable.items():
                path = epath.Path(self.directory) / str(step)
                if path.exists():
                    aside = path.parent / f"{step}.unreadable-{stamp}"
                    path.rename(aside)
                    logging.warning(
                        "%s; moved it to %s and restored step %d instead.",
                        str(err).rstrip("."),
                        aside,
                        restored,
                    )
        ocp.multihost.sync_global_processes(
            "oscqat_jax_checkpoint_move_aside_" + "_".join(map(str, unreadable))
        )
        self._manager.reload()


class _KeepStep:
    """An orbax preservation policy that keeps the one step named after construction."""

    def __init__(self):
        self.step: int | None = None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context  # the step alone decides
        return [info.step == self.step for info in checkpoints]


def _unreadable(directory: str, step: int, item: str, err: Exception) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(
        f"The {item} of the checkpoint of step {step} in {directory} cannot be read "
        f"({checksums.first_line(err)})."
    )
