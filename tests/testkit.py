"""Helpers shared by the test folders: the repository root, loading a script of the
repository as a module, the tiny config of ``configs/tiny.py``, and comparing trees."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def load_script(relative_path: str, module_name: str):
    """The repository file ``relative_path`` (e.g. ``demos/reproduce.py``) imported as a module."""
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_tiny = load_script("configs/tiny.py", "tiny_config_file")
TEST_BLOCKS = _tiny.TEST_BLOCKS


def tiny_config(**overrides):
    """``configs/tiny.py``'s test config with ``group__field=value`` overrides."""
    c = _tiny.get_config("test")
    for key, value in overrides.items():
        group, field = key.split("__")
        c[group][field] = value
    return c


def restore_final(workdir, config):
    """``(step, state)`` of a run's newest QAT checkpoint, read onto this process's first
    device whatever devices the run that wrote it had."""
    import orbax.checkpoint as ocp

    from oscqat_jax.training import build, checkpoint

    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), metadata=build.run_metadata(config, "qat")
    )
    step = ckpt.latest_step()
    path = os.path.join(ckpt.directory, str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        ocp.StandardCheckpointer().metadata(path).item_metadata.tree,
    )
    state = ocp.StandardCheckpointer().restore(path, target)
    ckpt.close()
    return step, state


def assert_trees_equal(a, b, atol=0.0, rtol=0.0):
    """Leaf by leaf equality of two trees of the same structure (within the tolerances)."""
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64),
            np.asarray(y, np.float64),
            atol=atol,
            rtol=rtol,
            err_msg=jax.tree_util.keystr(path),
        )
