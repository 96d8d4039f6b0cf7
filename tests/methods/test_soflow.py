import pytest
import torch
from torch import nn

import jumpflow.methods.soflow  # noqa: F401  (registers "soflow")
from jumpflow import methods, nets
from jumpflow.errors import JumpflowError
from jumpflow.methods.soflow import consistency_residual
from tests.gaussian import ExactGaussian, ExactMixtureMap, PerturbedVelocity
from tests.methods.toy_training import EIGHT_GAUSSIANS as MIXTURE
from tests.methods.toy_training import OneStepMap, train_toy


def flow_map_of(net):
    def flow_map(z, t, s):
        F = net(z, t, s)
        return F, z + (s - t)[:, None] * F
    return flow_map


def mixture_points(n, seed=0, t_range=(0.3, 0.95)):
    g = torch.Generator().manual_seed(seed)
    x = MIXTURE.draw(n, g).double()
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = t_range[0] + (t_range[1] - t_range[0]) * torch.rand(n, generator=g, dtype=torch.float64)
    s = 0.05 + (t - 0.15) * torch.rand(n, generator=g, dtype=torch.float64)  # 0.05 <= s <= t - 0.1
    return x, eps, t, s


def test_the_exact_mixture_solution_is_a_fixed_point_of_the_consistency_target():
    """Solution consistency: f(z_t, t, s) = f(z_l, l, s) along the ODE, so for the exact solution function and the
    marginal velocity the residual delta = (f_t - sg f_l) / (t - l) (the regression target is F_t + delta) vanishes
    at first order: it halves with the gap t - l. A perturbed map keeps a residual that does not shrink."""
    x, eps, t, s = mixture_points(128)
    z = (1 - t[:, None]) * x + t[:, None] * eps
    v = MIXTURE.velocity(z, t)  # exact marginal velocity
    # F with f(z, t, s) = z + (s - t) F the exact mixture flow map, and a bent one that keeps f(z, t, t) = z and
    # F(z, t, t) = v.
    exact, bent = flow_map_of(ExactMixtureMap(MIXTURE)), flow_map_of(ExactMixtureMap(MIXTURE, wobble=0.5))
    sizes = {}
    for rho in (0.02, 0.01):
        l = t + (s - t) * rho
        for name, fmap in (("exact", exact), ("bent", bent)):
            _, delta = consistency_residual(fmap, z, t, s, l, v)
            sizes[name, rho] = delta.norm(dim=1).mean().item()
    assert sizes["exact", 0.01] < 0.02  # velocity-scale quantity, |v| ~ 2
    assert 1.7 < sizes["exact", 0.02] / sizes["exact", 0.01] < 2.3  # first order in t - l
    assert sizes["bent", 0.01] > 0.2 and sizes["bent", 0.01] > 0.8 * sizes["bent", 0.02]
    assert sizes["bent", 0.01] > 20 * sizes["exact", 0.01]


def test_the_exact_velocity_minimises_the_flow_matching_part():
    """L_FM(v + D) - L_FM(v) = E|D|^2 / dim: the cross term E<v - v_c, D> vanishes because E[eps - x | z_t] = v."""
    perturbation, n = 0.3, 100000
    x = MIXTURE.draw(n, torch.Generator().manual_seed(0)).double()
    losses = {}
    for shift in (0.0, perturbation):
        net = PerturbedVelocity(MIXTURE, shift)
        method = methods.get("soflow", net, (2,), flow_matching_share=1.0, adaptive_power=0.0)
        torch.manual_seed(1)
        losses[shift] = method.loss(x, None).loss.item()
    torch.manual_seed(1)  # replay the loss's draws: noise, then the FM times t ~ LN(-0.2, 1)
    eps = torch.randn_like(x)
    t = torch.sigmoid(-0.2 + torch.randn(n)).double()
    z = (1 - t[:, None]) * x + t[:, None] * eps
    expected = (perturbation * torch.cos(z)).pow(2).mean().item()  # E|D|^2 / dim on the same points
    # MC error of the cross term here is ~2% of the expected gap; a target biased by D would change it by ~100%.
    assert losses[perturbation] - losses[0.0] == pytest.approx(expected, rel=0.08)


def test_point_mass_data_gives_zero_loss_for_the_exact_solution_and_not_for_a_bent_one():
    """For a point mass the conditional velocity is the marginal one and trajectories are straight, so both SoFlow
    losses vanish for the exact solution function; a bent map is penalised."""
    exact = ExactGaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), 0.0)
    x = exact.mu.expand(512, 2).clone()

    class Bent(nn.Module):
        def forward(self, z, t, s, cond=None):
            return exact(z, t, s) + 0.5 * (t - s)[:, None] * torch.sin(3 * z)

    for net, small in ((exact, True), (Bent(), False)):
        method = methods.get("soflow", net, (2,), flow_matching_share=0.5, adaptive_power=0.0)
        torch.manual_seed(0)
        value = method.loss(x, None).loss.item()
        assert (value < 1e-12) if small else (value > 1e-2)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_sampling_with_the_exact_solution_lands_on_the_exact_flow_map(steps):
    exact = ExactGaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4)
    method = methods.get("soflow", exact, (2,))
    noise = torch.randn(256, 2, dtype=torch.float64)
    assert torch.allclose(method.sample(noise, steps), exact.mu + 0.4 * noise, atol=1e-9)


def test_consistency_times_and_gap_schedule():
    torch.manual_seed(0)
    method = methods.get("soflow", nets.build("mlp", (2,), width=16, depth=1), (2,), gap_schedule_steps=100)
    t, s, l = method.consistency_times(20000, "cpu")
    assert (s >= 0).all() and (s <= l).all() and (l <= t - 1e-4 + 1e-7).all() and (t <= 1).all()
    assert torch.allclose(t - l, torch.clamp(0.1 * (t - s), min=1e-4), atol=1e-6)  # l = t + (s - t) rho(0)
    assert float(method.gap_ratio()) == pytest.approx(0.1)
    method.training_step.fill_(50)
    assert float(method.gap_ratio()) == pytest.approx(0.1 * (0.002 / 0.1) ** 0.5)
    method.training_step.fill_(10 ** 6)
    assert float(method.gap_ratio()) == pytest.approx(0.002)
    planned = methods.get("soflow", nets.build("mlp", (2,), width=16, depth=1), (2,))  # K = the run's length
    planned.training_step.fill_(1000)
    assert float(planned.gap_ratio()) == pytest.approx(0.1 * (0.002 / 0.1) ** (1000 / 400_000))  # no plan: 400k
    planned.plan(2000)
    assert float(planned.gap_ratio()) == pytest.approx(0.1 * (0.002 / 0.1) ** 0.5)


def _fm_error(net, x, eps, t):
    """Plain flow-matching MSE of net(z, t, t) on fixed samples (the FM part of the loss, unweighted)."""
    with torch.no_grad():
        z = (1 - t[:, None]) * x + t[:, None] * eps
        return (net(z, t, t) - (eps - x)).pow(2).mean().item()


def test_short_training_learns_a_one_step_map_that_flow_matching_does_not():
    g = torch.Generator().manual_seed(7)
    target = OneStepMap(torch.randn(500, 2, generator=g), n_steps=100)  # Phi_{1->0}(noise), computed once
    x, eps = MIXTURE.draw(4000, g), torch.randn(4000, 2, generator=g)
    t = torch.rand(4000, generator=g)
    soflow = train_toy("soflow", 300, lr=3e-3, ema_decay=None)  # no EMA: the trained net samples
    flow = train_toy("flow_matching", 300, lr=3e-3, ema_decay=None)
    untrained, before, after, fm_one_step = target.compare("soflow", soflow, flow, relative=True)
    print(f"relative 1-step map error: untrained {before:.3f}, soflow {after:.3f}, flow matching {fm_one_step:.3f}")
    assert _fm_error(soflow.method.net, x, eps, t) < _fm_error(untrained.net, x, eps, t) - 0.2  # the loss went down
    assert after < 0.7 * before
    assert after < 0.75 * fm_one_step
    assert soflow.method.sample(target.noise, 2).isfinite().all()


def test_unet_with_labels_trains_and_samples():
    torch.manual_seed(0)
    net = nets.build("unet", (1, 8, 8), num_classes=3, channels=8, channel_mult=[1, 2])
    method = methods.get("soflow", net, (1, 8, 8), num_classes=3)
    x, labels = torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out = method.loss(x, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.metrics) >= {"mse_fm", "mse_consistency"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert int(method.training_step) == 1
    for steps in (1, 2):
        assert method.sample(torch.randn(8, 1, 8, 8), steps, labels=labels).shape == (8, 1, 8, 8)
    assert method.sample(torch.randn(2, 1, 8, 8), 1).shape == (2, 1, 8, 8)  # unconditional: null label


def test_guidance_mixes_the_model_velocities_for_labelled_samples_only():
    class ByLabel(nn.Module):
        def forward(self, z, t, s, cond=None):
            return torch.ones_like(z) * cond[:, None].float()

    method = methods.get("soflow", ByLabel(), (2,), num_classes=3, guidance_scale=3.0, guidance_mix=0.25)
    v = torch.zeros(3, 2)
    t = torch.tensor([0.5, 0.5, 0.9])
    out = method.guided_velocity(torch.zeros(3, 2), t, v, torch.tensor([1, 3, 1]))
    # labelled, t <= 0.8: 0.25 * (0 + 2 * (0 - 3)) + 0.75 * 1; null label: v; t > 0.8: 0.25 * 0 + 0.75 * 1
    assert torch.allclose(out[:, 0], torch.tensor([0.25 * -6.0 + 0.75, 0.0, 0.75]))


@pytest.mark.parametrize("options, match", [
    ({"flow_matching_share": 1.5}, "flow_matching_share"),
    ({"gap_ratio_end": 0.0}, "gap_ratio"),
    ({"gap_schedule_steps": -1}, "gap_schedule_steps"),
    ({"min_gap": 0.0}, "min_gap"),
    ({"guidance_mix": -0.1}, "guidance_mix"),
    ({"gap_ratio": 0.1}, "unknown option"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get("soflow", nets.build("mlp", (2,), width=16, depth=1), (2,), **options)


def test_bad_sampling_arguments_are_clear_errors():
    method = methods.get("soflow", nets.build("mlp", (2,), width=16, depth=1), (2,))
    with pytest.raises(JumpflowError, match="positive integer"):
        method.sample(torch.randn(2, 2), 0)
    with pytest.raises(JumpflowError, match="guidance"):
        method.sample(torch.randn(2, 2), 1, guidance=2.0)
