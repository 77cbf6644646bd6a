"""Checkpoints of the whole train state, with the run's metadata beside them (orbax).

A checkpoint directory holds one sub-directory per saved step, ``<step>/state`` (the pytree)
and ``<step>/metadata`` (JSON). Orbax writes each step into a temporary directory and renames
it when complete, so an interrupted save never counts as a checkpoint, and old steps are only
deleted (``max_to_keep``) after the newer one is finalised.

Saves are asynchronous: :meth:`Checkpointer.save` returns once the arrays are copied to host
memory (so the caller may donate or overwrite them), and the files are written by a background
thread. :meth:`Checkpointer.wait` blocks until that write is done and re-raises its error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath

State = TypeVar("State")

_STATE = "state"
_METADATA = "metadata"
_NOT_SET = "(not set)"


class Checkpointer:
    """Saves and restores a train-state pytree in ``directory``, keeping the newest few.

    ``metadata`` (JSON-serialisable: model name, bit widths, quant setup, ...) is written with
    every checkpoint; :meth:`restore` refuses a checkpoint whose metadata differs. Call every
    method on all processes: orbax synchronises them and writes shared files from process 0.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        metadata: Mapping[str, Any],
        max_to_keep: int = 3,
        save_every_steps: int | None = None,
    ):
        """Opens (creating if needed) the checkpoint directory.

        Args:
          directory: where checkpoints live; a local path is made absolute (orbax needs it).
          metadata: what a checkpoint must agree on with the run that restores it.
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
        try:
            # The JSON round trip makes tuples lists, as they come back from disk.
            self.metadata = json.loads(json.dumps(dict(metadata)))
        except TypeError as err:
            raise ValueError(
                f"Checkpoint metadata must hold only JSON values (str, int, float, bool, None, "
                f"lists and dicts of them): {err}."
            ) from err
        self.save_every_steps = save_every_steps
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                # Leftovers of saves that were interrupted (never finalised) are removed.
                cleanup_tmp_directories=True,
            ),
            item_names=(_STATE, _METADATA),
        )

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts saving ``state`` at ``step`` if it is due (or ``force``); returns whether it did.

        ``state`` is any pytree of arrays (typed PRNG keys included). The call first waits for
        the previous save and re-raises its error, if any; it returns once ``state`` is copied
        to host memory, and a background thread writes the files. A step that is already
        saved is not written again. Once the new step is complete on disk, steps beyond the
        newest ``max_to_keep`` are deleted.
        """
        due = self.save_every_steps is not None and step % self.save_every_steps == 0
        if not (due or force):
            return False
        self.wait()
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardSave(state),
                    _METADATA: ocp.args.JsonSave(self.metadata),
                }
            ),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk; re-raises its error."""
        try:
            self._manager.wait_until_finished()
        except Exception:
            # orbax already listed the failed step; list only what is complete on disk.
            self._manager.reload()
            raise

    def close(self) -> None:
        """Waits for the pending save and releases orbax's threads."""
        self._manager.close()

    def latest_step(self) -> int | None:
        """The newest saved step (complete on disk, or being written), or ``None``."""
        return self._manager.latest_step()

    def restore(self, target: State, step: int | None = None) -> State:
        """The saved state with ``target``'s structure, dtypes and shardings.

        Args:
          target: a state of the same structure, either concrete or abstract
            (``jax.ShapeDtypeStruct`` leaves, e.g. from ``jax.eval_shape``). Each leaf is
            restored with the leaf's sharding (e.g. ``NamedSharding`` over a ``Mesh``), or the
            sharding recorded in the checkpoint when an abstract leaf has none.
          step: the step to restore; ``None`` means the newest readable one. Newer
            checkpoints that cannot be read are logged, skipped and moved aside to
            ``<step>.unreadable-<unix time>`` so that training can save those steps again.

        Raises:
          ValueError: the checkpoint's metadata differs from this Checkpointer's.
          FileNotFoundError: there is no checkpoint (or not ``step``).
          UnreadableCheckpointError: ``step`` (or, for ``None``, every checkpoint) cannot be
            read into ``target``: damaged files, or a state of another structure or shape.
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
        unreadable = []
        for candidate in steps:
            try:
                restored = self._restore_step(target, candidate)
            except UnreadableCheckpointError as err:
                logging.warning("%s Trying the previous one.", err)
                unreadable.append(candidate)
                continue
            if unreadable:
                self._move_aside(unreadable)
            return restored
        raise UnreadableCheckpointError(
            f"None of the checkpoints in {self.directory} (steps {sorted(steps)}) can be "
            "restored into the given state; see the warnings above for each step's error."
        )

    def _restore_step(self, target: State, step: int) -> State:
        """Checks the metadata of ``step``, then restores its state into ``target``."""
        try:
            saved = self._manager.restore(
                step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
            )[_METADATA]
        except Exception as err:  # orbax, tensorstore and json raise many types
            raise _unreadable(self.directory, step, "metadata", err) from err
        self._check_metadata(saved)
        try:
            return self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )[_STATE]
        except Exception as err:  # as above, and a target whose structure or shapes differ
            raise _unreadable(self.directory, step, "state", err) from err

    def _check_metadata(self, saved: Mapping[str, Any]) -> None:
        """Raises if ``saved`` differs from this Checkpointer's metadata in any key."""
        saved_flat, wanted_flat = _flatten(saved), _flatten(self.metadata)
        keys = sorted(
            k
            for k in saved_flat.keys() | wanted_flat.keys()
            if saved_flat.get(k, _NOT_SET) != wanted_flat.get(k, _NOT_SET)
        )
        if keys:
            was = ", ".join(f"{k}={_show(saved_flat.get(k, _NOT_SET))}" for k in keys)
            wanted = ", ".join(f"{k}={_show(wanted_flat.get(k, _NOT_SET))}" for k in keys)
            raise ValueError(
                f"The checkpoint in {self.directory} was written for {was} but the config asks "
                f"for {wanted}; use another --workdir or the matching config."
            )

    def _move_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories so that orbax no longer lists them."""
        if jax.process_index() == 0:
            stamp = int(time.time())
            for step in steps:
                path = epath.Path(self.directory) / str(step)
                if path.exists():
                    aside = path.parent / f"{step}.unreadable-{stamp}"
                    path.rename(aside)
                    logging.warning("Moved the unreadable checkpoint %s to %s.", path, aside)
        ocp.multihost.sync_global_processes(
            "oscqat_jax_checkpoint_move_aside_" + "_".join(map(str, steps))
        )
        self._manager.reload()


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint cannot be read: truncated or corrupted files, or a mismatched target."""


def _unreadable(directory: str, step: int, item: str, err: Exception) -> UnreadableCheckpointError:
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else ""
    return UnreadableCheckpointError(
        f"The {item} of the checkpoint of step {step} in {directory} cannot be read "
        f"({type(err).__name__}: {first_line})."
    )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (so errors name ``quant.n_bits``)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
