"""The recorder of the stored references that tests/models/test_plain_reference.py checks the
plain models against: what the package's ctx models (``oscqat_jax.models.{mobilenet_v2,
mobilenet_v3,resnet,efficientnet_lite}`` with ``oscqat_jax.nn.layers``) gave on the parity
gate's run (``tests/models/test_plain_parity.py``), for each case of ``CASES`` there.

The ctx models and the gate are deleted, so the recorder lives at the commit it ran at,
b581de7 (``tests/models/data/plain_reference.json`` records it): to record again,
``git checkout b581de7``, run it there and copy the files over; never record from the plain
models themselves, which are what the references check. Run here, this file says so.

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
timestamps, sorted members). Run from the repository root at b581de7::

    PYTHONPATH=. python tests/models/make_plain_reference.py [--no-check]
"""

import sys

RECORDED_AT = "b581de7"
"""The commit whose ctx models the references were recorded from."""

if __name__ == "__main__":
    sys.exit(
        "make_plain_reference.py records from the ctx models, which this tree no longer has; "
        f"run it from a checkout of {RECORDED_AT} (git checkout {RECORDED_AT}) and copy "
        "tests/models/data/plain_reference* over."
    )
