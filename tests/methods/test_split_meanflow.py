import pytest
import torch
from torch import nn

import jumpflow.methods.split_meanflow  # noqa: F401  (registers "split_meanflow")
from jumpflow import methods, nets
from jumpflow.data.gaussian_mixture import GaussianMixture
from jumpflow.errors import JumpflowError
from jumpflow.methods.split_meanflow import split_meanflow_target
from tests.gaussian import ExactGaussian, ExactMixtureMap, points_on_the_path
from tests.methods.toy_training import OneStepMap, train_toy

MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4


@pytest.fixture(scope="module")
def mixture():
    """Two unequal 2-D components, one anisotropic (METHODS.md §1.2)."""
    covs = torch.stack([torch.diag(torch.tensor([0.3, 0.3])) ** 2, torch.tensor([[0.2, 0.08], [0.08, 0.05]])])
    return GaussianMixture([0.6, 0.4], [[-1.5, 0.5], [1.0, -1.0]], covs)


def triples(n, seed=0):
    """r < s < t with gaps >= 0.05, away from the stiff data end."""
    gen = torch.Generator().manual_seed(seed)
    t = 0.3 + 0.7 * torch.rand(n, generator=gen, dtype=torch.float64)
    r = (t - 0.1) * torch.rand(n, generator=gen, dtype=torch.float64) + 0.01
    lam = 0.2 + 0.6 * torch.rand(n, generator=gen, dtype=torch.float64)
    return t, r, lam


def test_interval_splitting_identity_holds_for_the_exact_average_velocity(mixture):
    """METHODS.md §1.3.3: (t - r) u(z_t, r, t) = (t - s) u(z_t, s, t) + (s - r) u(z_s, r, s), z_s = z_t - (t - s) u."""
    u = ExactMixtureMap(mixture, n_steps=300)  # u(z, r, t) = (z - Phi_{t->r}(z)) / (t - r); v(z, t) when r == t
    t, r, lam = triples(32)
    s = (1 - lam) * t + lam * r
    z = points_on_the_path(mixture, t)
    whole = (t - r)[:, None] * u(z, t, r)
    u_late = u(z, t, s)
    z_s = z - (t - s)[:, None] * u_late
    parts = (t - s)[:, None] * u_late + (s - r)[:, None] * u(z_s, s, r)
    assert torch.allclose(whole, parts, atol=1e-7)
    # With the instantaneous velocity in place of u (one Euler step per interval) the identity fails.
    v = lambda z_, t_: mixture.velocity(z_, t_)  # noqa: E731
    euler_parts = (t - s)[:, None] * v(z, t) + (s - r)[:, None] * v(z - (t - s)[:, None] * v(z, t), s)
    assert (euler_parts - (t - r)[:, None] * v(z, t)).norm(dim=1).mean() > 0.05


def test_the_exact_average_velocity_is_a_fixed_point_of_the_target(mixture):
    """The target operator maps the exact u to itself; a wrong u (the instantaneous velocity) is moved."""
    exact = ExactMixtureMap(mixture, n_steps=300)
    t, r, lam = triples(32, seed=1)
    z = points_on_the_path(mixture, t, seed=1)
    target = split_meanflow_target(exact, z, t, r, lam)
    assert torch.allclose(target, exact(z, t, r), atol=1e-7)
    wrong = lambda z_, t_, r_: mixture.velocity(z_, t_)  # noqa: E731
    assert (split_meanflow_target(wrong, z, t, r, lam) - mixture.velocity(z, t)).norm(dim=1).mean() > 0.05
    # The closed-form Gaussian (METHODS.md §1.1) too, to round-off.
    gaussian = ExactGaussian(MU, STD)
    zg = torch.randn(64, 2, dtype=torch.float64)
    tg, rg, lamg = triples(64, seed=2)
    assert torch.allclose(split_meanflow_target(gaussian, zg, tg, rg, lamg), gaussian(zg, tg, rg), atol=1e-12)


def test_loss_is_zero_on_the_split_rows_for_the_exact_average_velocity():
    """Wiring: with the exact u as the network, the consistency rows have zero error (argument order, lam, s) and the
    boundary rows regress on eps - x (nonzero: the conditional velocity is noisy)."""
    torch.manual_seed(0)
    method = methods.get("split_meanflow", ExactGaussian(MU, STD), (2,), flow_matching_share=0.5)
    out = method.loss(MU + STD * torch.randn(512, 2, dtype=torch.float64), None)
    # MeanFlow's time sampler draws float32 times, hence ~1e-10 rather than round-off zero.
    assert out.metrics["mse_split"] < 1e-8 and out.metrics["mse_boundary"] > 0.05


def test_short_gaps_train_as_flow_matching():
    """Guard t - r > min_gap: pairs closer than min_gap become boundary rows (r = t), never a split target."""
    gaps = []

    class Recorder(nn.Module):
        def forward(self, z, t, r, cond=None):
            gaps.append(t - r)
            return torch.zeros_like(z)

    torch.manual_seed(0)
    method = methods.get("split_meanflow", Recorder(), (2,), flow_matching_share=0.0, min_gap=0.3)
    out = method.loss(torch.randn(256, 2), None)
    *targets, student = gaps  # two no-grad forwards for the split rows, then the student on the whole batch
    assert len(targets) == 2 and student.shape == (256,)
    assert ((student == 0) | (student > 0.3)).all() and (student == 0).any() and (student > 0.3).any()
    assert targets[0].shape[0] == int((student > 0).sum())  # only the split rows pay the extra forwards
    assert out.metrics["mse_split"] == 0  # zero net, zero target


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampling_with_the_exact_average_velocity_lands_on_the_exact_flow_map(steps):
    """MeanFlow's sampler (inherited); its time grid is float32, hence the tolerance."""
    method = methods.get("split_meanflow", ExactGaussian(MU, STD), (2,))
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(method.sample(noise, steps), MU + STD * noise, atol=1e-6)  # Phi_{1->0}(eps) = mu + s eps


def test_training_learns_a_one_step_map_that_flow_matching_at_one_step_does_not(toy_flow_matching):
    target = OneStepMap.seeded()
    split = train_toy("split_meanflow")  # the EMA copy is what samples
    one_step = target.compare("split_meanflow", split, toy_flow_matching(400))  # untrained: 0.86, flow matching: 1.85
    assert sum(split.losses[-50:]) < 0.9 * sum(split.losses[:50])
    assert one_step.after < 0.6 * one_step.before and one_step.after < 0.35 * one_step.flow, one_step
    assert target.error(split.method.sample(target.noise, 2, net=split.ema)) < 0.6 * one_step.before


def test_unet_class_conditional_loss_and_sampling():
    torch.manual_seed(0)
    net = nets.build("unet", (1, 8, 8), num_classes=3, channels=8, channel_mult=[1, 2])
    method = methods.get("split_meanflow", net, (1, 8, 8), num_classes=3)
    out = method.loss(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.metrics) == {"mse", "mse_split", "mse_boundary"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    for steps in (1, 2, 3):
        x = method.sample(torch.randn(4, 1, 8, 8), steps, labels=torch.tensor([0, 1, 2, 3]))
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert method.sample(torch.randn(2, 1, 8, 8), 1).shape == (2, 1, 8, 8)  # unconditional (labels None) too
    assert method.self_check(torch.randn(4, 1, 8, 8), None) == {}  # no JVP to check


def test_bad_options_are_clear_errors():
    with pytest.raises(JumpflowError, match="min_gap"):
        methods.get("split_meanflow", ExactGaussian(MU, STD), (2,), min_gp=1e-3)
    with pytest.raises(JumpflowError, match="jvp_mode"):  # MeanFlow's JVP option does not apply here
        methods.get("split_meanflow", ExactGaussian(MU, STD), (2,), jvp_mode="exact")
    method = methods.get("split_meanflow", ExactGaussian(MU, STD), (2,))
    with pytest.raises(JumpflowError, match="positive integer"):
        method.sample(torch.randn(2, 2, dtype=torch.float64), 0)
    bad = methods.get("split_meanflow", ExactGaussian(MU, STD), (2,), time_pair="shuffled")
    with pytest.raises(JumpflowError, match="independent"):
        bad.loss(torch.randn(4, 2), None)
