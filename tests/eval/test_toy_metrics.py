"""Metric checks against closed forms, scipy, and small fake datasets (no dependence on jumpflow.data's toys)."""

import json
import math

import numpy as np
import pytest
import torch

import jumpflow.eval.toy_metrics as tm
from jumpflow.data.base import SampledDataset, TensorDataset
from jumpflow.errors import JumpflowError
from jumpflow.eval import (LOG_PROB_FLOOR, energy_distance, evaluate_samples, flow_map_error, mean_log_likelihood,
                           mmd, mode_balance, mode_coverage, sliced_wasserstein, support_fraction)


def gen(seed):
    return torch.Generator().manual_seed(seed)


class FakeGaussian(SampledDataset):
    """N(mu, std^2 I) in 2-D; exact flow map of the linear path x_t = (1 - t) x + t z."""
    name, shape = "fake_gaussian", (2,)
    has_density = has_flow_map = True

    def __init__(self, mu=(1.0, -2.0), std=0.5):
        self.mu, self.std = torch.tensor(mu), std

    def draw(self, n, generator):
        return self.mu + self.std * torch.randn(n, 2, generator=generator)

    def log_prob(self, x):
        return (-0.5 * ((x - self.mu) / self.std).pow(2).sum(1) - 2 * math.log(self.std) - math.log(2 * math.pi))

    def flow_map(self, z, t, s):
        # x_t ~ N((1 - t) mu, sigma_t^2 I): the flow map is the affine map between the two Gaussians.
        sig = lambda u: math.sqrt(((1 - u) * self.std) ** 2 + u ** 2)  # noqa: E731
        return (1 - s) * self.mu + sig(s) / sig(t) * (z - (1 - t) * self.mu)


class FakeCheckerboard(SampledDataset):
    """4x4 board on [-2, 2]^2; the 8 squares with even (column + row) hold uniform mass."""
    name, shape, n_modes = "fake_checkerboard", (2,), 8
    has_density = has_support = True

    def __init__(self, keep=None):
        squares = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        self.corners = torch.tensor(squares, dtype=torch.float32) - 2.0
        self.keep = torch.arange(8) if keep is None else torch.tensor(keep)  # a generator that drops modes

    def draw(self, n, generator):
        which = self.keep[torch.randint(0, len(self.keep), (n,), generator=generator)]
        return self.corners[which] + torch.rand(n, 2, generator=generator)

    def mode_of(self, x):
        cell = torch.floor(x + 2.0).long()
        inside = ((cell >= 0) & (cell < 4)).all(1) & ((cell[:, 0] + cell[:, 1]) % 2 == 0)
        index = cell[:, 0] * 2 + cell[:, 1] // 2  # squares listed row-major, two per column index
        return torch.where(inside, index, torch.full_like(index, -1))

    def in_support(self, x):
        return self.mode_of(x) >= 0

    def log_prob(self, x):
        inside = self.in_support(x)
        return torch.where(inside, torch.full((x.shape[0],), -math.log(8.0)), torch.full((x.shape[0],), -math.inf))


def box(n, seed):  # uniform over the checkerboard's bounding square: right marginals, half its mass off-support
    return 4.0 * torch.rand(n, 2, generator=gen(seed)) - 2.0


# --- sliced Wasserstein ---------------------------------------------------------------------------------------

def test_sliced_wasserstein_identical_and_1d_shift():
    x = torch.randn(300, 1, generator=gen(0))
    assert sliced_wasserstein(x, x.clone(), generator=gen(1)) == pytest.approx(0.0, abs=1e-12)
    # in 1-D every direction is +-1, so a shift by c moves every quantile by c: W2 = |c|
    x = x.double()  # so that x + c is an exact shift
    assert sliced_wasserstein(x, x - 1.7, generator=gen(1)) == pytest.approx(1.7, rel=1e-9)
    # unequal sizes: y repeats x twice (same empirical law), shifted
    assert sliced_wasserstein(x, torch.cat([x, x]) + 0.3, generator=gen(1)) == pytest.approx(0.3, rel=1e-9)


def test_sliced_wasserstein_unequal_sizes_by_hand():
    # quantiles of {0, 1} and {0, 0.5, 1} differ by 0.5 on (1/3, 2/3]: W2^2 = 0.25 / 3
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]])
    assert sliced_wasserstein(x, y, generator=gen(0)) == pytest.approx(math.sqrt(1 / 12), rel=1e-9)
    assert sliced_wasserstein(y, x, generator=gen(0)) == pytest.approx(math.sqrt(1 / 12), rel=1e-9)


def test_sliced_wasserstein_shift_in_d_dims():
    # A shift c projects to the 1-D shift <theta, c>, so SW2^2 = |c|^2 mean cos^2(theta, c). For theta uniform on
    # the sphere, sum_i theta_i^2 = 1 and symmetry give E[cos^2] = 1/D, hence SW2 -> |c| / sqrt(D).
    d, c = 3, torch.tensor([3.0, 0.0, -4.0])
    x = torch.randn(200, d, generator=gen(0))
    value = sliced_wasserstein(x, x + c, n_projections=4096, generator=gen(5))
    theta = tm._directions(d, 4096, gen(5))
    exact = c.norm().item() * ((theta @ c.double() / c.norm().item()) ** 2).mean().sqrt().item()
    assert value == pytest.approx(exact, rel=1e-9)
    assert value == pytest.approx(5.0 / math.sqrt(d), rel=0.03)


def test_sliced_wasserstein_flattens_images():
    x = torch.randn(50, 1, 4, 4, generator=gen(0))
    assert sliced_wasserstein(x, x.reshape(50, 16), generator=gen(1)) == pytest.approx(0.0, abs=1e-12)


# --- energy distance ------------------------------------------------------------------------------------------

def test_energy_distance_same_vs_different_law():
    x, y = torch.randn(800, 2, generator=gen(0)), torch.randn(800, 2, generator=gen(1))
    same, shifted = energy_distance(x, y), energy_distance(x, y + torch.tensor([1.0, 0.0]))
    assert abs(same) < 0.01
    assert shifted > 0.3  # population value for a unit shift of N(0, I) in 2-D is ~0.45


def test_energy_distance_matches_scipy_v_statistic():
    from scipy.stats import energy_distance as scipy_energy
    x, y = torch.randn(200, generator=gen(0)), 0.5 + 2.0 * torch.randn(150, generator=gen(1))
    expected = scipy_energy(x.numpy().astype(np.float64), y.numpy().astype(np.float64)) ** 2
    assert energy_distance(x, y, unbiased=False) == pytest.approx(expected, rel=1e-9)
    # U-statistics divide the same within-set sums by N(N-1) instead of N^2
    sxx, syy = [np.abs(a[:, None] - a[None, :]).sum(dtype=np.float64) for a in (x.numpy(), y.numpy())]
    n, m = len(x), len(y)
    correction = sxx * (1 / n**2 - 1 / (n * (n - 1))) + syy * (1 / m**2 - 1 / (m * (m - 1)))
    assert energy_distance(x, y) == pytest.approx(expected + correction, rel=1e-6)


def test_pairwise_sums_do_not_depend_on_chunking(monkeypatch):
    x, y = torch.randn(97, 3, generator=gen(0)), torch.randn(61, 3, generator=gen(1)) + 0.5
    whole = (energy_distance(x, y), mmd(x, y))
    monkeypatch.setattr(tm, "_CHUNK_ELEMENTS", 500)  # blocks of 5-8 rows: exercises the diagonal offsets
    chunked = (energy_distance(x, y), mmd(x, y))
    assert chunked == pytest.approx(whole, rel=1e-10)


# --- MMD ------------------------------------------------------------------------------------------------------

def test_mmd_same_vs_shifted():
    x, y = torch.randn(600, 2, generator=gen(0)), torch.randn(600, 2, generator=gen(1))
    same, shifted = mmd(x, y), mmd(x, y + 1.0)
    assert abs(same) < 0.005
    assert shifted > 20 * max(abs(same), 1e-3)
    assert mmd(x, y + 1.0, bandwidths=[1.0]) > 0.05


# --- ground-truth metrics -------------------------------------------------------------------------------------

def test_support_fraction_sees_through_the_bounding_box():
    data = FakeCheckerboard()
    real = data.draw(2000, gen(0))
    assert support_fraction(real, data) == 1.0
    assert support_fraction(box(2000, 1), data) == pytest.approx(0.5, abs=0.04)
    assert mode_balance(box(2000, 1), data, real) > 0.45  # half the box's mass sits in the "no mode" bin
    assert mode_balance(data.draw(2000, gen(2)), data, real) < 0.06


def test_mode_coverage_detects_dropped_modes():
    data, collapsed = FakeCheckerboard(), FakeCheckerboard(keep=[0, 2, 5, 7, 1])
    real = data.draw(2000, gen(0))
    assert mode_coverage(data.draw(2000, gen(1)), data) == 1.0
    assert mode_coverage(collapsed.draw(2000, gen(1)), data) == pytest.approx(5 / 8)
    assert mode_balance(collapsed.draw(2000, gen(1)), data, real) == pytest.approx(3 / 8, abs=0.05)


def test_mean_log_likelihood_clamps_outside_support():
    data = FakeCheckerboard()
    assert mean_log_likelihood(data.draw(100, gen(0)), data) == pytest.approx(-math.log(8.0))
    x = torch.cat([data.draw(50, gen(0)), torch.tensor([[0.5, -0.5]]).repeat(50, 1)])  # a gap square
    assert mean_log_likelihood(x, data) == pytest.approx(0.5 * (-math.log(8.0) + LOG_PROB_FLOOR))
    assert mean_log_likelihood(x, data, floor=None) == -math.inf


def test_mean_log_likelihood_gaussian_entropy():
    data = FakeGaussian()
    expected = -(1 + math.log(2 * math.pi * data.std ** 2))  # minus the entropy of a 2-D N(mu, std^2 I)
    assert mean_log_likelihood(data.draw(5000, gen(0)), data) == pytest.approx(expected, abs=0.05)


def test_flow_map_error_exact_and_shifted():
    data = FakeGaussian()
    z = torch.randn(500, 2, generator=gen(0))
    exact = data.mu + data.std * z  # flow_map(z, 1, 0): noise to data
    assert flow_map_error(exact, z, data) == pytest.approx(0.0, abs=1e-6)
    offset = torch.tensor([0.3, -0.4])
    assert flow_map_error(exact + offset, z, data) == pytest.approx(0.5, rel=1e-5)
    spread = (exact - exact.mean(0)).pow(2).sum(1).mean().sqrt().item()  # ~ std * sqrt(2)
    assert flow_map_error(exact + offset, z, data, relative=True) == pytest.approx(0.5 / spread, rel=1e-5)
    with pytest.raises(JumpflowError):
        flow_map_error(exact, z, FakeCheckerboard())


# --- evaluate_samples -----------------------------------------------------------------------------------------

def test_evaluate_samples_floors_and_serialisable():
    data = FakeCheckerboard()
    good = evaluate_samples(data.draw(1000, gen(10)), data, seed=3)
    collapsed = evaluate_samples(FakeCheckerboard(keep=[0, 2, 5, 7, 1]).draw(1000, gen(11)), data, seed=3)
    bad = evaluate_samples(box(1000, 11), data, seed=3)
    keys = {"n_samples"} | {k + s for k in ("sliced_wasserstein", "energy_distance", "mmd", "log_likelihood",
                                            "support_fraction", "mode_coverage", "mode_balance")
                                 for s in ("", "_floor")}
    assert set(good) == keys and set(bad) == keys and set(collapsed) == keys
    assert json.loads(json.dumps(bad)) == bad
    assert all(type(v) is float and math.isfinite(v) for v in bad.values())
    assert good["support_fraction_floor"] == 1.0 and good["log_likelihood_floor"] == pytest.approx(-math.log(8))
    for name in ("sliced_wasserstein", "energy_distance", "mmd", "mode_balance"):  # 3 of 8 modes missing
        assert collapsed[name] > 5 * abs(collapsed[name + "_floor"])
        assert good[name] < abs(good[name + "_floor"]) + 0.02
    assert collapsed["mode_coverage"] == 5 / 8 and collapsed["mode_coverage_floor"] == 1.0
    # the bounding box: the support metrics flag it plainly
    assert bad["support_fraction"] < 0.6 and bad["log_likelihood"] < -10
    assert bad["mode_balance"] > 5 * bad["mode_balance_floor"]
    assert good["sliced_wasserstein_floor"] == bad["sliced_wasserstein_floor"]  # same reference, same projections


def test_evaluate_samples_flow_map_and_density():
    data = FakeGaussian()
    z = torch.randn(400, 2, generator=gen(0))
    out = evaluate_samples(data.flow_map(z, 1.0, 0.0) + 0.1, data, noise=z, n_reference=600)
    assert out["flow_map_error"] == pytest.approx(0.1 * math.sqrt(2), rel=1e-5)
    assert "support_fraction" not in out and "floor_note" not in out
    assert out["log_likelihood"] < out["log_likelihood_floor"] + 0.1


def test_evaluate_samples_short_finite_reference_uses_halves():
    test_split = torch.rand(300, 1, 4, 4, generator=gen(0)) * 2 - 1  # image-shaped finite data
    data = TensorDataset("tiny", train=test_split, test=test_split)
    out = evaluate_samples(torch.rand(200, 1, 4, 4, generator=gen(1)) * 2 - 1, data)
    assert "150" in out["floor_note"]
    assert evaluate_samples(torch.rand(200, 1, 4, 4, generator=gen(1)) * 2 - 1, data) == out  # deterministic
    assert out["sliced_wasserstein"] < 3 * out["sliced_wasserstein_floor"]  # same law: value ~ floor
    far = evaluate_samples(torch.rand(200, 1, 4, 4, generator=gen(1)) + 1.0, data)
    assert far["energy_distance"] > 50 * abs(far["energy_distance_floor"])


def test_gaussian_mixture_dataset_if_present():  # the package's own mixture (its flow map is too slow to use here)
    gm = pytest.importorskip("jumpflow.data.gaussian_mixture")
    data = gm.GaussianMixture(weights=[1.0, 1.0], means=[[-2.0, 0.0], [2.0, 0.0]], covs=[0.3, 0.3])
    out = evaluate_samples(data.draw(200, gen(0)), data, seed=1)
    assert json.loads(json.dumps(out)) == out and all(math.isfinite(v) for v in out.values())
    assert out["mode_coverage"] == 1.0 and abs(out["log_likelihood"] - out["log_likelihood_floor"]) < 0.3
    one_mode = evaluate_samples(data.draw(200, gen(1)).abs(), data, seed=1)  # mirrors all mass to x > 0
    assert one_mode["mode_coverage"] == 0.5 and one_mode["mode_balance"] > 0.4
