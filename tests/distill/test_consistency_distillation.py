"""Consistency distillation against the exact Gaussian teacher, and the whole `jumpflow distill` path on a trained one.

For data N(MU, STD^2 I) the exact consistency function (flow map to 0, tests/gaussian.py) is affine in z:
f(z, t) = MU + STD (z - (1 - t) MU) / sigma(t), sigma(t) = sqrt((1 - t)^2 STD^2 + t^2), so CD's residual for the
exact f is f(Phi_{t->r}(z), r) - f(z_hat, r) = STD / sigma(r) (Phi_{t->r}(z) - z_hat): the teacher's step error, scaled.
"""

import pytest
import torch

import jumpflow
from jumpflow import methods
from jumpflow.distill import Teacher
from jumpflow.distill.consistency_distillation import karras_sigmas
from jumpflow.ema import EMA
from jumpflow.errors import JumpflowError
from jumpflow.methods.consistency import consistency_function, sigma_to_time
from tests.gaussian import ExactGaussian
from tests.methods.toy_training import random_mlp, toy_net

NAME = "consistency_distillation"
MU, STD = torch.tensor([1.5, -1.0], dtype=torch.float64), 0.3
EXACT = ExactGaussian(MU, STD)


def exact_teacher(std: float = STD) -> Teacher:
    """The exact flow-matching velocity of N(MU, std^2 I), in the dtype of the points it is asked about."""
    field = ExactGaussian(MU, std)
    return Teacher.from_velocity(lambda z, t, labels: field.velocity(z.double(), t.double()).to(z.dtype), (2,),
                                 teacher_id=f"exact-gaussian-{std}")


class Denoiser(torch.nn.Module):
    """net(z, t, 0) = v(z, t), so f = z - t v = E[x | z_t]: one Euler step to 0, what 1-step flow matching learns."""

    def forward(self, z, t, s, cond=None):
        return EXACT.velocity(z, t)


def exact_method(net=None, **options):
    method = methods.get(NAME, net if net is not None else ExactGaussian(MU, STD), (2,), **options)
    method.attach_teacher(exact_teacher(), None)
    return method


def gaussian_data(n, seed=0):
    return MU + STD * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the boundary condition and CD's anchor ----------------------------------------------------------------------
def test_boundary_condition_holds_by_construction_for_student_and_target():
    method = methods.get(NAME, random_mlp(), (2,))
    x, zero = gaussian_data(64), torch.zeros(64, dtype=torch.float64)
    for net in (method.net, method.target_net):
        assert torch.equal(consistency_function(net, x, zero), x)  # f(x, 0) = x
    assert (consistency_function(method.net, x, zero + 0.5) - x).abs().max() > 0.1  # the net does act for t > 0


def test_at_r_zero_the_target_is_the_teachers_step_to_the_data():
    """With sigma_min = 0 the lowest link of the chain is anchored exactly: f_theta-(z_hat, 0) = z_hat, whatever
    the target network, so the chain starts from the teacher's ODE and not from the student."""
    method = methods.get(NAME, random_mlp(), (2,), sigma_min=0.0)
    teacher = exact_teacher()
    method.attach_teacher(teacher, None)
    x, eps = gaussian_data(32), torch.randn(32, 2, dtype=torch.float64)
    t = torch.full((32,), 0.1, dtype=torch.float64)
    _, target = method.distillation_pair(x, eps, t, torch.zeros_like(t))
    assert torch.equal(target, teacher.ode_step((1 - 0.1) * x + 0.1 * eps, t, 0.0, solver="heun"))
    assert method.sigmas[0] == 0 and sigma_to_time(method.sigmas[-1]) == pytest.approx(80 / 81)


# --- the exact consistency function is CD's fixed point up to the teacher's Heun error ----------------------------
def hand_heun(z, t, r):
    v = EXACT.velocity(z, t)
    z_euler = z + (r - t)[:, None] * v
    return z + (r - t)[:, None] * 0.5 * (v + EXACT.velocity(z_euler, r))


def test_the_residual_of_the_exact_map_is_the_teachers_heun_error_and_third_order():
    method = exact_method()
    x, eps = gaussian_data(256), torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.full((256,), 0.5, dtype=torch.float64)
    size = {}
    for h in (0.02, 0.01):
        r = t - h
        prediction, target = method.distillation_pair(x, eps, t, r)
        z_t = (1 - t[:, None]) * x + t[:, None] * eps
        assert torch.allclose(prediction, EXACT.flow_map(z_t, t, 0 * t), atol=1e-12)  # the student sees z_t
        step_error = EXACT.flow_map(z_t, t, r) - hand_heun(z_t, t, r)  # the target is f at the teacher's Heun step
        assert torch.allclose(prediction - target, STD / EXACT.sigma(r[:, None]) * step_error, atol=1e-12)
        size[h] = (prediction - target).norm(dim=1).mean().item()
    assert 7 < size[0.02] / size[0.01] < 9  # Heun's local error O(h^3): 8x per halving


def test_cd_loss_of_the_exact_map_is_near_zero_and_far_below_a_wrong_map():
    """On the N = 18 grid (t from 0.002 to 0.988) the exact map's loss is the Heun error, measured 1.2e-6 (largest
    mid-path, |step error| <= 5e-3 at t ~ 0.37); an Euler teacher leaves 3.7e-5; the denoiser, 9e-4."""
    x = gaussian_data(4096)
    losses = {}
    for name, net, solver in (("exact", None, "heun"), ("euler", None, "euler"), ("denoiser", Denoiser(), "heun")):
        torch.manual_seed(0)
        losses[name] = exact_method(net, teacher_solver=solver).loss(x, None).loss.item()
    assert losses["exact"] < 5e-6, losses
    assert losses["euler"] > 10 * losses["exact"] and losses["denoiser"] > 300 * losses["exact"], losses


def test_karras_grid_maps_the_papers_noise_levels_to_jumpflow_time():
    sigmas = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert sigmas[0].item() == pytest.approx(0.002) and sigmas[-1].item() == pytest.approx(80.0)
    assert (sigmas.diff() > 0).all()
    method = methods.get(NAME, random_mlp(), (2,))
    torch.manual_seed(0)
    sigma_t, sigma_r = method.noise_levels(10_000, 0)
    index = torch.searchsorted(method.sigmas, sigma_r)
    assert torch.equal(method.sigmas[index + 1], sigma_t)  # adjacent levels: n ~ U{1, ..., N - 1}
    assert set(index.tolist()) == set(range(17))


# --- the target network theta- --------------------------------------------------------------------------------
def test_target_follows_the_student_at_rate_mu_and_zero_means_the_student_itself():
    method = methods.get(NAME, random_mlp(), (2,), target_ema=0.9)
    before = [p.clone() for p in method.target_net.parameters()]
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(1.0)
    method.update_target()
    for old, new, online in zip(before, method.target_net.parameters(), method.net.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * online)
        assert not new.requires_grad
    assert "target_net.out.weight" in method.state_dict()  # checkpointed with the method
    plain = exact_method(random_mlp(), target_ema=0.0)
    assert plain.target_net is None
    x, eps, t = gaussian_data(8), torch.randn(8, 2, dtype=torch.float64), torch.full((8,), 0.4, dtype=torch.float64)
    _, target = plain.distillation_pair(x, eps, t, t - 0.1)
    z_hat = plain.teacher.ode_step((1 - t[:, None]) * x + t[:, None] * eps, t, t - 0.1, solver="heun")
    assert torch.equal(target, consistency_function(plain.net, z_hat, t - 0.1))


# --- training: CD learns the teacher's one-step map ----------------------------------------------------------------
def distil(teacher, steps=600):
    """A toy MLP distilled for `steps` AdamW steps on batches of the data N(MU, STD^2); returns its EMA net."""
    torch.manual_seed(0)
    method = methods.get(NAME, toy_net(), (2,))
    method.attach_teacher(teacher, None)
    ema = EMA(method.net, 0.99)
    optimizer = torch.optim.AdamW(method.net.parameters(), lr=3e-3)
    for step in range(steps):
        method.begin_step(step)  # as the Trainer does: theta- follows theta once per step
        loss = method.loss(gaussian_data(256, seed=step + 1).float(), None).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(method.net, step)
    return method, ema.shadow


NOISE = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5))


def test_one_step_samples_land_on_the_exact_map_far_better_than_the_teachers_euler_step():
    method, ema = distil(exact_teacher())
    exact = (MU + STD * NOISE).float()
    teacher_error = (exact_teacher().sample(NOISE, 1) - exact).norm(dim=1).mean().item()
    assert teacher_error > 0.35  # one Euler step of the teacher lands every sample on the mean: STD E|z| = 0.38
    student_error = (method.sample(NOISE, 1, net=ema) - exact).norm(dim=1).mean().item()
    assert student_error < 0.04, student_error  # measured 0.016
    # Multistep consistency sampling (CM Alg. 1) keeps the distribution: re-noised estimates map back onto it.
    for steps in (2, 3):
        torch.manual_seed(100 + steps)  # the re-noising draws, independent of NOISE (seeded 5)
        samples = method.sample(NOISE, steps, net=ema).double()
        assert (samples.mean(0) - MU).abs().max() < 0.03 and (samples.std(0) - STD).abs().max() < 0.02, steps


def test_the_student_follows_its_teacher_not_the_data():
    """CD trains on the real data x, but its fixed point is the TEACHER's flow: a teacher of a wider Gaussian
    (std 2 STD) gives a student with that spread, though every x it saw has spread STD."""
    method, ema = distil(exact_teacher(2 * STD))
    samples = method.sample(NOISE, 1, net=ema).double()
    assert (samples.std(0) - 2 * STD).abs().max() < 0.08, samples.std(0)  # measured 0.04; the data: 0.3


def test_exact_map_samples_the_data_distribution_in_any_number_of_steps():
    method = methods.get(NAME, ExactGaussian(MU, STD), (2,))
    noise = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for steps in (1, 2, 4):
        torch.manual_seed(100 + steps)  # the re-noising draws, independent of `noise` (seeded 2)
        samples = method.sample(noise, steps)
        assert (samples.mean(0) - MU).abs().max() < 0.01 and (samples.std(0) - STD).abs().max() < 0.01, steps


# --- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"discretisation": 1}, "discretisation"), ({"sigma_min": -0.1}, "sigma_min"), ({"sigma_min": 90.0}, "sigma_min"),
    ({"rho": 0.0}, "rho"), ({"teacher_solver": "rk4"}, "solver"), ({"target_ema": 1.0}, "target_ema"),
    ({"distance": "lpips"}, "distance"), ({"huber_scale": -1.0}, "huber_scale"),
    ({"two_step_sigma": 100.0}, "two_step_sigma"), ({"class_dropout": 1.0}, "class_dropout"),
    ({"pairs": 10}, "unknown option")])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get(NAME, toy_net(), (2,), **options)


def test_without_a_teacher_it_says_how_to_get_one():
    with pytest.raises(JumpflowError, match="jumpflow distill"):
        methods.get(NAME, toy_net(), (2,)).loss(torch.zeros(8, 2), None)


# --- the whole path: a trained teacher, `jumpflow distill`, resume, load ------------------------------------------
def test_distill_end_to_end_starts_from_the_teacher_and_resumes_exactly_with_its_target(teacher_run, tmp_path):
    from jumpflow.train import Trainer

    changes = {"steps": 20, "batch_size": 64, "progress": False, "sample_every": 0, "checkpoint_every": 10}
    cfg = jumpflow.api.distill_config(teacher_run, NAME, changes)
    trainer = Trainer(cfg, tmp_path / "fresh")
    teacher = Teacher.from_checkpoint(teacher_run)
    for net in (trainer.method.net, trainer.method.target_net, trainer.ema.shadow):  # theta- = theta = teacher
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), teacher.net.parameters()))

    whole = jumpflow.api.distill(teacher_run, NAME, tmp_path / "whole", changes)
    jumpflow.api.train(cfg, tmp_path / "cut", stop_after=15)  # killed at step 15, after its step-10 checkpoint
    jumpflow.api.distill(None, None, tmp_path / "cut", {"progress": False}, resume=True)
    a, b = jumpflow.load(whole), jumpflow.load(tmp_path / "cut")
    for (name, p), q in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        assert torch.equal(p, q), name  # the student's EMA, theta- and the step counter
    assert not torch.equal(a.method.target_net.out.weight, a.net.out.weight)  # theta- is its own average
    assert int(a.method.training_step) == 20
    for steps in (1, 2):
        assert torch.isfinite(a.generate(16, steps=steps, seed=0)).all()
