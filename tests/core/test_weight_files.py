"""Tests of oscqat_jax.weight_files: round trips of the three formats, atomic writes, and the
errors for a truncated file and for a PyTorch checkpoint that would run code."""

import os
import re
import sys

import numpy as np
import pytest

from oscqat_jax import weight_files

METADATA = {"format": "test", "version": 2, "layers": {"b": [1, 2], "a": None}}


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "params/conv/kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
        "params/conv/kernel_int": rng.integers(-8, 8, (3, 3, 2, 4)).astype(np.int8),
        "batch_stats/bn/var": rng.random(4).astype(np.float16),
        "quant_stats/input_signed": np.asarray(True),
        "steps": np.asarray(7, np.int64),
    }


def _assert_same(loaded, arrays):
    assert set(loaded) == set(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value)


@pytest.mark.parametrize("compress", [False, True])
def test_npz_round_trip_with_metadata(tmp_path, compress):
    path = tmp_path / "sub" / "w.npz"  # the missing folder is created
    weight_files.write(
        path, _arrays(), metadata_key="manifest", metadata=METADATA, compress=compress
    )
    arrays, metadata = weight_files.read(path, metadata_key="manifest")
    _assert_same(arrays, _arrays())
    assert metadata == METADATA
    # Without a key the entry is an ordinary (string) array; a missing key reads as None.
    arrays, metadata = weight_files.read(path)
    assert metadata is None and str(arrays.pop("manifest")) == '{"format": "test", ' + (
        '"layers": {"a": null, "b": [1, 2]}, "version": 2}'
    )
    assert weight_files.read(path, metadata_key="other")[1] is None


@pytest.mark.parametrize("with_package", [True, False])
def test_safetensors_round_trip_with_metadata(tmp_path, monkeypatch, with_package):
    path = tmp_path / "w.safetensors"
    weight_files.write(path, _arrays(), metadata_key="manifest", metadata=METADATA)
    if not with_package:
        monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # import fails: the parser
    arrays, metadata = weight_files.read(path, metadata_key="manifest")
    _assert_same(arrays, _arrays())
    assert metadata == METADATA
    assert weight_files.read(path)[1] is None


def test_torch_checkpoint_is_read_as_float32_numpy(tmp_path):
    import torch

    state_dict = {
        "conv.weight": torch.arange(24, dtype=torch.float16).reshape(2, 3, 2, 2),
        "bn.running_var": torch.ones(2, dtype=torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(5),
    }
    torch.save({"state_dict": state_dict, "epoch": 3}, tmp_path / "w.pth.tar")
    arrays, metadata = weight_files.read(tmp_path / "w.pth.tar", metadata_key="manifest")
    assert metadata is None and list(arrays) == list(state_dict)
    np.testing.assert_array_equal(
        arrays["conv.weight"], np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    )
    assert arrays["conv.weight"].dtype == arrays["bn.running_var"].dtype == np.float32
    assert arrays["bn.num_batches_tracked"].dtype == np.int64
    assert arrays["bn.num_batches_tracked"] == 5


class _RunsCode:
    """Unpickling this calls ``os.system``: what ``weights_only=True`` must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    import torch

    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(marker)}, tmp_path / "w.pt")
    # The refusal names what the pickle would have called (``posix.system`` on Linux).
    with pytest.raises(
        ValueError, match=r"w\.pt was not loaded: read with weights_only=True, .*system;"
    ):
        weight_files.read(tmp_path / "w.pt")
    assert not marker.exists()


def _torch_file(path):
    import torch

    torch.save({"w": torch.zeros(1000)}, path)


@pytest.mark.parametrize("name", ["w.npz", "w.safetensors", "w.pt"])
def test_a_truncated_file_is_named_in_one_sentence(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".pt"):
        _torch_file(path)
    else:
        weight_files.write(path, {"w": np.zeros(1000, np.float32)})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as error:
        weight_files.read(path)
    message = str(error.value)
    pattern = rf"{re.escape(str(path))} is truncated or not a .+ file \(.+\)\."
    assert re.fullmatch(pattern, message), message  # one line, one sentence


def test_a_failed_write_leaves_the_existing_file_untouched(tmp_path):
    path = tmp_path / "w.npz"
    weight_files.write(path, _arrays())
    before = path.read_bytes()

    class Unwritable:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("cannot be converted")

    # The first array is written into the temporary file before the second one fails.
    with pytest.raises(RuntimeError, match="cannot be converted"):
        weight_files.write(path, {"a": np.zeros(3), "b": Unwritable()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_unknown_suffixes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"w\.onnx has an unknown suffix; use one of \.pth, "):
        weight_files.read(tmp_path / "w.onnx")
    with pytest.raises(ValueError, match=r"w\.pt has an unknown suffix; write \.safetensors or"):
        weight_files.write(tmp_path / "w.pt", {})
