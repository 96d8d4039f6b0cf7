"""GaussianMixture against the closed forms of METHODS.md §1.1-§1.3."""

import math

import pytest
import torch
from scipy import stats

from jumpflow.data import GaussianMixture, gmm1d, load
from jumpflow.errors import JumpflowError

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny: extra intra-op threads only add overhead, badly so on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gaussian(seed=0, d=3):
    """A single anisotropic Gaussian (one narrow direction) and its parameters."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=D64)
    sigma = a @ a.T + 0.05 * torch.eye(d, dtype=D64)
    mu = torch.randn(d, generator=g, dtype=D64)
    return GaussianMixture([1.0], mu[None], sigma[None]), mu, sigma


def _sqrtm(m):
    lam, u = torch.linalg.eigh(m)
    return u @ torch.diag(lam.sqrt()) @ u.T


def _closed_velocity(z, t, mu, sigma):  # §1.1: v = -mu + (tI - (1-t) Sigma) S_t^{-1} (z - m_t)
    eye = torch.eye(len(mu), dtype=D64)
    s_t = (1 - t) ** 2 * sigma + t**2 * eye
    return -mu + (z - (1 - t) * mu) @ torch.linalg.solve(s_t, t * eye - (1 - t) * sigma).T


def _closed_flow(z, t, r, mu, sigma):  # §1.1: Phi_{t->r}(z) = m_r + S_r^{1/2} S_t^{-1/2} (z - m_t)
    eye = torch.eye(len(mu), dtype=D64)
    s = lambda u: (1 - u) ** 2 * sigma + u**2 * eye  # noqa: E731
    m = _sqrtm(s(r)) @ torch.linalg.inv(_sqrtm(s(t)))
    return (1 - r) * mu + (z - (1 - t) * mu) @ m.T


def _two_modes():
    cov = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.05, 0.0], [0.0, 0.4]]], dtype=D64)
    return GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -1.0]], cov)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_velocity_single_gaussian_closed_form(t):
    gmm, mu, sigma = _gaussian()
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=D64)
    torch.testing.assert_close(gmm.velocity(z, t), _closed_velocity(z, t, mu, sigma), rtol=1e-9, atol=1e-9)


def test_velocity_standard_normal_sanity():
    gmm = GaussianMixture([1.0], torch.zeros(1, 2), torch.ones(1))  # mu = 0, Sigma = I via isotropic std
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    t = torch.rand(16, generator=torch.Generator().manual_seed(3))  # one t per point
    expected = ((2 * t - 1) / ((1 - t) ** 2 + t**2))[:, None] * z
    torch.testing.assert_close(gmm.velocity(z, t), expected, rtol=1e-5, atol=1e-6)
    assert gmm.velocity(z, t).dtype == torch.float32


def test_score_matches_autograd_and_velocity_identities():
    gmm = _two_modes()
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=D64).requires_grad_(True)
    t = 0.37
    comps = [torch.distributions.MultivariateNormal((1 - t) * m, (1 - t) ** 2 * c + t**2 * torch.eye(2, dtype=D64))
             for m, c in zip(gmm.means, gmm.covs)]
    log_pt = torch.logsumexp(torch.stack([w.log() + c.log_prob(z) for w, c in zip(gmm.weights, comps)]), 0)
    (score,) = torch.autograd.grad(log_pt.sum(), z)
    z = z.detach()
    torch.testing.assert_close(gmm.score(z, t), score, rtol=1e-9, atol=1e-9)
    eps_hat = -t * score  # §0: eps_hat = -t s, v = (eps_hat - z) / (1 - t), x_hat = z - t v
    v = gmm.velocity(z, t)
    torch.testing.assert_close(v, (eps_hat - z) / (1 - t), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gmm.denoiser(z, t), z - t * v)


def test_velocity_matches_monte_carlo_posterior():
    # v(z, t) = E[eps - x | z_t = z], estimated by self-normalised importance sampling of x ~ p_data
    gmm, t = _two_modes(), 0.6
    g = torch.Generator().manual_seed(5)
    x = gmm.draw(200_000, g).double()
    z = torch.tensor([[0.0, 0.0], [-0.8, 0.3], [0.5, -0.6]], dtype=D64)
    for zi, vi in zip(z, gmm.velocity(z, t)):
        logw = -((zi - (1 - t) * x) ** 2).sum(1) / (2 * t**2)  # log N(z; (1-t) x, t^2 I) up to a constant
        w = torch.softmax(logw, 0)[:, None]
        v_mc = (w * ((zi - (1 - t) * x) / t - x)).sum(0)  # eps = (z - (1-t) x) / t
        torch.testing.assert_close(vi, v_mc, atol=0.02, rtol=0)


@pytest.mark.parametrize("t, r", [(1.0, 0.0), (0.8, 0.3)])
def test_flow_map_single_gaussian_closed_form(t, r):
    gmm, mu, sigma = _gaussian()
    z = torch.randn(32, 3, generator=torch.Generator().manual_seed(6), dtype=D64)
    torch.testing.assert_close(gmm.flow_map(z, t, r), _closed_flow(z, t, r, mu, sigma), rtol=0, atol=1e-6)


def test_flow_map_semigroup_and_boundary():
    gmm = _two_modes()
    z = 1.5 * torch.randn(32, 2, generator=torch.Generator().manual_seed(7), dtype=D64)
    direct = gmm.flow_map(z, 0.9, 0.05)
    composed = gmm.flow_map(gmm.flow_map(z, 0.9, 0.4), 0.4, 0.05)
    torch.testing.assert_close(composed, direct, rtol=0, atol=1e-7)
    assert torch.equal(gmm.flow_map(z, 0.5, 0.5), z)
    with pytest.raises(JumpflowError, match="earlier"):
        gmm.flow_map(z, 0.2, 0.5)


def test_push_forward_of_noise_matches_1d_mixture():
    gmm = gmm1d()
    eps = torch.randn(2000, 1, generator=torch.Generator().manual_seed(8), dtype=D64)
    x = gmm.flow_map(eps, 1.0, 0.0)[:, 0]
    # In 1-D the ODE flow is monotone, so it must map noise quantiles to data quantiles: F_data(x) = Phi(eps)
    cdf = 0.5 * (stats.norm.cdf((x + 2) / 0.3) + stats.norm.cdf((x - 2) / 0.3))
    assert abs(cdf - stats.norm.cdf(eps[:, 0])).max() < 1e-4
    assert abs(x.mean()) < 0.15 and abs(x.std() - math.sqrt(4 + 0.09)) < 0.1
    assert abs((x > 0).double().mean() - 0.5) < 0.05
    assert stats.kstest(x.numpy(), lambda v: 0.5 * (stats.norm.cdf((v + 2) / 0.3) + stats.norm.cdf((v - 2) / 0.3)))\
        .pvalue > 0.01


def test_log_prob_integrates_to_one_and_draw_matches():
    gmm = gmm1d()
    grid = torch.linspace(-6, 6, 24001, dtype=D64)[:, None]
    assert abs(torch.trapezoid(gmm.log_prob(grid).exp(), grid[:, 0]).item() - 1) < 1e-6
    x = gmm.draw(20000, torch.Generator().manual_seed(9))
    assert x.dtype == torch.float32 and x.shape == (20000, 1)
    assert abs((x > 0).float().mean() - 0.5) < 0.02
    assert abs(x[x > 0].std() - 0.3) < 0.01
    assert gmm.n_modes == 2 and set(gmm.mode_of(x).tolist()) == {0, 1}
    assert (gmm.mode_of(x) == (x[:, 0] > 0).long()).all()
    assert gmm.in_support(x).float().mean() > 0.99
    assert not gmm.in_support(torch.tensor([[0.0], [3.5]])).any()  # 6.7 std from both means


def test_multivariate_log_prob_against_torch_distributions():
    gmm = _two_modes()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(10), dtype=D64)
    ref = torch.logsumexp(torch.stack([w.log() + torch.distributions.MultivariateNormal(m, c).log_prob(x)
                                       for w, m, c in zip(gmm.weights, gmm.means, gmm.covs)]), 0)
    torch.testing.assert_close(gmm.log_prob(x), ref)


def test_generic_gmm_entry_any_dimension():
    gmm = load("gmm", dim=8, n_components=4)
    assert gmm.shape == (8,) and gmm.n_modes == 4 and gmm.kind == "vector"
    assert torch.equal(gmm.means, load("gmm", dim=8, n_components=4).means)  # fixed seed -> fixed mixture
    assert torch.cdist(gmm.means, gmm.means).add(torch.eye(4) * 99).min() >= 6 * 0.2
    x = gmm.draw(100, torch.Generator().manual_seed(11))
    assert x.shape == (100, 8) and gmm.velocity(x, 0.5).shape == (100, 8)
    with pytest.raises(JumpflowError, match="could not place"):
        load("gmm", dim=1, n_components=20)


@pytest.mark.parametrize("kwargs, word", [
    (dict(weights=[1.0, 1.0], means=[[0.0, 0.0]], covs=[1.0]), "weights"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0, 0.0], [0.0, -1.0]]]), "positive definite"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0, 0.5], [0.0, 1.0]]]), "symmetric"),
    (dict(weights=[1.0], means=[0.0, 0.0], covs=[1.0]), "dims"),
    (dict(weights=[1.0], means=[[0.0, float("nan")]], covs=[1.0]), "finite"),
])
def test_bad_construction_raises(kwargs, word):
    with pytest.raises(JumpflowError, match=word):
        GaussianMixture(**kwargs)


def test_bad_calls_raise():
    gmm = gmm1d()
    with pytest.raises(JumpflowError, match=r"\(N, 1\)"):
        gmm.velocity(torch.zeros(3, 2), 0.5)
    with pytest.raises(JumpflowError, match=r"\[0, 1\]"):
        gmm.velocity(torch.zeros(3, 1), 1.5)
    with pytest.raises(JumpflowError, match="one per point"):
        gmm.score(torch.zeros(3, 1), torch.zeros(4))


def test_far_points_stay_finite_log_space_responsibilities():
    # 40 units from the modes at t=0.01 every component density underflows in linear space; in log space the
    # nearest component takes all the responsibility, so v is that component's §1.1 velocity.
    gmm, t = gmm1d(), 0.01
    z = torch.tensor([[40.0], [-40.0]], dtype=D64)
    single = GaussianMixture([1.0], [[2.0]], [0.3])
    v = gmm.velocity(z, t)
    assert torch.isfinite(v).all() and torch.isfinite(gmm.log_prob(z)).all()
    torch.testing.assert_close(v[:1], single.velocity(z[:1], t))
