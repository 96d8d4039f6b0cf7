"""Align Your Flow (AYF-EMD, AYF-LMD) against the exact Gaussian teacher and map, and through `jumpflow distill`."""

import pytest
import torch
from torch import nn

import jumpflow
from jumpflow import methods
from jumpflow.distill import Teacher
from jumpflow.distill.align_your_flow import eulerian_tangent, lagrangian_residual
from jumpflow.ema import EMA
from jumpflow.errors import JumpflowError
from tests.gaussian import ExactGaussian
from tests.methods.toy_training import random_mlp, toy_net

MU, STD = torch.tensor([1.5, -1.0], dtype=torch.float64), 0.3
EXACT = ExactGaussian(MU, STD)  # data N(MU, STD^2 I): its velocity and its exact flow map


def exact_teacher() -> Teacher:
    """The exact velocity of N(MU, STD^2 I) data in the dtype it is asked in."""
    return Teacher.from_velocity(lambda z, t, labels: EXACT.velocity(z.double(), t.double()).to(z.dtype), (2,),
                                 teacher_id="exact-gaussian")


class GaussianMap(nn.Module):
    """F = the exact average velocity + wobble (t - s) sin(3 z): the exact flow map at wobble = 0 (a parameter, so the
    loss has a gradient), a bent map that keeps F(z, t, t) = v for wobble != 0."""

    def __init__(self, wobble: float = 0.0):
        super().__init__()
        self.wobble = nn.Parameter(torch.tensor(wobble, dtype=torch.float64))

    def forward(self, z, t, s, cond=None):
        return EXACT(z, t, s) + self.wobble * (t - s)[:, None] * torch.sin(3 * z)


def student(net, **options):
    method = methods.get("align_your_flow", net, (2,), class_dropout=0.0, **options)
    method.attach_teacher(exact_teacher(), None)
    return method


def path_points(n=256, seed=0, same_times=False):
    """(x, eps, t, s): Gaussian data, noise and times 0.02 <= s < t <= 0.99 (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = MU + STD * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.94 * torch.rand(n, generator=gen, dtype=torch.float64)
    s = t.clone() if same_times else 0.02 + (t - 0.03) * torch.rand(n, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, 2, generator=gen, dtype=torch.float64), t, s


def parameter_grad(method, x, eps, t, s, ratio=1.0):
    method.net.zero_grad()
    per_sample, residual = method.objective(x, eps, t, s, None, ratio)
    per_sample.mean().backward()
    return torch.cat([p.grad.flatten() for p in method.net.parameters()]), residual


# --- (a) the exact map is a fixed point; a bent one is not --------------------------------------------------------
@pytest.mark.parametrize("objective", ["emd", "lmd"])
def test_the_exact_flow_map_zeroes_the_tangent_and_the_gradient(objective):
    x, eps, t, s = path_points()
    exact = student(GaussianMap(0.0), objective=objective, tangent_warmup_max=1.0)
    grad, residual = parameter_grad(exact, x, eps, t, s)
    assert residual.abs().max() < 1e-12 and grad.abs().max() < 1e-12
    bent = student(GaussianMap(0.3), objective=objective, tangent_warmup_max=1.0)
    grad, residual = parameter_grad(bent, x, eps, t, s)
    assert residual.norm(dim=1).mean() > 0.1 and grad.abs().max() > 0.05


def test_the_paper_warmup_cap_keeps_one_percent_of_flow_matching():
    """r_max = 0.99: on the exact map g = (v - F) + 0.99 (s - t) dF/dt = 0.01 (v - F), since (s - t) dF/dt = F - v."""
    x, eps, t, s = path_points()
    z = (1 - t[:, None]) * x + t[:, None] * eps
    v = EXACT.velocity(z, t)
    _, g = eulerian_tangent(lambda *a: EXACT(*a), z, t, s, v, warmup_ratio=0.99)
    assert torch.allclose(g, 0.01 * (v - EXACT(z, t, s)), atol=1e-12)


@pytest.mark.parametrize("objective", ["emd", "lmd"])
def test_at_s_equal_t_the_loss_is_flow_matching_on_the_teacher(objective):
    """Unnormalised, s = t: the surrogate's value and gradient are those of mean_dims ||F(z, t, t) - v(z, t)||^2."""
    x, eps, t, s = path_points(same_times=True)
    method = student(random_mlp(), objective=objective, tangent_norm="none")
    grad, _ = parameter_grad(method, x, eps, t, s, ratio=0.5)  # the warm-up term vanishes at s = t
    method.net.zero_grad()
    z = (1 - t[:, None]) * x + t[:, None] * eps
    flow_matching = (method.net(z, t, t) - EXACT.velocity(z, t)).pow(2).mean()
    flow_matching.backward()
    reference = torch.cat([p.grad.flatten() for p in method.net.parameters()])
    assert torch.allclose(grad, reference, rtol=1e-10, atol=1e-12)
    assert torch.isclose(method.objective(x, eps, t, s, None, 0.5)[0].mean(), flow_matching.detach())


# --- (b) the surrogate's gradient is the paper's -----------------------------------------------------------------
def flow_map(net, z, t, s):
    return z + (s - t)[:, None] * net(z, t, s)


@pytest.mark.parametrize("objective", ["emd", "lmd"])
def test_the_gradient_is_the_limit_of_the_papers_discrete_loss(objective):
    """EMD: ||f(x_t, t, s) - sg f(x_t', t', s)||^2 with the teacher's Euler step t' = t - eps (t - s); LMD:
    ||f(x_t, t, s) - sg Euler_teacher(f(x_t, t, s'), s' -> s)||^2, s' = s + eps (t - s). Weighted by
    2 / (D (t - s)^2) and divided by 2 eps, their gradients tend to the unnormalised surrogate's (paper's Thm 3.2)."""
    x, eps_noise, t, s = path_points(n=64, seed=1)
    method = student(random_mlp(), objective=objective, tangent_norm="none")
    grad, _ = parameter_grad(method, x, eps_noise, t, s)

    net, step = method.net, 1e-6
    net.zero_grad()
    z = (1 - t[:, None]) * x + t[:, None] * eps_noise
    gap = (t - s)[:, None]
    with torch.no_grad():
        if objective == "emd":
            t_next = t - step * (t - s)
            target = flow_map(net, z - step * gap * EXACT.velocity(z, t), t_next, s)
        else:
            s_prev = s + step * (t - s)
            landing = flow_map(net, z, t, s_prev)
            target = landing + (s - s_prev)[:, None] * EXACT.velocity(landing, s_prev)
    weight = 2 / (2 * gap.squeeze(1) ** 2)  # 2 / (D (t - s)^2), D = 2
    discrete = (weight * (flow_map(net, z, t, s) - target).pow(2).sum(1)).mean() / (2 * step)
    discrete.backward()
    reference = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert (grad - reference).norm() < 1e-4 * reference.norm()


def test_the_normalised_emd_gradient_is_the_papers_with_its_weight():
    """With tangent normalisation the gradient is grad E[w' sign(t - s) f . sg(df/dt)], w' = 2 / (D (t - s) (|g| + c)),
    df/dt taken here by a central difference along the teacher's ODE, independently of the JVP."""
    x, eps_noise, t, s = path_points(n=64, seed=2)
    method = student(random_mlp(), tangent_norm_const=0.1)
    grad, _ = parameter_grad(method, x, eps_noise, t, s)

    net, h = method.net, 1e-5
    net.zero_grad()
    z = (1 - t[:, None]) * x + t[:, None] * eps_noise
    v = EXACT.velocity(z, t)
    with torch.no_grad():  # df/dt along (v, 1, 0); v constant over the tiny step is enough to first order
        g = (flow_map(net, z + h * v, t + h, s) - flow_map(net, z - h * v, t - h, s)) / (2 * h)
    weight = 2 / (2 * (t - s) * (g.norm(dim=1) + 0.1))
    papers = (weight * torch.sign(t - s) * (flow_map(net, z, t, s) * g).sum(1)).mean()
    papers.backward()
    reference = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert (grad - reference).norm() < 1e-6 * reference.norm()


def test_the_lagrangian_residual_is_the_terminal_velocity_mismatch():
    """d/ds f - v(f, s), with d/ds f by a central difference in s on the tiny net."""
    x, eps_noise, t, s = path_points(n=32, seed=3)
    net, h = random_mlp(), 1e-5
    z = (1 - t[:, None]) * x + t[:, None] * eps_noise
    _, residual = lagrangian_residual(lambda *a: net(*a), z, t, s, lambda z_, s_: EXACT.velocity(z_, s_))
    with torch.no_grad():
        df_ds = (flow_map(net, z, t, s + h) - flow_map(net, z, t, s - h)) / (2 * h)
        reference = df_ds - EXACT.velocity(flow_map(net, z, t, s), s)
    assert torch.allclose(residual, reference, atol=1e-7)


# --- (c) training from scratch against the exact teacher ---------------------------------------------------------
def map_error(method, net, steps, n=2000):
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(5))
    exact = MU.float() + STD * noise  # the exact 1 -> 0 flow map
    return (method.sample(noise, steps, net=net) - exact).norm(dim=1).mean().item()


def distilled(objective, steps):
    """`steps` AdamW steps (lr 3e-3 decayed linearly to 0, EMA 0.99) on the exact teacher from a fresh toy MLP."""
    torch.manual_seed(0)
    method = methods.get("align_your_flow", toy_net(), (2,), objective=objective, tangent_warmup_steps=0)
    method.attach_teacher(exact_teacher(), None)
    ema = EMA(method.net, 0.99)
    optimizer = torch.optim.AdamW(method.net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = MU.float() + STD * torch.randn(256, 2, generator=gen)
        loss = method.loss(x, None).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update(method.net, step)
    return method, ema.shadow


@pytest.mark.parametrize("objective, steps, bounds", [("emd", 400, (0.2, 0.12)), ("lmd", 400, (0.2, 0.12))])
def test_a_short_distillation_learns_the_one_and_two_step_map(objective, steps, bounds):
    """The untrained map (F = 0: f = noise) is off by ~1.9, the teacher's own single Euler step by ~0.38 (all samples
    at the mean); the distilled map is close at 1 and 2 steps (measured: EMD 0.13 / 0.06, LMD 0.12 / 0.08)."""
    untrained = methods.get("align_your_flow", toy_net(), (2,))
    assert map_error(untrained, untrained.net, 1) > 1.5
    method, ema = distilled(objective, steps)
    one, two = map_error(method, ema, 1), map_error(method, ema, 2)
    assert one < bounds[0] and two < bounds[1], (one, two)


# --- configuration and the whole `jumpflow distill` path ----------------------------------------------------------
@pytest.mark.parametrize("options, match", [({"objective": "cm"}, "objective"), ({"gap_std": 0}, "gap_std"),
                                            ({"tangent_norm": "l1"}, "tangent_norm"),
                                            ({"tangent_warmup_max": 0}, "tangent_warmup_max"),
                                            ({"tangent_warmup_steps": -1}, "tangent_warmup_steps"),
                                            ({"flow_matching_fraction": 2}, "flow_matching_fraction")])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get("align_your_flow", toy_net(), (2,), **options)


def test_without_a_teacher_it_says_how_to_get_one():
    with pytest.raises(JumpflowError, match="jumpflow distill"):
        methods.get("align_your_flow", toy_net(), (2,)).loss(torch.zeros(8, 2), None)


def test_distill_samples_at_any_step_count_and_resumes_exactly(teacher_run, tmp_path):
    changes = {"steps": 20, "batch_size": 64, "progress": False, "sample_every": 0, "checkpoint_every": 10}
    jumpflow.api.distill(teacher_run, "align_your_flow", tmp_path / "whole", changes)
    cfg = jumpflow.TrainConfig.load(tmp_path / "whole" / "config.yaml")
    assert cfg.method == "align_your_flow" and cfg.teacher.endswith(".safetensors")
    jumpflow.api.train(cfg, tmp_path / "cut", stop_after=15)  # killed after its step-10 checkpoint
    jumpflow.api.distill(None, None, tmp_path / "cut", {"progress": False}, resume=True)
    a, b = jumpflow.load(tmp_path / "whole"), jumpflow.load(tmp_path / "cut")
    for (name, p), q in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        assert torch.equal(p, q), name  # the student and the warm-up counter
    assert int(a.method.training_step) == 20
    for steps in (1, 2):
        samples = a.generate(16, steps=steps, seed=0)
        assert samples.shape == (16, 2) and torch.isfinite(samples).all()
    assert not torch.equal(a.generate(16, steps=1, seed=0), a.generate(16, steps=2, seed=0))


def test_the_student_starts_from_the_teacher_unless_told_not_to(teacher_run, tmp_path):
    from jumpflow.train import Trainer

    teacher = Teacher.from_checkpoint(teacher_run)
    for start in (True, False):
        cfg = jumpflow.api.distill_config(teacher_run, "align_your_flow", {"steps": 1, "progress": False,
                                                                          "init_from_teacher": start})
        net = Trainer(cfg, tmp_path / f"start-{start}").method.net
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), teacher.net.parameters())) == start
