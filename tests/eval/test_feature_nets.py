"""The digits feature net: accurate, its FD separates real from degraded images, deterministic, safely cached."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jumpflow.eval.feature_nets as fn
from jumpflow.cache import cache_dir
from jumpflow.data import load
from jumpflow.data.base import TensorDataset
from jumpflow.errors import JumpflowError
from jumpflow.eval.frechet import frechet_distance_from_features

N = 450  # equal sample counts on both sides: FD's bias depends on N
TINY = fn.FeatureNetRecipe(epochs=1, widths=(8,), feature_dim=16)  # for properties that need no accuracy


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("jumpflow_cache")
        mp.setenv("JUMPFLOW_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def net(digits):
    return fn.feature_net_for(digits)  # trained once (a few seconds), cached in the temporary folder


def features(net, images):
    return fn.extract(net, images)[0]


def state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same_weights(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JUMPFLOW_CACHE", str(tmp_path / "a"))
    assert cache_dir("x", "y") == tmp_path / "a" / "x" / "y" and (tmp_path / "a" / "x" / "y").is_dir()
    monkeypatch.delenv("JUMPFLOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("z") == tmp_path / "xdg" / "jumpflow" / "z"


def test_test_split_accuracy(net):
    assert net.test_accuracy >= 0.9, f"digits test accuracy {net.test_accuracy:.4f} (chance is 0.1)"


def test_extract_shapes_and_numpy_input(net, digits):
    f, logits = fn.extract(net, digits.test[:7].numpy(), batch_size=3)
    assert f.shape == (7, net.feature_dim) and logits.shape == (7, 10)
    torch.testing.assert_close(logits, net(digits.test[:7]))
    with pytest.raises(JumpflowError, match="shaped"):
        fn.extract(net, torch.zeros(2, 1, 16, 16))
    with pytest.raises(JumpflowError, match="NaN"):
        fn.extract(net, torch.full((2, 1, 8, 8), float("nan")))


def test_fd_separates_real_from_blurred_and_noise(net, digits):
    reference = features(net, digits.train[:N])
    real = digits.test[:N]
    blurred = F.avg_pool2d(F.pad(real, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # 3x3 box blur
    noise = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    fd = {name: frechet_distance_from_features(features(net, x), reference)
          for name, x in [("real", real), ("blurred", blurred), ("noise", noise)]}
    # measured with the default recipe: real ~0.6, blurred ~9.6, noise ~34
    assert fd["real"] < 0.2 * fd["blurred"], fd
    assert fd["real"] < 0.05 * fd["noise"], fd


def test_training_is_deterministic_and_leaves_global_rng_alone(digits):
    rng = torch.get_rng_state()
    a, b = fn.train_feature_net(digits, TINY), fn.train_feature_net(digits, TINY)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_weights(a, b)
    c = fn.train_feature_net(digits, fn.FeatureNetRecipe(epochs=1, widths=(8,), feature_dim=16, seed=1))
    assert not torch.equal(state(a)["classifier.weight"], state(c)["classifier.weight"])


def test_second_call_loads_from_cache(net, digits, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(fn, "train_feature_net", no_training)
    cached = fn.feature_net_for(digits)
    assert_same_weights(cached, net)
    assert cached.test_accuracy == net.test_accuracy
    assert torch.equal(features(cached, digits.test[:50]), features(net, digits.test[:50]))


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's data: still a valid safetensors file, wrong weights
    path.write_bytes(bytes(data))


def garbage(path):
    path.write_bytes(b"this is not a safetensors file")


@pytest.mark.parametrize("damage", [garbage, flip_last_byte])
def test_corrupt_cache_is_reported_and_retrained(digits, damage):
    first = fn.feature_net_for(digits, TINY)
    path = fn.cache_path(digits, TINY, fn.training_data_hash(digits))
    assert path.is_file()
    damage(path)
    with pytest.warns(UserWarning, match="corrupt"):
        retrained = fn.feature_net_for(digits, TINY)
    assert_same_weights(retrained, first)
    assert_same_weights(fn._load(path, digits, TINY, fn.training_data_hash(digits)), first)  # the file is whole again


def test_other_recipe_or_data_gets_another_cache_entry(digits):
    h = fn.training_data_hash(digits)
    assert fn.cache_path(digits, TINY, h) != fn.cache_path(digits, fn.FeatureNetRecipe(), h)
    other = load("digits", seed=1)
    assert fn.training_data_hash(other) != h


def test_unlabelled_or_non_image_data_is_refused(digits):
    unlabelled = TensorDataset("blobs", torch.rand(20, 1, 8, 8) * 2 - 1)
    with pytest.raises(JumpflowError, match=r"no class labels.*jumpflow\[fid\]"):
        fn.feature_net_for(unlabelled)
    with pytest.raises(JumpflowError, match="not a finite image dataset"):
        fn.train_feature_net(load("moons"))
    vectors = TensorDataset("vec", torch.rand(20, 5), train_labels=torch.zeros(20, dtype=torch.long), num_classes=2)
    with pytest.raises(JumpflowError, match="image"):
        fn.train_feature_net(vectors)
    tiny_images = TensorDataset("tiny", torch.rand(20, 1, 4, 4), train_labels=torch.zeros(20, dtype=torch.long),
                                num_classes=2)
    with pytest.raises(JumpflowError, match="8..64"):
        fn.train_feature_net(tiny_images)
    with pytest.raises(JumpflowError, match="epochs"):
        fn.feature_net_for(digits, fn.FeatureNetRecipe(epochs=0))


def test_features_are_float32_numpy_friendly(net, digits):
    f = features(net, digits.test[:5])
    assert f.dtype == torch.float32 and np.isfinite(f.numpy()).all()
