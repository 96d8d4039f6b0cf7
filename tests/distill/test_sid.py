"""SiD against the exact Gaussian teacher, and the whole `jumpflow distill` path on a trained one.

For data N(MU, STD^2 I) and an affine generator x_g = m + a eps, the generator's distribution N(m, a^2 I) has an exact
fake score (tests/gaussian.py's ExactGaussian(m, a)) and a closed-form denoiser, so SiD's loss can be checked against
the Fisher divergence it comes from, and its fixed point (METHODS.md B6's test) exactly.
"""

import math

import pytest
import torch

import jumpflow
from jumpflow import methods
from jumpflow.distill import Teacher
from jumpflow.errors import JumpflowError
from jumpflow.methods.consistency import sigma_to_time
from tests.distill.helpers import exact_gaussian_teacher
from tests.gaussian import ExactGaussian
from tests.methods.toy_training import toy_net

NAME = "sid"
MU, STD = torch.tensor([1.5, -1.0], dtype=torch.float64), 0.3
T_INIT = 2.5 / 3.5  # the paper's sigma_init = 2.5 in jumpflow's time


def exact_teacher() -> Teacher:
    return exact_gaussian_teacher(MU, STD, "exact-gaussian-sid")


class AffineGenerator(torch.nn.Module):
    """net(z, t, 0) = (z - (m + a z / t)) / t, so x_g = z - t net = m + a eps for z = t eps: samples N(m, a^2 I)."""

    def __init__(self, m, a):
        super().__init__()
        self.m = torch.nn.Parameter(torch.as_tensor(m, dtype=torch.float64).clone())
        self.a = torch.nn.Parameter(torch.tensor(float(a), dtype=torch.float64))

    def forward(self, z, t, s, cond=None):
        t = t[:, None]
        return (z - (self.m + self.a * z / t)) / t


def affine_method(name, m, a, **options):
    method = methods.get(name, AffineGenerator(m, a), (2,), **options)
    method.attach_teacher(exact_teacher(), None)
    method.fake_net = ExactGaussian(m, a)  # the exact fake score of the generator's own distribution
    return method


def gaussian_denoiser(z, t, m, a):
    """E[x | z_t] for x ~ N(m, a^2 I), differentiable in (m, a)."""
    t = t[:, None]
    return m + (1 - t) * a ** 2 / ((1 - t) ** 2 * a ** 2 + t ** 2) * (z - (1 - t) * m)


def generator_gradient(method, n, seed=1):
    """d loss / d (m, a) of an affine method, its per-sample weight set to 1 (a weight that depends on x_g would
    change the divergence being differentiated)."""
    method.weight = lambda sample, real: torch.ones(sample.shape[0], dtype=sample.dtype)
    torch.manual_seed(seed)
    method.loss(torch.zeros(n, 2, dtype=torch.float64), None).loss.backward()
    return torch.cat([method.net.m.grad, method.net.a.grad[None]])


def divergence_gradient(method, n, distance, through_samples, seed=1):
    """d/d(m, a) of E d(f_theta(z_t) - f_phi(z_t)) on the same draws as `generator_gradient`, by autograd through the
    exact denoiser f_theta of N(m, a^2 I); through_samples=False holds the samples z_t fixed (SIM's stop-gradient)."""
    m0, a0 = method.net.m.detach(), method.net.a.detach()
    torch.manual_seed(seed)
    eps = torch.randn(n, 2, dtype=torch.float64)
    t = method.times(n, "cpu", torch.float64)
    noise = torch.randn(n, 2, dtype=torch.float64)
    m, a = m0.clone().requires_grad_(), a0.clone().requires_grad_()
    x = m + a * eps
    x = x if through_samples else x.detach()
    z = (1 - t[:, None]) * x + t[:, None] * noise
    distance(gaussian_denoiser(z, t, m, a) - method.real_denoiser(z, t, None)).mean().backward()
    return torch.cat([m.grad, a.grad[None]])


def check_distill_end_to_end(teacher_run, tmp_path, name, options):
    """api.distill from the session teacher; both nets start as the teacher; a run cut at step 8 and resumed from
    its step-6 checkpoint ends bit-identical (nets, both optimizers, RNG); the result loads and samples in 1 step."""
    from safetensors.torch import load_file

    from jumpflow.checkpoint import list_checkpoints
    from jumpflow.train import Trainer

    changes = {"steps": 12, "batch_size": 64, "progress": False, "sample_every": 0, "checkpoint_every": 6,
               "method_options": options}
    cfg = jumpflow.api.distill_config(teacher_run, name, changes)
    trainer = Trainer(cfg, tmp_path / "fresh")
    teacher = Teacher.from_checkpoint(teacher_run)
    for net in (trainer.method.net, trainer.method.fake_net):  # generator and fake score start as the teacher
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), teacher.net.parameters()))

    whole = jumpflow.api.distill(teacher_run, name, tmp_path / "whole", changes)
    jumpflow.api.train(cfg, tmp_path / "cut", stop_after=8)  # killed at step 8, after its step-6 checkpoint
    jumpflow.api.distill(None, None, tmp_path / "cut", {"progress": False}, resume=True)
    a = load_file(str(list_checkpoints(tmp_path / "whole")[12]))
    b = load_file(str(list_checkpoints(tmp_path / "cut")[12]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # nets, both optimizers, RNG
    assert any(k.startswith("model.fake_net.") for k in a) and any(k.startswith("optim_fake.") for k in a)
    fake_updates = options.get("fake_updates", 1)
    assert a["optim_fake.0.step"].item() == 12 * fake_updates and a["optim.0.step"].item() == 12
    model = jumpflow.load(whole)  # what `jumpflow sample` does
    assert not torch.equal(model.method.fake_net.out.weight, teacher.net.out.weight)  # the fake score did train
    assert not torch.equal(model.net.out.weight, teacher.net.out.weight)  # and the generator
    samples = model.generate(16, steps=1, seed=0)
    assert samples.shape == (16, 2) and torch.isfinite(samples).all()
    assert torch.equal(samples, model.generate(16, steps=1, seed=0))


def train_by_hand(name, steps, **options):
    """A hand loop with the method's two optimizers from a toy net (G starts as z = t_init eps: N(0, t_init^2 I));
    returns the errors of the 1-step samples' mean and covariance, before and after."""
    torch.manual_seed(0)
    method = methods.get(name, toy_net(), (2,), **options)
    method.attach_teacher(exact_teacher(), None)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5))

    def errors():
        samples = method.sample(noise, 1).double()
        return ((samples.mean(0) - MU).norm().item(),
                (torch.cov(samples.T) - STD ** 2 * torch.eye(2, dtype=torch.float64)).norm().item())

    before = errors()
    optimizers = {n: torch.optim.AdamW(p, lr=3e-3 * scale) for n, (p, scale) in method.optimizers().items()}
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = (MU + STD * torch.randn(256, 2, generator=data, dtype=torch.float64)).float()
        for name in method.updates(step):
            loss = method.update_loss(name, x, None).loss
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
    return before, errors()


# --- the paper's fixed point and the Fisher divergence behind the loss ------------------------------------------------
def test_the_exact_generator_with_the_exact_fake_score_is_a_fixed_point():
    method = affine_method(NAME, MU, STD)
    torch.manual_seed(0)
    out = method.loss(torch.zeros(512, 2, dtype=torch.float64), None)
    out.loss.backward()
    assert abs(out.loss.item()) < 1e-12 and out.metrics["score_gap"] < 1e-12  # f_psi = f_phi
    assert method.net.m.grad.abs().max() < 1e-12 and method.net.a.grad.abs() < 1e-12
    # A fake score that is not the generator's breaks it: the test above is not vacuous.
    method.fake_net = ExactGaussian(MU, 2 * STD)
    method.zero_grad()
    method.loss(torch.zeros(512, 2, dtype=torch.float64), None).loss.backward()
    assert method.net.a.grad.abs() > 0.05


def test_alpha_one_half_gives_the_whole_fisher_divergence_gradient():
    """Score identity: with the exact fake score, 2 x grad L_G(alpha = 1/2) = grad_theta E||f_theta - f_phi||^2(z_t),
    differentiated through the samples and through the generator's own denoiser. The match needs the gradient to flow
    through both denoisers via z_t."""
    m, a = MU + torch.tensor([0.4, -0.2], dtype=torch.float64), 0.6
    ours = 2 * generator_gradient(affine_method(NAME, m, a, alpha=0.5), 100_000)
    exact = divergence_gradient(affine_method(NAME, m, a), 100_000, lambda y: y.pow(2).sum(1), through_samples=True)
    assert exact.norm() > 0.3 and (ours - exact).norm() < 0.01 * exact.norm(), (ours, exact)  # measured 3e-4


@pytest.mark.parametrize("name", ["sid", "sim"])  # SIM shares SiD's generator and noise levels
def test_descent_with_an_exact_fake_score_reaches_the_data_distribution(name):
    torch.manual_seed(0)
    method = affine_method(name, torch.zeros(2, dtype=torch.float64), 1.0)
    optimizer = torch.optim.Adam(method.net.parameters(), lr=0.02)
    for _ in range(300):
        method.fake_net = ExactGaussian(method.net.m.detach(), method.net.a.item())
        optimizer.zero_grad()
        method.loss(torch.zeros(512, 2, dtype=torch.float64), None).loss.backward()
        optimizer.step()
    assert (method.net.m.detach() - MU).abs().max() < 0.01, method.net.m
    assert abs(method.net.a.item() - STD) < 0.01, method.net.a


# --- the paper's generator input and noise levels -------------------------------------------------------------------
def test_the_generator_reads_pure_noise_at_sigma_init():
    noise = torch.randn(8, 2)
    method = methods.get(NAME, toy_net(), (2,))  # its output layer starts at zero: G(eps) = z = t_init eps
    assert method.generator_time == pytest.approx(T_INIT)
    assert torch.allclose(method.sample(noise, 1), T_INIT * noise)
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, z, t, s, labels=None):
            calls.append((z, t, s))
            return torch.zeros_like(z)

    method.sample(noise, 1, net=Recorder())
    z, t, s = calls[0]
    assert torch.allclose(z, T_INIT * noise) and torch.allclose(t, torch.full((8,), T_INIT)) and not s.any()
    assert methods.get(NAME, toy_net(), (2,), sigma_init=1.0).generator_time == 0.5


def test_times_follow_the_papers_noise_levels():
    method = methods.get(NAME, toy_net(), (2,))
    torch.manual_seed(0)
    t = method.times(20_000, "cpu", torch.float64)
    sigma_high = (0.002 ** (1 / 7) + 0.8 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7  # Karras at u = t_max / T
    assert sigma_to_time(torch.tensor(0.002)) <= t.min() < 0.01
    assert 0.95 < t.max() <= sigma_to_time(torch.tensor(sigma_high)) < 0.962  # the highest sigmas are left out
    logit = torch.logit(method.fake_times(20_000, "cpu", torch.float64))  # log sigma ~ N(-1.2, 1.2^2)
    assert logit.mean() == pytest.approx(-1.2, abs=0.03) and logit.std() == pytest.approx(1.2, abs=0.03)


# --- the Trainer's hooks ------------------------------------------------------------------------------------------
def test_updates_alternate_one_to_one_with_disjoint_optimizers():
    method = methods.get(NAME, toy_net(), (2,))
    assert tuple(method.updates(0)) == ("fake", "net")
    assert tuple(methods.get(NAME, toy_net(), (2,), fake_updates=3).updates(5)) == ("fake",) * 3 + ("net",)
    groups = methods.get(NAME, toy_net(), (2,), fake_lr_scale=2.0).optimizers()
    assert groups["fake"][1] == 2.0 and groups["net"][1] == 1.0
    assert not {id(p) for p in groups["net"][0]} & {id(p) for p in groups["fake"][0]}


def test_each_update_trains_only_its_own_network():
    torch.manual_seed(0)
    method = methods.get(NAME, toy_net(), (2,))
    method.attach_teacher(exact_teacher(), None)
    x = torch.zeros(64, 2)
    method.update_loss("fake", x, None).loss.backward()
    assert all(p.grad is None for p in method.net.parameters())  # the fake score fits detached samples
    assert all(p.grad is not None for p in method.fake_net.parameters())
    method.zero_grad(set_to_none=True)
    method.update_loss("net", x, None).loss.backward()  # through f_psi's input, never into its weights
    assert all(p.grad is None for p in method.fake_net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.net.parameters())


# --- training: the 1-step samples' distribution moves onto the data ---------------------------------------------------
def test_hand_loop_moves_the_samples_moments_to_the_data():
    """The toy's fake score starts from scratch (zero output), not from a teacher, so it is given a two-time-scale
    head start (3 updates at twice the lr); at SiD's 1:1 it lags and the spread barely moves in this budget."""
    (mean_before, cov_before), (mean_after, cov_after) = train_by_hand(NAME, 200, fake_updates=3, fake_lr_scale=2.0)
    assert mean_before > 1.7 and cov_before > 0.55  # N(0, t_init^2 I) against N(MU, 0.09 I)
    assert mean_after < 0.25 * mean_before, mean_after  # measured 0.12 (from 1.80)
    assert cov_after < 0.5 * cov_before, cov_after  # measured 0.13 (from 0.57)


# --- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"fake_updates": 0}, "fake_updates"), ({"fake_updates": True}, "fake_updates"),
    ({"fake_lr_scale": 0.0}, "fake_lr_scale"), ({"sigma_init": 0.0}, "sigma_init"),
    ({"sigma_init": math.inf}, "sigma_init"), ({"t_max": 0}, "t_max"), ({"t_max": 1001}, "t_max"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"), ({"sigma_min": 0.0}, "sigma_min"),
    ({"rho": -1.0}, "rho"), ({"fake_p_std": 0.0}, "fake_p_std"), ({"fake_p_mean": math.nan}, "fake_p_mean"),
    ({"alpha": math.nan}, "alpha"), ({"distance": "l2"}, "unknown option")])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get(NAME, toy_net(), (2,), **options)


def test_without_a_teacher_and_with_many_steps_it_says_so():
    method = methods.get(NAME, toy_net(), (2,))
    with pytest.raises(JumpflowError, match="jumpflow distill"):
        method.loss(torch.zeros(8, 2), None)
    with pytest.raises(JumpflowError, match="one step"):
        method.sample(torch.zeros(8, 2), 2)
    with pytest.raises(JumpflowError, match="optimizers"):
        method.update_loss("critic", torch.zeros(8, 2), None)


# --- the whole path: a trained teacher, `jumpflow distill`, resume, load ------------------------------------------
def test_distill_end_to_end_starts_from_the_teacher_and_resumes_exactly(teacher_run, tmp_path):
    check_distill_end_to_end(teacher_run, tmp_path, NAME, {"fake_updates": 2})
