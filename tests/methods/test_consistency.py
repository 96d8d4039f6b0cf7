import math

import pytest
import torch

from jumpflow import methods, nets
from jumpflow.data.toys import gmm1d
from jumpflow.errors import JumpflowError
from jumpflow.eval import mode_coverage, sliced_wasserstein
from jumpflow.methods.consistency import (ECT, ICT, consistency_function, consistency_pair, pseudo_huber,
                                          sampling_times, sigma_to_time, time_to_sigma)
from tests.gaussian import ExactGaussian, ExactVelocity
from tests.methods.toy_training import OneStepMap, random_mlp, train_with_trainer

MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4


# --- the boundary condition and the parameterisation -------------------------------------------------------------
def test_boundary_condition_holds_exactly_for_any_network():
    net = random_mlp()
    x = torch.randn(64, 2, dtype=torch.float64)
    assert torch.equal(consistency_function(net, x, torch.zeros(64, dtype=torch.float64)), x)  # f(x, 0) = x
    t = torch.full((64,), 0.5, dtype=torch.float64)
    assert (consistency_function(net, x, t) - x).abs().max() > 0.1  # and the net does act away from t = 0


def test_sigma_and_time_convert_by_equal_snr():
    sigma = torch.tensor([0.0, 0.002, 0.821, 1.0, 80.0], dtype=torch.float64)
    t = sigma_to_time(sigma)
    assert torch.allclose(t, torch.tensor([0.0, 0.002 / 1.002, 0.821 / 1.821, 0.5, 80 / 81], dtype=torch.float64))
    assert torch.allclose(time_to_sigma(t), sigma)
    # z_t = x_sigma / (1 + sigma): the EDM point x + sigma eps scaled onto jumpflow's path.
    x, eps = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    s, tt = torch.tensor(3.0, dtype=torch.float64), sigma_to_time(torch.tensor(3.0, dtype=torch.float64))
    assert torch.allclose((1 - tt) * x + tt * eps, (x + s * eps) / (1 + s))


# --- CT's identity: the exact map to 0 is the fixed point of the target ------------------------------------------
class QuantileMapToZero(torch.nn.Module):
    """net(z, t, 0) = (z - Phi_{t->0}(z)) / t for a 1-D Gaussian mixture, so that f = z - t net is the exact map.

    In 1-D the probability-flow ODE keeps the order of points, so Phi_{t->0} = F_0^{-1} o F_t (F_t the CDF of p_t,
    a sum of normal CDFs): exact up to a float64 bisection, and much cheaper than RK4 (checked against it below).
    """

    def __init__(self, mixture):
        super().__init__()
        self.means, self.weights = mixture.means[:, 0], mixture.weights
        self.stds = mixture.covs[:, 0, 0].sqrt()

    def cdf(self, z, t):  # (N,), (N,) -> (N,)
        scale = torch.sqrt((1 - t)[:, None] ** 2 * self.stds ** 2 + t[:, None] ** 2)
        u = (z[:, None] - (1 - t)[:, None] * self.means) / (scale * math.sqrt(2))
        return (self.weights * 0.5 * (1 + torch.erf(u))).sum(1)

    def map_to_zero(self, z, t):  # (N, 1), (N,) -> (N, 1)
        p, zero = self.cdf(z[:, 0], t), torch.zeros_like(t)
        lo, hi = torch.full_like(p, -20.0), torch.full_like(p, 20.0)
        for _ in range(64):
            mid = (lo + hi) / 2
            below = self.cdf(mid, zero) < p
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return ((lo + hi) / 2)[:, None]

    def forward(self, z, t, s, cond=None):
        return (z - self.map_to_zero(z, t)) / t[:, None]


def posterior_pairs(mixture, z, t, m, generator):
    """m draws of (x, eps) from p(x, eps | z_t = z) per point, the x re-centred on the exact E[x | z_t]; flattened.

    For an isotropic component N(mu_k, s^2), x | z_t, k ~ N(c^2 (mu_k / s^2 + (1 - t) z / t^2), c^2) with
    1 / c^2 = 1 / s^2 + (1 - t)^2 / t^2, and eps = (z - (1 - t) x) / t.
    """
    n = z.shape[0]
    tt = torch.full((n,), t, dtype=torch.float64)
    s2 = mixture.covs[0, 0, 0]  # gmm1d: both components have the same variance
    c2 = 1 / (1 / s2 + (1 - t) ** 2 / t ** 2)
    k = torch.multinomial(mixture.responsibilities(z, tt), m, replacement=True, generator=generator)  # (n, m)
    x = c2 * (mixture.means[k] / s2 + (1 - t) * z[:, None] / t ** 2)
    x = x + c2.sqrt() * torch.randn(n, m, 1, generator=generator, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True) + mixture.denoiser(z, tt)[:, None]  # exact first moment: E[eps - x | z] = v
    eps = (z[:, None] - (1 - t) * x) / t
    return x.reshape(-1, 1), eps.reshape(-1, 1)


def test_exact_map_to_zero_is_a_fixed_point_of_the_ct_target_to_second_order():
    """CT's target sg f(z_r, r) uses z_r = z_t - (t - r)(eps - x), the ODE step with the conditional velocity. Given
    z_t its mean is the exact step only to first order, so for the exact map the target's conditional mean equals the
    student f(z_t, t) up to O((t - r)^2): the weighted residual lambda |E[target] - f| -> 0 and the gradient of the CT
    loss vanishes there as the gap shrinks. A wrong consistency function -- the denoiser E[x | z_t], which is what
    net = the exact velocity gives and what 1-step flow matching learns -- is off by O(t - r): lambda |.| stays O(1).
    (The per-sample loss itself is O(t - r) noise for every map, exact or not: CT's estimator, not a bug.)"""
    mixture = gmm1d()
    exact = QuantileMapToZero(mixture)
    g = torch.Generator().manual_seed(0)
    t = 0.3
    z = (1 - t) * mixture.draw(8, g).double() + t * torch.randn(8, 1, generator=g, dtype=torch.float64)
    tt = torch.full((8,), t, dtype=torch.float64)
    assert torch.allclose(consistency_function(exact, z, tt), mixture.flow_map(z, t, 0.0), atol=1e-6)  # vs RK4
    x, eps = posterior_pairs(mixture, z, t, 2000, g)
    residual = {}
    for name, net in (("exact", exact), ("denoiser", ExactVelocity(mixture))):
        for gap in (0.02, 0.01):
            times = torch.full((x.shape[0],), t, dtype=torch.float64)
            student, target = consistency_pair(lambda z_, t_: consistency_function(net, z_, t_), x, eps, times,
                                               times - gap)
            bias = (target.reshape(8, -1).mean(1) - student.reshape(8, -1)[:, 0]).abs().mean()
            residual[name, gap] = bias.item()
    assert residual["exact", 0.01] < 1e-4  # measured 5.8e-5 (the denoiser: 4.1e-3)
    assert residual["exact", 0.02] / residual["exact", 0.01] > 3.5  # second order: 4x per halving
    ratio = residual["denoiser", 0.02] / residual["denoiser", 0.01]
    assert 1.8 < ratio < 2.2  # first order
    assert residual["denoiser", 0.01] > 20 * residual["exact", 0.01]


def test_teacher_at_r_zero_is_the_data_and_shares_the_students_dropout_mask():
    net = random_mlp(dropout=0.5).train()
    x, eps = torch.randn(32, 2, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    t = torch.rand(32, dtype=torch.float64)
    f = lambda z_, t_: consistency_function(net, z_, t_)  # noqa: E731
    _, target = consistency_pair(f, x, eps, t, torch.zeros_like(t))
    assert torch.equal(target, x)  # ECT's "if r = 0, D_r = x", here by construction
    torch.manual_seed(1)
    student, target = consistency_pair(f, x, eps, t, t.clone())
    assert torch.equal(student, target)  # same input, same dropout mask -> identical outputs
    assert not torch.equal(f((1 - t[:, None]) * x + t[:, None] * eps, t), student)  # dropout is really on


# --- iCT's schedule and metric --------------------------------------------------------------------------------
def test_ict_discretisation_doubles_from_10_to_1280_over_training():
    method = methods.get("ict", random_mlp(), (2,))  # K = 400k: K' = 400k // 8 = 50k steps per doubling
    expected = {0: 11, 49_999: 11, 50_000: 21, 100_000: 41, 150_000: 81, 300_000: 641, 349_999: 641,
                350_000: 1281, 399_999: 1281, 10**6: 1281}
    assert {k: method.discretisation(k) for k in expected} == expected
    short = methods.get("ict", random_mlp(), (2,), total_steps=1000)
    assert [short.discretisation(k) for k in (0, 124, 125, 500, 999)] == [11, 11, 21, 161, 1281]


def test_curricula_follow_the_planned_run_length_unless_fixed():
    ict, ect = methods.get("ict", random_mlp(), (2,)), methods.get("ect", random_mlp(), (2,))
    assert ict.discretisation(50_000) == 21 and ect.stage_length() == 25_000  # outside a Trainer: the paper's run
    ict.plan(1000)
    ect.plan(1600)
    assert [ict.discretisation(k) for k in (0, 124, 125, 999)] == [11, 11, 21, 1281]  # K = the run: 8 doublings
    assert ect.stage_length() == 100  # 1/16 of the run
    fixed = methods.get("ect", random_mlp(), (2,), stage_steps=7)
    fixed.plan(1600)
    assert fixed.stage_length() == 7


def test_trainer_tells_the_method_its_run_length(tmp_path):
    from jumpflow.train import Trainer
    from jumpflow.config import TrainConfig

    cfg = TrainConfig.from_dict({"method": "ict", "data": "8gaussians", "steps": 40, "batch_size": 8,
                                 "progress": False, "sample_every": 0, "checkpoint_every": 0})
    assert Trainer(cfg, tmp_path / "run").method.planned_steps == 40


def test_ict_step_counter_drives_the_curriculum_and_is_saved_with_the_weights():
    method = methods.get("ict", nets.build("mlp", (2,), width=16, depth=1), (2,), total_steps=8)  # K' = 1
    x = torch.randn(64, 2)
    for _ in range(3):
        method.loss(x, None)
    assert int(method.training_step) == 3
    method.eval()
    method.loss(x, None)  # evaluation does not advance the schedule
    assert int(method.training_step) == 3
    sigma_t, sigma_r = method.noise_levels(4096, int(method.training_step))
    grid = method.karras_sigmas(81)  # N(3) = 10 * 2^3 + 1
    assert torch.isin(sigma_t, grid).all() and torch.isin(sigma_r, grid).all()
    assert torch.equal(torch.searchsorted(grid, sigma_t), torch.searchsorted(grid, sigma_r) + 1)  # neighbours
    restored = methods.get("ict", nets.build("mlp", (2,), width=16, depth=1), (2,), total_steps=8)
    restored.load_state_dict(method.state_dict())
    assert int(restored.training_step) == 3


def test_ict_noise_levels_follow_the_lognormal_interval_masses():
    method = methods.get("ict", random_mlp(), (2,))
    grid = method.karras_sigmas(11)
    assert math.isclose(grid[0].item(), 0.002) and math.isclose(grid[-1].item(), 80.0)
    probs = method.interval_probabilities(grid)
    cdf = lambda s: 0.5 * (1 + math.erf((math.log(s) + 1.1) / (2.0 * math.sqrt(2))))  # noqa: E731
    masses = torch.tensor([cdf(b) - cdf(a) for a, b in zip(grid[:-1].tolist(), grid[1:].tolist())], dtype=torch.float64)
    assert torch.allclose(probs, masses / masses.sum())
    torch.manual_seed(0)
    _, sigma_r = method.noise_levels(200_000, 0)
    counts = torch.bincount(torch.searchsorted(grid, sigma_r), minlength=10).double() / 200_000
    assert (counts - probs).abs().max() < 0.005


def test_pseudo_huber_equals_its_closed_form_with_ict_c():
    torch.manual_seed(0)
    a, b = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    method = methods.get("ict", nets.build("unet", (1, 8, 8), channels=8, channel_mult=[1, 2]), (1, 8, 8))
    c = method.huber_c()
    assert math.isclose(c, 0.00054 * 8)  # 0.00054 sqrt(d), d = 64
    closed = torch.tensor([math.sqrt(((a[i] - b[i]) ** 2).sum().item() + c * c) - c for i in range(16)])
    assert torch.allclose(pseudo_huber(a, b, c), closed, rtol=1e-5)
    assert torch.allclose(pseudo_huber(a, b, 0.0), (a - b).flatten(1).norm(dim=1))
    same = a.clone().requires_grad_()
    pseudo_huber(same, a, 0.0).sum().backward()  # the plain norm at 0: gradient 0, not NaN
    assert torch.equal(same.grad, torch.zeros_like(a))


# --- ECT's schedule --------------------------------------------------------------------------------------------
def test_ect_mapping_function_shrinks_the_gap_stage_by_stage():
    method = methods.get("ect", random_mlp(), (2,), stage_steps=100)
    sigma = torch.tensor([0.01, 0.5, 2.0, 10.0, 80.0], dtype=torch.float64)
    for step, stage in ((0, 0), (99, 0), (100, 1), (750, 7)):
        r = method.teacher_sigma(sigma, step)
        closed = sigma * (1 - (1 + 8 * torch.sigmoid(-sigma)) / 2 ** (stage + 1))
        assert torch.allclose(r, closed.clamp(min=0))
    assert torch.equal(method.teacher_sigma(sigma[:2], 0), torch.zeros(2, dtype=torch.float64))  # stage 0: denoise
    ratios = [(method.teacher_sigma(sigma, 100 * a) / sigma)[-1].item() for a in range(6)]
    assert all(0 <= p < q < 1 for p, q in zip(ratios, ratios[1:]))  # r / t -> 1 as training goes on
    torch.manual_seed(0)
    sigma_t, sigma_r = method.noise_levels(10_000, 300)
    assert (sigma_r < sigma_t).all() and (sigma_r >= 0).all()
    assert abs(sigma_t.log().mean().item() + 1.1) < 0.05 and abs(sigma_t.log().std().item() - 2.0) < 0.05


# --- sampling ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ict", "ect"])
def test_sampling_with_the_exact_map_gives_the_data_distribution(name):
    exact = ExactGaussian(MU, STD)  # net(z, t, 0) = (z - Phi_{t->0}(z)) / t: f is the exact map to 0
    method = methods.get(name, exact, (2,))
    assert method.nfe(1) == 1 and method.nfe(2) == 2 and method.bench_steps == (1, 2)
    noise = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t_max = torch.full((20000,), 80 / 81, dtype=torch.float64)
    one = method.sample(noise, 1)
    assert torch.allclose(one, exact.flow_map(t_max[:, None] * noise, t_max, 0 * t_max))  # f(sigma_max eps)
    assert (one - (MU + STD * noise)).abs().max() < 0.05  # ~ Phi_{1->0}(eps): t_max eps is ~ z at t = 1 - 1/81
    assert torch.allclose(method.sample(noise, 1, times=[1.0]), MU + STD * noise)  # from t = 1 exactly
    assert torch.equal(sampling_times(2, 80.0, 0.821), sigma_to_time(torch.tensor([80.0, 0.821], dtype=torch.float64)))
    for steps, times in ((2, None), (3, None), (2, [1.0, 0.2])):
        torch.manual_seed(1)
        x = method.sample(noise, steps, times=times)
        assert (x.mean(0) - MU).abs().max() < 0.02 and (x.std(0) - STD).abs().max() < 0.02


def test_default_sampling_schedule_is_decreasing_and_ends_above_zero():
    for steps in (1, 2, 3, 4, 8):
        times = sampling_times(steps, 80.0, 0.821)
        assert times.numel() == steps and (times.diff() < 0).all() and times[-1] > 0
        assert math.isclose(times[0].item(), 80 / 81)


# --- real backbones ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ict", "ect"])
def test_unet_loss_and_sampling_with_labels(name):
    torch.manual_seed(0)
    net = nets.build("unet", (1, 8, 8), num_classes=3, channels=8, channel_mult=[1, 2])
    method = methods.get(name, net, (1, 8, 8), num_classes=3, class_dropout=0.2)
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    out = method.loss(x, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    method.eval()
    for steps in (1, 2):
        assert method.sample(torch.randn(4, 1, 8, 8), steps, labels=labels).shape == (4, 1, 8, 8)
    assert method.sample(torch.randn(2, 1, 8, 8), 1).shape == (2, 1, 8, 8)  # labels=None: the null label


def test_training_learns_a_one_step_map_far_better_than_one_step_flow_matching(tmp_path, trainer_flow_matching):
    target = OneStepMap.seeded(n_steps=None)  # the exact map to flow_map's default precision
    flow, _ = trainer_flow_matching
    fm_error = target.relative_error(flow.generate(noise=target.noise, steps=1))
    assert fm_error > 0.8  # 1-step flow matching: about the data mean
    # The paper-length curricula (they stay at their first, coarsest stage in 250 steps): scaled to so short a run,
    # the curricula race to fine gaps before the map is learned (measured: map error 0.46 / 0.42 vs 0.21 / 0.25).
    for name, options in (("ict", {"total_steps": 400_000}), ("ect", {"stage_steps": 25_000})):
        model, losses = train_with_trainer(name, tmp_path / name, options=options)
        assert sum(losses[-20:]) < 0.95 * sum(losses[:20])
        x = model.generate(noise=target.noise, steps=1)
        assert target.relative_error(x) < 0.4 and target.relative_error(x) < 0.5 * fm_error
        assert mode_coverage(x, target.mixture) == 1.0
        assert sliced_wasserstein(x, target.mixture.draw(500, torch.Generator().manual_seed(2))) < 0.5


# --- errors --------------------------------------------------------------------------------------------------------
def test_bad_options_are_clear_errors():
    net = random_mlp()
    with pytest.raises(JumpflowError, match="total_steps"):
        methods.get("ict", net, (2,), total_step=10)
    with pytest.raises(JumpflowError, match="two_step_sigma"):
        methods.get("ict", net, (2,), two_step_sigma=100.0)
    with pytest.raises(JumpflowError, match="discretisation_start"):
        methods.get("ict", net, (2,), discretisation_start=2000)
    with pytest.raises(JumpflowError, match="sigma_min"):
        methods.get("ict", net, (2,), sigma_min=0.0)
    with pytest.raises(JumpflowError, match="gap_decay"):
        methods.get("ect", net, (2,), gap_decay=1.0)
    with pytest.raises(JumpflowError, match="class_dropout"):
        methods.get("ect", net, (2,), class_dropout=1.5)
    method = methods.get("ect", net, (2,))
    noise = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(JumpflowError, match="positive integer"):
        method.sample(noise, 0)
    for times in ([0.9], [0.5, 0.9], [1.0, 0.0], [1.5, 0.5]):
        with pytest.raises(JumpflowError, match="strictly decreasing"):
            method.sample(noise, 2, times=times)


def test_both_methods_are_registered_with_their_papers():
    assert {"ict", "ect"} <= set(methods.names())
    assert methods.METHODS["ict"] is ICT and methods.METHODS["ect"] is ECT
    assert "2310.14189" in ICT.paper and "2406.14548" in ECT.paper
