"""Finite datasets: digits, .npy/.npz arrays, image folders."""

import numpy as np
import pytest
import torch

from jumpflow.data import TensorDataset, digits, load, load_array, load_image_folder
from jumpflow.errors import JumpflowError


def _rows(t):  # a set-like, order-free view of a 2-D tensor
    return sorted(map(tuple, t.tolist()))


def test_digits_shapes_range_labels_split():
    pytest.importorskip("sklearn")
    ds = load("digits")
    assert isinstance(ds, TensorDataset) and ds.kind == "image" and ds.shape == (1, 8, 8)
    assert ds.train.shape == (1347, 1, 8, 8) and ds.test.shape == (450, 1, 8, 8)
    assert ds.train.min() == -1 and ds.train.max() == 1
    assert ds.num_classes == 10 and set(ds.train_labels.tolist()) == set(range(10))
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.shape == (450,)
    again = digits()
    assert torch.equal(again.test, ds.test) and torch.equal(again.train_labels, ds.train_labels)
    x, y = ds.sample_batch(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 8, 8) and y.shape == (5,)


def test_array_float_vectors_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float64) * 10
    np.save(tmp_path / "vec.npy", x)
    ds = load(str(tmp_path / "vec.npy"))
    assert ds.name == "vec" and ds.kind == "vector" and ds.shape == (3,) and ds.num_classes == 0
    assert ds.train.shape == (45, 3) and ds.test.shape == (5, 3)
    assert _rows(torch.cat([ds.train, ds.test])) == _rows(torch.from_numpy(x.astype(np.float32)))
    assert torch.equal(load_array(tmp_path / "vec.npy").test, ds.test)  # deterministic split
    assert load_array(tmp_path / "vec.npy", test_fraction=0.0).test.shape == (1, 3)  # at least one held out


def test_array_uint8_images_channels_last_and_labels(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, size=(20, 5, 5, 3), dtype=np.uint8)
    imgs[0, 0, 0, 0], imgs[0, 0, 0, 1] = 0, 255
    labels = np.arange(20) % 4
    np.savez(tmp_path / "img.npz", x=imgs, y=labels)
    ds = load(str(tmp_path / "img.npz"))
    assert ds.kind == "image" and ds.shape == (3, 5, 5) and ds.num_classes == 4
    allx = torch.cat([ds.train, ds.test])
    assert allx.min() == -1 and allx.max() == 1
    expected = torch.from_numpy(imgs.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    ally = torch.cat([ds.train_labels, ds.test_labels])
    # each loaded image is the scaled transposed original with its label kept alongside
    for img, lab in zip(allx, ally):
        match = [i for i in range(20) if torch.allclose(expected[i], img)]
        assert len(match) == 1 and labels[match[0]] == lab


def test_npz_key_rules(tmp_path):
    np.savez(tmp_path / "only.npz", data=np.zeros((4, 2), np.float32))
    assert load_array(tmp_path / "only.npz").shape == (2,)
    np.savez(tmp_path / "arr.npz", np.ones((4, 2)), np.zeros((4, 2)))  # arr_0 and arr_1: arr_0 wins
    assert load_array(tmp_path / "arr.npz").train.eq(1).all()
    np.savez(tmp_path / "amb.npz", a=np.zeros((4, 2)), b=np.zeros((4, 2)))
    with pytest.raises(JumpflowError, match="'x'"):
        load_array(tmp_path / "amb.npz")


@pytest.mark.parametrize("array, word", [
    (np.zeros(10, np.float32), "2 dims"),
    (np.zeros((3, 1, 2, 2, 2), np.float32), "5 dims"),
    (np.zeros((3, 4, 4), np.float32), "channel axis"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN or inf"),
    (np.array([["a", "b"], ["c", "d"]]), "dtype"),
    (np.zeros((3, 2), np.complex64), "dtype"),
    (np.zeros((3, 2), bool), "dtype"),
    (np.full((3, 1, 4, 4), 0.5) + np.eye(4) * 0.6, r"\[-1, 1\]"),
    (np.zeros((3, 1, 4, 4), np.int32), "uint8"),
    (np.zeros((1, 3), np.float32), "at least 2"),
])
def test_bad_arrays_raise(tmp_path, array, word):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(JumpflowError, match=word):
        load(str(tmp_path / "bad.npy"))


def test_bad_files_raise(tmp_path):
    with pytest.raises(JumpflowError, match="not found"):
        load(str(tmp_path / "missing.npy"))
    (tmp_path / "corrupt.npy").write_bytes(b"definitely not numpy")
    with pytest.raises(JumpflowError, match="could not read"):
        load(str(tmp_path / "corrupt.npy"))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(JumpflowError, match="could not read"):
        load(str(tmp_path / "corrupt.npz"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(JumpflowError, match="could not read"):  # pickles are refused, never executed
        load(str(tmp_path / "obj.npy"))
    np.savez(tmp_path / "badlab.npz", x=np.zeros((4, 2)), y=np.zeros((3,), np.int64))
    with pytest.raises(JumpflowError, match="labels"):
        load(str(tmp_path / "badlab.npz"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(JumpflowError, match="unsupported"):
        load(str(tmp_path / "notes.txt"))


def _write_png(path, color, size=(10, 6)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_with_classes(tmp_path):
    for i in range(3):
        _write_png(tmp_path / "cat" / f"{i}.png", (255, 0, 0))
        _write_png(tmp_path / "dog" / f"{i}.PNG", (0, 0, 255), size=(6, 9))
    ds = load(str(tmp_path), resolution=4)
    assert ds.kind == "image" and ds.shape == (3, 4, 4) and ds.num_classes == 2
    assert ds.class_names == ["cat", "dog"]
    x, y = torch.cat([ds.train, ds.test]), torch.cat([ds.train_labels, ds.test_labels])
    assert x.shape == (6, 3, 4, 4) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    for img, lab in zip(x, y):  # solid colours survive crop+resize, and the label follows the folder
        assert torch.allclose(img, red if lab == 0 else red.flip(0), atol=0.02)
    gray = load_image_folder(tmp_path, resolution=5, channels=1)
    assert gray.shape == (1, 5, 5)


def test_image_folder_unlabelled_and_errors(tmp_path):
    for i in range(3):
        _write_png(tmp_path / f"{i}.jpg", (0, 255, 0))
    _write_png(tmp_path / "sub" / "x.png", (0, 255, 0))  # not every image is in a subfolder -> no labels
    ds = load_image_folder(tmp_path, resolution=3)
    assert ds.num_classes == 0 and ds.train_labels is None and len(ds.train) + len(ds.test) == 4
    (tmp_path / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(JumpflowError, match="broken.png"):
        load_image_folder(tmp_path)
    with pytest.raises(JumpflowError, match="not found"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JumpflowError, match="no images"):
        load(str(tmp_path / "empty"))
    with pytest.raises(JumpflowError, match="channels"):
        load_image_folder(tmp_path / "sub", channels=2)


def test_latents_are_taken_as_they_are_and_train_on_an_image_backbone(tmp_path):
    """VAE latents (ImageNet-style (N, 4, H, W), values well outside [-1, 1]) load with latents=true (times `scale`)
    and train a DiT like images; without the flag they are refused as out-of-range images."""
    import jumpflow

    rng = np.random.default_rng(0)
    latents = (rng.standard_normal((40, 4, 8, 8)) * 3).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    path = tmp_path / "latents.npz"
    np.savez(path, x=latents, y=labels)
    with pytest.raises(JumpflowError, match=r"\[-1, 1\]"):
        load_array(path)
    data = load(str(path), latents=True, scale=0.5)
    assert data.kind == "image" and tuple(data.shape) == (4, 8, 8) and data.num_classes == 5
    everything = torch.cat([data.train, data.test])
    assert everything.abs().max() > 2  # not clipped to [-1, 1]
    assert torch.allclose(everything.sort(0).values, torch.from_numpy(latents * 0.5).sort(0).values)
    with pytest.raises(JumpflowError, match="latents=true expects a float array"):
        np.save(tmp_path / "vectors.npy", latents.reshape(40, -1))
        load_array(tmp_path / "vectors.npy", latents=True)
    with pytest.raises(JumpflowError, match="scale applies to latents only"):
        load_array(path, scale=0.18215)
    run = tmp_path / "run"
    jumpflow.train({"method": "meanflow", "data": str(path), "data_options": {"latents": True},
                    "class_conditional": True, "backbone": "dit", "backbone_options": {"size": "tiny"},
                    "steps": 2, "batch_size": 8, "sample_every": 0, "progress": False}, run)
    x = jumpflow.load(run).generate(6, steps=1, seed=0, cls=2)
    assert x.shape == (6, 4, 8, 8) and torch.isfinite(x).all()
