"""CIFAR-10 loader on small fake copies of both official layouts (binary and python), 20 images per batch file."""

import importlib
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

import jumpflow.data
from jumpflow.data.cifar10 import cifar10
from jumpflow.errors import JumpflowError

N = 20  # records per batch file (the real files hold 10000)
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _content(seed: int):
    """(pixels (N, 3, 32, 32) uint8, labels (N,)) for one batch file; pixel (0, 1, 2, 3) of record 0 is marked."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(N, 3, 32, 32), dtype=np.uint8)
    pixels[0, 1, 2, 3] = 7  # green channel, row 2, column 3: must come back at exactly that place
    pixels[0, :, 0, 0] = (0, 255, 128)  # the extremes of the range, at (r, g, b) of pixel (0, 0)
    return pixels, rng.integers(0, 10, size=N).astype(np.uint8)


def _write_bin(folder, contents):
    folder.mkdir(parents=True)
    for name, (pixels, labels) in zip(BATCHES, contents):
        records = np.concatenate([labels[:, None], pixels.reshape(N, -1)], axis=1)  # label byte + R, G, B planes
        (folder / f"{name}.bin").write_bytes(records.tobytes())


def _write_py(folder, contents):
    folder.mkdir(parents=True)
    for name, (pixels, labels) in zip(BATCHES, contents):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": pixels.reshape(N, -1), b"labels": labels.tolist()}, f, protocol=2)


@pytest.fixture
def contents():
    return [_content(seed) for seed in range(len(BATCHES))]


def _check(ds, contents):
    train_pixels = np.concatenate([p for p, _ in contents[:5]])
    assert ds.name == "cifar10" and ds.kind == "image" and ds.shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.train.shape == (5 * N, 3, 32, 32) and ds.test.shape == (N, 3, 32, 32)
    assert ds.train.dtype == torch.float32 and ds.train.min() == -1 and ds.train.max() == 1
    assert torch.equal(ds.train, torch.from_numpy(train_pixels).float() / 127.5 - 1)  # exact x / 127.5 - 1
    assert torch.equal(((ds.test + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(contents[5][0]))
    assert ds.train[0, 1, 2, 3].item() == pytest.approx(7 / 127.5 - 1, abs=1e-6)  # channel, row, column in place
    assert ds.train[0, :, 0, 0].tolist() == pytest.approx([-1, 1, 128 / 127.5 - 1], abs=1e-6)
    assert ds.train_labels.dtype == torch.int64
    assert ds.train_labels.tolist() == np.concatenate([y for _, y in contents[:5]]).tolist()
    assert ds.test_labels.tolist() == contents[5][1].tolist()


def test_binary_and_python_versions_agree(tmp_path, contents):
    _write_bin(tmp_path / "a" / "cifar-10-batches-bin", contents)
    _write_py(tmp_path / "b" / "cifar-10-batches-py", contents)
    binary, python = cifar10(tmp_path / "a"), cifar10(tmp_path / "b" / "cifar-10-batches-py")  # parent or folder
    _check(binary, contents)
    _check(python, contents)
    for field in ("train", "test", "train_labels", "test_labels"):
        assert torch.equal(getattr(binary, field), getattr(python, field))


def test_numpy1_style_pickles_load(tmp_path, contents):
    # the official files name numpy.core.multiarray (NumPy 1); NumPy 2 writes numpy._core: both must load
    _write_py(tmp_path / "cifar-10-batches-py", contents)
    for name in BATCHES:
        path = tmp_path / "cifar-10-batches-py" / name
        path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    _check(cifar10(tmp_path), contents)


@pytest.mark.parametrize("writer, folder", [(_write_bin, "cifar-10-batches-bin"), (_write_py, "cifar-10-batches-py")])
def test_tar_gz_archive_read_in_memory(tmp_path, contents, writer, folder):
    writer(tmp_path / "src" / folder, contents)
    archive = tmp_path / "cifar-10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / folder, arcname=folder)
    _check(cifar10(archive), contents)
    assert sorted(os.listdir(tmp_path)) == ["cifar-10.tar.gz", "src"]  # nothing extracted to disk
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(JumpflowError, match=r"cifar-10\.tar\.gz: could not read the archive"):
        cifar10(archive)


def test_env_var_and_load_by_name(tmp_path, contents, monkeypatch):
    _write_bin(tmp_path / "cifar-10-batches-bin", contents)
    assert "cifar10" in jumpflow.data.names()
    _check(jumpflow.data.load("cifar10", root=str(tmp_path)), contents)
    monkeypatch.setenv("JUMPFLOW_CIFAR10", str(tmp_path))
    ds = jumpflow.data.load("cifar10", n_test=5)
    assert ds.test.shape == (5, 3, 32, 32) and ds.test_labels.tolist() == contents[5][1][:5].tolist()
    with pytest.raises(JumpflowError, match=r"n_test must be an integer in \[1, 20\]"):
        cifar10(tmp_path, n_test=21)


class _RunsACommand:
    def __reduce__(self):
        return os.system, ("echo x",)  # pickled as a reference only: the test never unpickles it with pickle


def test_pickle_with_other_globals_is_refused(tmp_path, contents, monkeypatch):
    _write_py(tmp_path / "cifar-10-batches-py", contents)
    evil = {b"data": _RunsACommand(), b"labels": [0] * N}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    ran = []
    for module in (os, importlib.import_module(os.system.__module__)):  # os.system is posix.system (nt on Windows)
        monkeypatch.setattr(module, "system", ran.append)  # a safety net: a resolved reference records, never runs
    with pytest.raises(JumpflowError, match=r"data_batch_3: not a CIFAR-10 batch: .*system.*refusing"):
        cifar10(tmp_path)
    assert ran == []


def test_missing_folder_says_what_was_looked_for(tmp_path):
    with pytest.raises(JumpflowError, match=r"CIFAR-10 not found at .*nowhere.*cifar-10-batches-bin.*"
                                            r"cifar\.html.*data_options\.root.*JUMPFLOW_CIFAR10"):
        cifar10(tmp_path / "nowhere")


def test_incomplete_and_corrupt_files_are_named(tmp_path, contents):
    folder = tmp_path / "cifar-10-batches-bin"
    _write_bin(folder, contents)
    (folder / "test_batch.bin").unlink()
    with pytest.raises(JumpflowError, match=r"incomplete CIFAR-10: expected .*test_batch"):
        cifar10(tmp_path)
    _write_bin(tmp_path / "b" / "cifar-10-batches-bin", contents)
    path = tmp_path / "b" / "cifar-10-batches-bin" / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])  # truncated mid-record
    with pytest.raises(JumpflowError, match=r"data_batch_2\.bin: .* not a whole number of 3073-byte records"):
        cifar10(tmp_path / "b")
    (folder / "test_batch.bin").write_bytes(bytes([10]) + bytes(3072))  # label 10 does not exist
    with pytest.raises(JumpflowError, match=r"test_batch\.bin: labels must be 0\.\.9, found 10\.\.10"):
        cifar10(folder)


def test_corrupt_pickle_is_named(tmp_path, contents):
    folder = tmp_path / "cifar-10-batches-py"
    _write_py(folder, contents)
    (folder / "data_batch_4").write_bytes((folder / "data_batch_4").read_bytes()[:1000])
    with pytest.raises(JumpflowError, match=r"data_batch_4: could not unpickle it .*truncated or corrupt"):
        cifar10(tmp_path)
    with open(folder / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((N, 10), np.uint8), b"labels": [0] * N}, f, protocol=2)
    with pytest.raises(JumpflowError, match=r"data_batch_4: expected 'data' to be a uint8 array \(n, 3072\)"):
        cifar10(tmp_path)
