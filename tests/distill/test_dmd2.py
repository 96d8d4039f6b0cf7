"""DMD2 against the exact Gaussian teacher, and the whole `jumpflow distill` path on a trained one.

For data N(MU, STD^2 I) and an affine generator G(eps) = m + a eps, the generator's distribution N(m, a^2 I) has an
exact fake score too (tests/gaussian.py's ExactGaussian(m, a)); DMD's gradient then vanishes exactly at m = MU,
a = STD (METHODS.md B5's test) and pushes (m, a) toward it elsewhere.
"""

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

NAME = "dmd2"
MU, STD = torch.tensor([1.5, -1.0], dtype=torch.float64), 0.3


def exact_teacher() -> Teacher:
    return exact_gaussian_teacher(MU, STD, "exact-gaussian-dmd2")


class AffineGenerator(torch.nn.Module):
    """net(eps, 1, 0) = eps - (m + a eps), so G(eps) = m + a eps samples N(m, a^2 I)."""

    def __init__(self, m, a):
        super().__init__()
        self.m = torch.nn.Parameter(torch.as_tensor(m, dtype=torch.float64).clone())
        self.a = torch.nn.Parameter(torch.tensor(float(a), dtype=torch.float64))

    def forward(self, z, t, s, cond=None):
        return z - (self.m + self.a * z)


def affine_method(m, a, **options):
    method = methods.get(NAME, AffineGenerator(m, a), (2,), **options)
    method.attach_teacher(exact_teacher(), None)
    method.fake_net = ExactGaussian(m, a)  # the exact fake score of the generator's own distribution
    return method


# --- the paper's fixed point and the direction of its gradient ------------------------------------------------------
def test_the_exact_generator_with_the_exact_fake_score_is_a_fixed_point():
    method = affine_method(MU, STD)
    torch.manual_seed(0)
    x = method.generate(torch.randn(512, 2, dtype=torch.float64), None)
    t = method.times(512, "cpu", torch.float64)
    grad = method.distribution_matching_gradient(x, t, torch.randn_like(x), None)
    assert grad.abs().max() < 1e-12  # x_hat_fake = x_hat_real
    out = method.loss(torch.zeros(512, 2, dtype=torch.float64), None)
    out.loss.backward()
    assert method.net.m.grad.abs().max() < 1e-12 and method.net.a.grad.abs() < 1e-12
    # The fake score of a wrong distribution breaks it: the test above is not vacuous.
    method.fake_net = ExactGaussian(MU, 2 * STD)
    assert method.distribution_matching_gradient(x, t, torch.randn_like(x), None).abs().mean() > 0.05


def test_the_gradient_widens_a_narrow_generator_and_moves_a_shifted_one_toward_the_data():
    torch.manual_seed(0)
    narrow = affine_method(MU + torch.tensor([0.5, 0.0], dtype=torch.float64), 0.5 * STD)
    narrow.loss(torch.zeros(2048, 2, dtype=torch.float64), None).loss.backward()
    assert narrow.net.a.grad < 0  # descent widens it
    assert narrow.net.m.grad[0] > 0 and abs(narrow.net.m.grad[1]) < 0.2 * narrow.net.m.grad[0]  # back toward MU


def test_descent_with_an_exact_fake_score_reaches_the_data_distribution():
    """DMD's gradient alone (the fake score kept exact for the generator's current distribution) moves N(m, a^2)
    from N(0, 1) onto N(MU, STD^2): the KL it descends has its only minimum there."""
    torch.manual_seed(0)
    method = affine_method(torch.zeros(2, dtype=torch.float64), 1.0)
    optimizer = torch.optim.Adam(method.net.parameters(), lr=0.02)
    for _ in range(300):
        method.fake_net = ExactGaussian(method.net.m.detach(), method.net.a.item())
        optimizer.zero_grad()
        method.loss(torch.zeros(512, 2, dtype=torch.float64), None).loss.backward()
        optimizer.step()
    assert (method.net.m.detach() - MU).abs().max() < 0.03, method.net.m
    assert abs(method.net.a.item() - STD) < 0.03, method.net.a


# --- the Trainer's hooks ------------------------------------------------------------------------------------------
def test_two_time_scale_updates_and_disjoint_optimizers():
    method = methods.get(NAME, toy_net(), (2,))
    assert tuple(method.updates(0)) == ("fake",) * 5 + ("net",) and method.updates(7) == method.updates(0)
    assert tuple(methods.get(NAME, toy_net(), (2,), fake_updates=2).updates(3)) == ("fake", "fake", "net")
    gan = methods.get(NAME, toy_net(), (2,), gan=True, fake_lr_scale=2.0)
    groups = gan.optimizers()
    assert set(groups) == {"net", "fake"} and groups["fake"][1] == 2.0 and groups["net"][1] == 1.0
    net_ids = {id(p) for p in groups["net"][0]}
    fake_ids = {id(p) for p in groups["fake"][0]}
    assert net_ids == {id(p) for p in gan.net.parameters()} and not net_ids & fake_ids
    assert fake_ids == {id(p) for p in [*gan.fake_net.parameters(), *gan.discriminator.parameters()]}


def test_times_follow_the_papers_karras_index_range():
    method = methods.get(NAME, toy_net(), (2,))
    torch.manual_seed(0)
    t = method.times(20_000, "cpu", torch.float64)
    assert t.min() >= sigma_to_time(method.sigmas[20]) and t.max() <= sigma_to_time(method.sigmas[979])
    assert t.min() == pytest.approx(sigma_to_time(method.sigmas[20]).item())  # the whole range [0.02 T, 0.98 T)
    uniform = methods.get(NAME, toy_net(), (2,), time_schedule="uniform").times(20_000, "cpu", torch.float64)
    assert 0.02 <= uniform.min() < 0.03 and 0.97 < uniform.max() <= 0.98


def test_the_fake_update_trains_only_the_fake_score_on_detached_samples():
    torch.manual_seed(0)
    method = methods.get(NAME, toy_net(), (2,), gan=True)
    method.attach_teacher(exact_teacher(), None)
    x = (MU + STD * torch.randn(64, 2, dtype=torch.float64)).float()
    method.update_loss("fake", x, None).loss.backward()
    assert all(p.grad is None for p in method.net.parameters())
    assert all(p.grad is not None for p in [*method.fake_net.parameters(), *method.discriminator.parameters()])
    method.zero_grad(set_to_none=True)
    method.update_loss("net", x, None).loss.backward()
    assert all(p.grad is None for p in method.fake_net.parameters())  # the fake score is read under no_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.net.parameters())


# --- training: the 1-step map's distribution matches the data -------------------------------------------------------
def test_hand_loop_with_two_optimizers_matches_the_data_moments():
    """DMD matches distributions, not the teacher's map: compare moments of the 1-step samples with N(MU, STD^2)."""
    torch.manual_seed(0)
    method = methods.get(NAME, toy_net(), (2,))  # the paper's 5 fake updates per generator update
    method.attach_teacher(exact_teacher(), None)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5))
    assert (method.sample(noise, 1).std(0) - 1).abs().max() < 0.05  # G starts as the identity: N(0, I)
    optimizers = {name: torch.optim.AdamW(params, lr=2e-3 * scale) for name, (params, scale)
                  in method.optimizers().items()}
    data = torch.Generator().manual_seed(1)
    for step in range(400):
        x = (MU + STD * torch.randn(256, 2, generator=data, dtype=torch.float64)).float()
        for name in method.updates(step):
            loss = method.update_loss(name, x, None).loss
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
    samples = method.sample(noise, 1).double()
    assert (samples.mean(0) - MU).abs().max() < 0.05, samples.mean(0)  # measured 0.024
    assert (samples.std(0) - STD).abs().max() < 0.05, samples.std(0)  # measured 0.028 (0.33 and 0.32)


# --- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"fake_updates": 0}, "fake_updates"), ({"fake_updates": True}, "fake_updates"),
    ({"fake_lr_scale": 0.0}, "fake_lr_scale"), ({"time_schedule": "cosine"}, "time_schedule"),
    ({"min_step_percent": 0.5, "max_step_percent": 0.5}, "min_step_percent"),
    ({"max_step_percent": 1.5}, "max_step_percent"), ({"sigma_min": 0.0}, "sigma_min"), ({"rho": -1.0}, "rho"),
    ({"regression_weight": -0.1}, "regression_weight"), ({"gan_generator_weight": -1.0}, "gan_generator_weight"),
    ({"num_train_timesteps": 1}, "num_train_timesteps"),
    ({"regression_teacher_steps": 0}, "regression_teacher_steps"), ({"regression_solver": "rk4"}, "solver"),
    ({"pairs": 256}, "unknown option")])
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


def test_regression_term_uses_the_teachers_pairs():
    torch.manual_seed(0)
    method = methods.get(NAME, AffineGenerator(MU, STD), (2,), regression_weight=0.25, regression_pairs=64,
                         regression_teacher_steps=50)
    method.attach_teacher(exact_teacher(), None)
    noise, samples, _ = method.__dict__["_regression_pairs"]
    assert torch.equal(samples, exact_teacher().sample(noise, 50))  # the teacher's ODE from the pairs' own noise
    method.fake_net = ExactGaussian(MU, STD)
    out = method.loss(torch.zeros(64, 2, dtype=torch.float64), None)
    # The exact map is the teacher's exact flow, so only the 50 Euler steps' error remains; a shifted map pays more.
    regression = out.metrics["regression"].item()
    assert regression < 1e-3 and out.loss.item() == pytest.approx(0.25 * regression)  # L_DM = 0 at the fixed point
    method.net.m.data += 0.3
    assert method.loss(torch.zeros(64, 2, dtype=torch.float64), None).metrics["regression"] > 0.08


# --- the whole path: a trained teacher, `jumpflow distill`, resume, load ------------------------------------------
def test_distill_end_to_end_starts_from_the_teacher_and_resumes_exactly(teacher_run, tmp_path):
    from safetensors.torch import load_file

    from jumpflow.checkpoint import list_checkpoints
    from jumpflow.train import Trainer

    changes = {"steps": 12, "batch_size": 64, "progress": False, "sample_every": 0, "checkpoint_every": 6,
               "method_options": {"fake_updates": 2, "gan": True}}
    cfg = jumpflow.api.distill_config(teacher_run, NAME, changes)
    trainer = Trainer(cfg, tmp_path / "fresh")
    teacher = Teacher.from_checkpoint(teacher_run)
    for net in (trainer.method.net, trainer.method.fake_net):  # generator and fake score start as the teacher
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), teacher.net.parameters()))

    whole = jumpflow.api.distill(teacher_run, NAME, tmp_path / "whole", changes)
    jumpflow.api.train(cfg, tmp_path / "cut", stop_after=8)  # killed at step 8, after its step-6 checkpoint
    jumpflow.api.distill(None, None, tmp_path / "cut", {"progress": False}, resume=True)
    a = load_file(str(list_checkpoints(tmp_path / "whole")[12]))
    b = load_file(str(list_checkpoints(tmp_path / "cut")[12]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # nets, both optimizers, RNG
    assert any(k.startswith("model.fake_net.") for k in a) and any(k.startswith("optim_fake.") for k in a)
    assert a["optim_fake.0.step"].item() == 24 and a["optim.0.step"].item() == 12  # two fake updates a step
    model = jumpflow.load(whole)
    assert not torch.equal(model.method.fake_net.out.weight, teacher.net.out.weight)  # the fake score did train
    assert torch.isfinite(model.generate(16, steps=1, seed=0)).all()
