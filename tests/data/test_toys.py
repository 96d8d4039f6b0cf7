"""2-D toys and the dataset registry."""

import math

import pytest
import torch

from jumpflow.data import DATASETS, GaussianMixture, SampledDataset, load, names
from jumpflow.errors import JumpflowError

TOYS = ["checkerboard", "8gaussians", "moons", "spirals", "rings"]
N = 8000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", TOYS)
def test_toy_basics(name):
    ds = load(name)
    assert isinstance(ds, SampledDataset) and ds.name == name and ds.kind == "vector" and ds.shape == (2,)
    x = ds.draw(N, _gen())
    assert x.shape == (N, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, ds.draw(N, _gen()))  # seeded -> reproducible
    assert not torch.equal(x, ds.draw(N, _gen(1)))
    assert (x.abs() <= 2.5).all(1).float().mean() > 0.995  # "roughly unit scale"
    assert 0.4 < x.std(0).min() and x.std(0).max() < 1.6
    xb, labels = ds.sample_batch(16, _gen())
    assert xb.shape == (16, 2) and labels is None
    assert torch.equal(ds.reference(100), ds.reference(100))


def test_checkerboard_support_modes_density():
    ds = load("checkerboard")
    x = ds.draw(N, _gen())
    assert ds.in_support(x).all()
    counts = torch.bincount(ds.mode_of(x), minlength=8)
    assert counts.numel() == 8 and ((counts - N / 8).abs() < 0.15 * N / 8).all()
    white = torch.tensor([[-1.5, -0.5], [-0.5, -1.5], [2.5, 0.0], [0.0, -3.0]])  # white squares, outside
    assert (ds.mode_of(white) == -1).all() and not ds.in_support(white).any()
    torch.testing.assert_close(ds.log_prob(x[:5]), torch.full((5,), math.log(1 / 8)))
    assert torch.isinf(ds.log_prob(white)).all()
    # the 8 squares are the black ones of the board: lower-left corner square (0) and its diagonal neighbour (2)
    assert ds.mode_of(torch.tensor([[-1.5, -1.5], [-0.5, -0.5]])).tolist() == [0, 2]


def test_eight_gaussians_is_the_documented_mixture():
    ds = load("8gaussians")
    assert isinstance(ds, GaussianMixture) and ds.has_flow_map and ds.n_modes == 8
    torch.testing.assert_close(ds.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(ds.covs[:, 0, 0], torch.full((8,), 0.15**2, dtype=torch.float64))
    x = ds.draw(N, _gen())
    counts = torch.bincount(ds.mode_of(x), minlength=8)
    assert ((counts - N / 8).abs() < 0.15 * N / 8).all()
    assert ds.in_support(x).float().mean() > 0.98


def test_moons_standardised_and_two_arms():
    x = load("moons").draw(20000, _gen())
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(2), atol=0.03, rtol=0)
    assert not load("moons", noise=0.0).draw(100, _gen()).isnan().any()


def test_spirals_two_symmetric_arms():
    x = load("spirals", noise=0.0).draw(2000, _gen())
    r = x.norm(dim=1)
    assert r.max() <= 2.0 + 1e-5
    # noiseless points lie on r = 2 theta / (3 pi): the angle is fixed by the radius up to the arm's sign
    theta = 3 * math.pi * r / 2
    on_arm = torch.stack([r * theta.cos(), r * theta.sin()], 1)
    assert torch.minimum((x - on_arm).norm(dim=1), (x + on_arm).norm(dim=1)).max() < 1e-4


def test_rings_modes_and_support():
    ds = load("rings", n_rings=3)
    assert ds.n_modes == 3 and ds.has_support
    x = ds.draw(6000, _gen())
    counts = torch.bincount(ds.mode_of(x), minlength=3)
    assert ((counts - 2000).abs() < 200).all()
    assert ds.in_support(x).float().mean() > 0.99
    assert ds.mode_of(torch.tensor([[0.0, 2.0], [0.7, 0.0]])).tolist() == [2, 0]
    assert not ds.in_support(torch.tensor([[0.0, 1.0]])).any()  # halfway between rings 2/3 and 4/3


def test_registry_names_and_errors():
    assert {"checkerboard", "8gaussians", "moons", "spirals", "rings", "gmm1d", "gmm", "digits"} <= set(names())
    assert names() == DATASETS.names()
    assert load("gmm1d").shape == (1,)
    with pytest.raises(JumpflowError) as err:
        load("no-such-dataset")
    assert "checkerboard" in str(err.value) and ".npy" in str(err.value)
    with pytest.raises(JumpflowError, match="valid options"):
        load("moons", nosie=0.1)
    with pytest.raises(JumpflowError, match="noise"):
        load("rings", noise=-1)
    with pytest.raises(JumpflowError, match="n_rings"):
        load("rings", n_rings=0)
