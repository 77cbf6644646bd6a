"""Writes the stored references that tests/models/test_plain_reference.py checks the plain
models against: what the package's ctx models (``oscqat_jax.models.{mobilenet_v2,
mobilenet_v3,resnet,efficientnet_lite}`` with ``oscqat_jax.nn.layers``) give on the parity
gate's run (tests/models/test_plain_parity.py), for each case of ``CASES`` there.

Needs the ctx models and the gate, so it runs only at a commit that has them; the commit it
ran at is in ``tests/models/data/plain_reference.json``. Once they are deleted, the stored
files are the record: rerun this script from a checkout of that commit (and copy the files
over), never against the plain models themselves.

What it writes (``tests/models/data``):

- ``plain_reference_inputs.npz``: the gate's images and labels (calibration batch, eval
  batch, ``STEPS`` training batches, their labels), float32 / int32.
- ``plain_reference_<family>.npz``, per stored case of the family, under ``<case.key>/``:
  ``init/<collection>/<path>`` (the BN-perturbed initial variables),
  ``calibrated/...`` (params, quant_stats, oscillation after calibration), ``eval/logits``,
  ``history/oscillation/...`` (the random oscillation history), and per step ``i``:
  ``step<i>/logits``, ``step<i>/dampening``, ``step<i>/grads/<path>`` and
  ``step<i>/state/<collection>/...`` (params, batch_stats, oscillation after the step). Every
  path is the plain model's (``plain.from_package``); a stage after ``init`` holds only the
  leaves that changed (bit for bit), later stages are laid over earlier ones; large leaves
  after ``init`` are digests (``test_plain_reference.digest``). The family's first case's
  initial variables are shared (``init/``); each record is packed (``test_plain_reference.pack``).
- ``plain_reference.json``: commit, versions, cases, file sizes and SHA-256, and the
  differences the plain models gave against the record when it was written.

The files are byte for byte reproducible on one machine and jax version (fixed zip
timestamps, sorted members). Run from the repository root::

    PYTHONPATH=. python tests/models/make_plain_reference.py [--no-check]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import subprocess
import time
import zipfile

import flax
import jax
import jaxlib
import numpy as np
import test_plain_parity as gate
import test_plain_reference as ref

from oscqat_jax.models import plain

ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _check_same_run() -> None:
    """The test's plain-side copy of the gate's run must be the gate's."""
    for name in (
        "CLASSES",
        "STEPS",
        "FREEZE_THRESHOLDS",
        "OSC_MOMENTUM",
        "DAMPENING_WEIGHT",
        "KERNEL_LR",
        "SCALE_LR",
        "RTOL",
        "FLOAT_FOLD_RTOL",
        "IMPL",
    ):
        assert getattr(ref, name) == getattr(gate, name), name
    assert ref.SETUPS == gate.SETUPS
    assert sorted(ref.FAMILIES) == sorted(gate.FAMILIES)
    for name, family in gate.FAMILIES.items():
        assert ref.FAMILIES[name]() == family.plain_model(), name


def write_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed timestamps and sorted members (reproducible bytes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arrays[key]))
            info = zipfile.ZipInfo(f"{key}.npy", ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def _host(leaves: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in leaves.items()}


def _changed(new: dict, old: dict) -> dict[str, np.ndarray]:
    return {
        k: v
        for k, v in new.items()
        if k not in old or old[k].dtype != v.dtype or not np.array_equal(old[k], v)
    }


def _state(variables, collections) -> dict[str, np.ndarray]:
    mapped = plain.from_package(variables)
    return _host(ref.flat({c: mapped[c] for c in collections if c in mapped}))


def inputs() -> dict[str, np.ndarray]:
    labels = [np.asarray(y, np.int32) for y in gate.labels(4, gate.STEPS)]
    return {
        "calibration": np.asarray(gate.images(2, 1)[0]),
        "eval": np.asarray(gate.images(3, 1)[0]),
        "train": np.stack([np.asarray(x) for x in gate.images(4, gate.STEPS)]),
        "labels": np.stack(labels),
    }


def record_case(case: ref.Case, data: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The ctx model's run of ``case`` (the gate's ``_run_case``, package side): its initial
    variables (whole) and its record (later stages as :func:`ref.digest` of what changed)."""
    family = gate.FAMILIES[case.family]
    setup = case.quant_setup
    out: dict[str, np.ndarray] = {}

    def put(stage: str, leaves: dict) -> None:
        out.update({f"{stage}/{k}": v for k, v in ref.digest(leaves).items()})

    with family.patch():
        run = gate.PackageRun(family.package_model(setup, case.fold_bn))
        want = gate.perturbed(run.init(), seed=1)
        initial = _host(ref.flat(plain.from_package(want)))
        state = dict(initial)
        is_float = case.setup == "float"
        if not is_float:
            want = run.calibrate(want, [data["calibration"]])
            new = _state(want, ("params", "quant_stats", "oscillation"))
            put("calibrated", _changed(new, state))
            state.update(new)
        mode = "float_eval" if is_float else "eval"
        out["eval/logits"] = np.asarray(run.eval(want, data["eval"], mode))
        if "oscillation" in want:
            want = gate.with_oscillation_history(want, 5)
            new = _state(want, ("oscillation",))
            put("history", _changed(new, state))
            state.update(new)
        step = gate.make_step(run.forward("float_train" if is_float else "train"))
        for i, f_th in enumerate(gate.FREEZE_THRESHOLDS):
            want, logits, damp, grads = step(want, data["train"][i], data["labels"][i], f_th)
            out[f"step{i}/logits"] = np.asarray(logits)
            out[f"step{i}/dampening"] = np.asarray(damp)
            put(f"step{i}/grads", _host(ref.flat(plain.from_package({"g": grads})["g"])))
            new = _state(want, ("params", "batch_stats", "oscillation"))
            put(f"step{i}/state", _changed(new, state))
            state.update(new)
    return initial, out


def family_arrays(cases: list[ref.Case], data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One family's file: the first case's initial variables under ``init/`` (shared: the
    kernels and BN parameters are the same in every case), each case's record under
    ``<case.key>/`` with its own initial leaves where they differ and its leaf list."""
    arrays: dict[str, np.ndarray] = {}
    shared: dict[str, np.ndarray] | None = None
    for case in cases:
        start = time.perf_counter()
        initial, record = record_case(case, data)
        if shared is None:
            shared = initial
            arrays.update({f"init/{k}": v for k, v in ref.pack(shared).items()})
        record.update({f"init/{k}": v for k, v in _changed(initial, shared).items()})
        record["leaves"] = np.frombuffer(json.dumps(sorted(initial)).encode(), np.uint8)
        arrays.update({f"{case.key}/{k}": v for k, v in ref.pack(record).items()})
        print(f"recorded {case} ({time.perf_counter() - start:.0f} s)", flush=True)
    return arrays


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def main(check: bool = True) -> dict:
    _check_same_run()
    ref.DATA.mkdir(exist_ok=True)
    data = inputs()
    write_npz(ref.INPUTS, data)
    files = [ref.INPUTS]
    for family in dict.fromkeys(case.family for case in ref.CASES):
        cases = [case for case in ref.CASES if case.family == family]
        write_npz(ref.family_file(family), family_arrays(cases, data))
        files.append(ref.family_file(family))
    measured = {}
    if check:
        for case in ref.CASES:
            start = time.perf_counter()
            measured[str(case)] = ref.run_case(case)
            print(f"checked {case}: {measured[str(case)]} ({time.perf_counter() - start:.0f} s)")
    return write_record(files, measured)


def write_record(files: list, measured: dict) -> dict:
    """Writes ``plain_reference.json``: commit, versions, cases, files, measured."""
    record = {
        "commit": _git("rev-parse", "HEAD"),
        # Files of the package that differed from the commit while this ran (other work).
        "uncommitted": _git("status", "--porcelain", "--", "oscqat_jax").splitlines(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "cases": [str(case) for case in ref.CASES],
        "files": {
            f.name: {
                "bytes": f.stat().st_size,
                "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
            }
            for f in files
        },
        "measured": measured,
    }
    ref.RECORD.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-check", action="store_true", help="skip running the plain models")
    args = parser.parse_args()
    print(json.dumps(main(not args.no_check)["files"], indent=1))
