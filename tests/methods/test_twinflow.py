import pytest
import torch
from torch import nn

import jumpflow.methods.twinflow  # noqa: F401  (registers "twinflow")
from jumpflow import methods, nets
from jumpflow.errors import JumpflowError
from jumpflow.eval import sliced_wasserstein
from jumpflow.methods.twinflow import rcgm_residual, rectify_loss, self_adversarial_delta
from tests.gaussian import ExactGaussian
from tests.methods.toy_training import EIGHT_GAUSSIANS, OneStepMap, toy_net, train_toy

MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4


class TwinGaussian(nn.Module):
    """Exact twin fields: at t >= 0 the data N(MU, STD^2 I) flow, at negative times the flow of a 'fake' N(fake_mu,
    STD^2 I) evaluated at |t| (what TwinFlow's negative-time branch learns: the flow to the model's own samples)."""

    def __init__(self, fake_mu):
        super().__init__()
        self.real, self.fake = ExactGaussian(MU, STD), ExactGaussian(fake_mu, STD)

    def forward(self, z, t, s, cond=None):
        real = self.real(z, t.abs(), s.abs())
        fake = self.fake(z, t.abs(), s.abs())
        return torch.where((t < 0)[:, None], fake, real)


def delta_and_generator_push(fake_mu, n=256):
    """Delta at fixed times on fake samples, and -dL_rectify/dG: the direction a descent step moves G(eps)."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    times = 0.05 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64)
    G = (fake_mu + STD * eps).requires_grad_(True)  # one-step samples of the 'fake' distribution
    torch.manual_seed(1)
    delta = self_adversarial_delta(TwinGaussian(fake_mu), G, None, clip=1.0, times=times)
    rectify_loss(eps - G, delta).sum().backward()  # F(eps, 1, 0) = eps - G(eps)
    return delta, -G.grad, times


def test_self_adversarial_signal_vanishes_when_the_one_step_distribution_is_the_data():
    """The identity TwinFlow rests on: when the fake flow is the data flow, F(x_t, -t) = F(x_t, t), Delta = 0, and the
    distribution-matching loss pushes the generator nowhere."""
    delta, push, _ = delta_and_generator_push(MU.clone())
    assert delta.abs().max() < 1e-12
    assert push.abs().max() < 1e-9


def test_self_adversarial_signal_points_from_the_fake_distribution_to_the_data():
    """Sign test: with the fake distribution shifted by m_f - m, v_fake - v_real = t / sigma_t^2 (m - m_f) (closed
    form on the linear path, METHODS.md §1.1), and a descent step on L_rectify moves every G(eps) toward the data."""
    shift = torch.tensor([0.3, -0.2], dtype=torch.float64)
    delta, push, t = delta_and_generator_push(MU + shift)
    sigma2 = ((1 - t) ** 2 * STD ** 2 + t ** 2)[:, None]
    assert torch.allclose(delta, (t[:, None] / sigma2) * (-shift), atol=1e-12)  # unclipped here (|Delta| < 0.7)
    cosine = nn.functional.cosine_similarity(push, -shift.expand_as(push), dim=1)
    assert (cosine > 1 - 1e-9).all() and push.norm(dim=1).min() > 0
    # A far-off fake distribution saturates the clip at +-1 but keeps the direction's signs.
    far, _, _ = delta_and_generator_push(MU + 10 * shift)
    assert far.abs().max() <= 1.0 and (far.sign() == -shift.sign()).all()


def test_the_real_flow_target_is_a_fixed_point_for_the_exact_flow_map():
    """RCGM residual with the exact average velocity, exact marginal velocity and exact target net: O(dt), shrinking
    10x with dt; the instantaneous velocity in place of the flow map is far from a fixed point. Short intervals are
    plain flow matching (r = F - v)."""
    exact = ExactGaussian(MU, STD)
    gen = torch.Generator().manual_seed(0)
    t = 0.2 + 0.8 * torch.rand(64, generator=gen, dtype=torch.float64)
    s = t * torch.rand(64, generator=gen, dtype=torch.float64) * 0.8
    z = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    v = exact.velocity(z, t)
    F = exact(z, t, s)
    coarse = rcgm_residual(exact, F, z, t, s, v, step=1e-2, jumps=2).abs().max()
    fine = rcgm_residual(exact, F, z, t, s, v, step=1e-3, jumps=2).abs().max()
    assert coarse < 0.1 and fine < 0.15 * coarse, (coarse, fine)  # measured 0.051 and 0.0050
    wrong = lambda z_, t_, s_, c=None: exact.velocity(z_, t_)  # noqa: E731
    assert rcgm_residual(wrong, exact.velocity(z, t), z, t, s, v, 1e-3, 2).norm(dim=1).mean() > 0.1
    near = t - 0.5e-2  # gap below the step: plain flow matching
    assert torch.equal(rcgm_residual(exact, F, z, t, near, v, 1e-2, 2), F - v)


def test_the_backbone_tells_negative_times_from_positive_ones():
    torch.manual_seed(0)
    net = nets.build("mlp", (2,), width=32, depth=1)
    nn.init.normal_(net.out.weight, std=0.5)  # the zero output layer would hide every input
    z, t = torch.randn(16, 2), torch.rand(16) * 0.9 + 0.1
    assert (net(z, t, t) - net(z, -t, -t)).norm(dim=1).min() > 1e-3


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, t, s, cond=None):
        self.calls.append((t.detach().clone(), s.detach().clone()))
        return torch.zeros_like(z)


def test_batch_split_and_negated_times_reach_the_network():
    """e2e rows jump 1 -> 0, fake (adv) rows see (-t, -t), the fake data come from a (1, 0) jump, and Delta evaluates
    the same net at (-tau, -tau) and (tau, tau)."""
    torch.manual_seed(0)
    net = Recorder()
    method = methods.get("twinflow", net, (2,))
    out = method.loss(torch.randn(8, 2), None)  # 2 rows per group: e2e, mul, any, adv
    (t_gen, s_gen), (t, s) = net.calls[0], net.calls[1]
    assert t_gen.shape == (2,) and (t_gen == 1).all() and (s_gen == 0).all()  # sg(G(eps)) for the fake rows
    assert (t[:2] == 1).all() and (s[:2] == 0).all()
    assert ((t[2:6] >= 0) & (s[2:6] >= 0) & (s[2:6] <= t[2:6])).all()
    assert ((t[2:4] - s[2:4]) <= 0.05 * t[2:4] + 1e-7).all()  # mul: short segments
    assert (t[6:] < 0).all() and torch.equal(s[6:], t[6:])  # the fake flow: instantaneous, negated time
    (t_fake, s_fake), (t_real, s_real) = net.calls[-2], net.calls[-1]
    assert (t_fake < 0).all() and torch.equal(s_fake, t_fake) and torch.equal(t_real, -t_fake)
    assert torch.equal(s_real, t_real)
    assert out.metrics["dm_delta"] == 0 and torch.isfinite(out.loss)


def test_loss_with_exact_twin_fields_has_no_self_adversarial_signal():
    """Wiring through loss(): data from N(MU, STD^2), a net whose fake branch equals the data flow and whose one-step
    jump is exact, so G(eps) ~ data: Delta is exactly zero; shifting the fake branch makes it nonzero."""
    torch.manual_seed(0)
    x = MU + STD * torch.randn(64, 2, dtype=torch.float64)
    assert methods.get("twinflow", TwinGaussian(MU.clone()), (2,)).loss(x, None).metrics["dm_delta"] < 1e-12
    shifted = methods.get("twinflow", TwinGaussian(MU + 0.5), (2,)).loss(x, None)
    assert shifted.metrics["dm_delta"] > 0.1


def test_guidance_enhanced_target_only_on_labelled_real_rows():
    class LabelNet(nn.Module):
        def forward(self, z, t, s, cond=None):
            return (cond.double() + 1)[:, None].expand_as(z).clone()

    method = methods.get("twinflow", LabelNet(), (2,), num_classes=3)
    labels = torch.tensor([0, 1, 2, 3, 2, 2])  # 3 = null (dropped)
    t = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.5], dtype=torch.float64)
    rows = torch.tensor([True, True, True, True, True, False])  # last row: a fake row
    v = torch.zeros(6, 2, dtype=torch.float64)
    out = method.enhanced_velocity(LabelNet(), torch.zeros(6, 2, dtype=torch.float64), t, v, rows, labels)
    expected = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.0, 0.0], dtype=torch.float64)  # 0.5 (c - null); t = 1 excluded
    assert torch.equal(out[:, 0], expected)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampling_with_the_exact_average_velocity_lands_on_the_exact_flow_map(steps):
    method = methods.get("twinflow", ExactGaussian(MU, STD), (2,))
    noise = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(method.sample(noise, steps), MU + STD * noise, atol=1e-6)  # Phi_{1->0}(eps) = mu + s eps


def velocity_error(net):
    """E |F(z_t, t, t) - (eps - x)|^2 of the real (positive-time) branch on a fixed 8-gaussians batch."""
    gen = torch.Generator().manual_seed(3)
    x = EIGHT_GAUSSIANS.sample_batch(2048, gen)[0]
    eps, t = torch.randn(2048, 2, generator=gen), torch.rand(2048, generator=gen)
    with torch.no_grad():
        return (net((1 - t[:, None]) * x + t[:, None] * eps, t, t) - (eps - x)).pow(2).sum(1).mean().item()


def test_training_learns_a_one_step_generator_that_flow_matching_at_one_step_does_not(toy_flow_matching):
    target = OneStepMap.seeded()
    reference = target.mixture.reference(1000, torch.Generator().manual_seed(2))

    def scores(x):  # (flow-map error, sliced Wasserstein to fresh data)
        return target.error(x), sliced_wasserstein(x, reference)

    untrained = methods.get("twinflow", toy_net(), (2,))
    before = scores(untrained.sample(target.noise, 1))  # zero output layer: the identity map
    twin = train_toy("twinflow")
    flow = toy_flow_matching(400)
    after = scores(twin.method.sample(target.noise, 1, net=twin.ema))
    two_steps = scores(twin.method.sample(target.noise, 2, net=twin.ema))
    flow_one_step = scores(flow.method.sample(target.noise, 1, net=flow.ema))  # collapses toward the data mean
    # The objective regresses on clipped residuals relative to the net's own output (|r| <= 1 per coordinate), so
    # it stays near its starting value (measured 1.96 -> 1.91 over 50-step means); the real branch's unclipped
    # flow-matching error shows the learning (measured 6.0 -> 4.1).
    assert sum(twin.losses[-50:]) < sum(twin.losses[:50])
    assert velocity_error(twin.ema) < 0.8 * velocity_error(untrained.net)
    assert after[0] < 0.6 * before[0] and after[0] < 0.35 * flow_one_step[0], (before, after, flow_one_step)
    assert after[1] < 0.6 * before[1] and after[1] < 0.35 * flow_one_step[1], (before, after, flow_one_step)
    assert two_steps[0] < 0.6 * before[0] and two_steps[1] < 0.6 * before[1], two_steps


def test_unet_class_conditional_loss_and_sampling():
    torch.manual_seed(0)
    net = nets.build("unet", (1, 8, 8), num_classes=3, channels=8, channel_mult=[1, 2])
    method = methods.get("twinflow", net, (1, 8, 8), num_classes=3)
    out = method.loss(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.metrics) == {"mse_real", "mse_fake", "dm_delta"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert torch.isfinite(method.loss(torch.randn(8, 1, 8, 8), None).loss)  # unconditional batch too
    for steps in (1, 2, 3):
        x = method.sample(torch.randn(4, 1, 8, 8), steps, labels=torch.tensor([0, 1, 2, 3]))
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert method.sample(torch.randn(2, 1, 8, 8), 1).shape == (2, 1, 8, 8)
    assert method.nfe(2) == 2 and method.bench_steps == (1, 2) and method.default_sample_steps == 1


@pytest.mark.parametrize("options, match", [
    (dict(dm_wieght=0.5), "dm_weight"),
    (dict(batch_split=(1, 1, 1)), "batch_split"),
    (dict(batch_split=(1, -1, 1, 1)), "batch_split"),
    (dict(target_net="teacher"), "target_net"),
    (dict(loss="huber"), "loss"),
    (dict(estimate_order=0), "estimate_order"),
    (dict(consistency_step=0.0), "consistency_step"),
    (dict(time_sampler="beta"), "time_sampler"),
    (dict(enhanced_range=(0.5, 0.2)), "enhanced_range"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get("twinflow", ExactGaussian(MU, STD), (2,), **options)


def test_bad_sampling_and_batch_are_clear_errors():
    method = methods.get("twinflow", ExactGaussian(MU, STD), (2,))
    with pytest.raises(JumpflowError, match="positive integer"):
        method.sample(torch.randn(2, 2, dtype=torch.float64), 0)
    with pytest.raises(JumpflowError, match="guidance"):
        method.sample(torch.randn(2, 2, dtype=torch.float64), 1, guidance=2.0)
    with pytest.raises(JumpflowError, match="too small"):
        method.loss(torch.randn(2, 2, dtype=torch.float64), None)
