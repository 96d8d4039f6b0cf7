"""The FID path with a small stand-in extractor (torch-fidelity is optional and absent here), quantisation, errors."""

import sys
import types
import urllib.error

import numpy as np
import pytest
import torch

from jumpflow.errors import JumpflowError
from jumpflow.eval import fid, image_features, load_inception, save_statistics, to_uint8_rgb
from jumpflow.eval.inception import WEIGHTS_ENV


class StandIn(torch.nn.Module):
    """uint8 (B, 3, H, W) -> (B, 16) features: a fixed random conv and a global average pool, like Inception's API."""

    def __init__(self, as_tuple=True):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.as_tuple = torch.nn.Conv2d(3, 16, 3), as_tuple

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        out = torch.relu(self.conv(x.float() / 255)).mean(dim=(2, 3))
        return (out,) if self.as_tuple else out


def smooth_images(n, seed, channels=3):
    """Images in [-1, 1] made of smooth low-frequency patterns (a 4x4 field upsampled to 16x16)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, channels, 4, 4, generator=g)
    return torch.tanh(torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear"))


def noise_images(n, seed):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_to_uint8_rgb_exact_values():
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 2.0, 0.5]).reshape(1, 1, 2, 3)
    out = to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 3)
    # round((x + 1) * 127.5) after clamping: 0 -> 127.5 rounds to even 128; 0.5 -> 191.25 -> 191.
    assert out[0, 0].flatten().tolist() == [0, 128, 255, 0, 255, 191]
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # grey repeated to RGB
    rgb = smooth_images(2, 0)
    assert torch.equal(to_uint8_rgb(rgb), (rgb.clamp(-1, 1) + 1).mul(127.5).round().to(torch.uint8))


def test_to_uint8_rgb_refuses_bad_images():
    with pytest.raises(JumpflowError, match="C = 1"):
        to_uint8_rgb(torch.zeros(2, 2, 8, 8))
    with pytest.raises(JumpflowError, match="C = 1"):
        to_uint8_rgb(torch.zeros(3, 8, 8))
    with pytest.raises(JumpflowError, match="float in"):
        to_uint8_rgb(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(JumpflowError, match="NaN"):
        to_uint8_rgb(torch.full((1, 3, 4, 4), float("nan")))


def test_image_features_batches_and_outputs():
    images = smooth_images(23, 1)
    whole = image_features(images, StandIn(), batch_size=100)
    assert whole.shape == (23, 16) and whole.dtype == torch.float64 and whole.device.type == "cpu"
    torch.testing.assert_close(image_features(images, StandIn(as_tuple=False), batch_size=5), whole)
    grey = smooth_images(4, 2, channels=1)
    torch.testing.assert_close(image_features(grey, StandIn()), image_features(grey.expand(-1, 3, -1, -1), StandIn()))
    with pytest.raises(JumpflowError, match="batch_size"):
        image_features(images, StandIn(), batch_size=0)
    with pytest.raises(JumpflowError, match="extractor must return"):
        image_features(images, lambda x: x.float().mean().item())


def test_fid_with_stand_in_extractor(tmp_path):
    real, real2, noise = smooth_images(150, 3), smooth_images(150, 4), noise_images(150, 5)
    net = StandIn()
    assert abs(fid(real, reference=real, extractor=net)) < 1e-9
    same_law = fid(real2, reference=real, extractor=net, batch_size=64)
    far = fid(noise, reference=real, extractor=net)
    assert far > 10 * same_law > 0  # here about 30x
    # Precomputed reference statistics, as a pair and as an .npz file, give the same number.
    feats = image_features(real, net).numpy()
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert fid(noise, reference_stats=(mu, sigma), extractor=net) == pytest.approx(far, rel=1e-9)
    save_statistics(tmp_path / "ref.npz", mu, sigma)
    assert fid(noise, reference_stats=tmp_path / "ref.npz", extractor=net) == pytest.approx(far, rel=1e-9)
    assert fid(noise, reference_stats=str(tmp_path / "ref.npz"), extractor=net) == pytest.approx(far, rel=1e-9)


def test_fid_argument_errors():
    images = smooth_images(4, 6)
    with pytest.raises(JumpflowError, match="exactly one"):
        fid(images, extractor=StandIn())
    with pytest.raises(JumpflowError, match="exactly one"):
        fid(images, reference=images, reference_stats=(np.zeros(16), np.eye(16)), extractor=StandIn())
    with pytest.raises(JumpflowError, match="reference_stats must be"):
        fid(images, reference_stats=np.zeros(16), extractor=StandIn())


def fake_torch_fidelity(monkeypatch, extractor_class):
    """Install a stand-in torch_fidelity package exposing extractor_class as FeatureExtractorInceptionV3."""
    package = types.ModuleType("torch_fidelity")
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = extractor_class
    package.feature_extractor_inceptionv3 = module
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)


def test_load_inception_without_torch_fidelity(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes the import fail even where it is installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(JumpflowError, match=r"jumpflow\[fid\]"):
        load_inception()
    with pytest.raises(JumpflowError, match=r"jumpflow\[fid\]"):
        fid(smooth_images(4, 7), reference=smooth_images(4, 8))


def test_load_inception_weights_errors(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(JumpflowError, match=WEIGHTS_ENV):
        load_inception(weights_path=tmp_path / "missing.pth")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "also_missing.pth"))
    with pytest.raises(JumpflowError, match="also_missing.pth"):
        load_inception()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.delenv(WEIGHTS_ENV)
    fake_torch_fidelity(monkeypatch, offline)
    with pytest.raises(JumpflowError, match=f"no network.*{WEIGHTS_ENV}"):
        load_inception()


def test_default_path_goes_through_torch_fidelity(monkeypatch, tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in")
    calls = []

    class FakeInception(StandIn):
        def __init__(self, name, features, feature_extractor_weights_path=None):
            super().__init__()
            calls.append((name, features, feature_extractor_weights_path))

    fake_torch_fidelity(monkeypatch, FakeInception)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    net = load_inception()
    assert calls == [("inception-v3-compat", ["2048"], str(weights))]
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    real, noise = smooth_images(50, 9), noise_images(50, 10)
    assert fid(noise, reference=real) == pytest.approx(fid(noise, reference=real, extractor=StandIn()), rel=1e-12)
