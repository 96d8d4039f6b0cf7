import pytest
import torch
from torch import nn

import jumpflow.methods.shortcut  # noqa: F401  (registers "shortcut")
from jumpflow import methods, nets
from jumpflow.data.gaussian_mixture import GaussianMixture
from jumpflow.errors import JumpflowError
from jumpflow.methods.shortcut import shortcut_target
from tests.gaussian import ExactGaussian, ExactMixtureMap, ExactVelocity, points_on_the_path
from tests.methods.toy_training import OneStepMap, train_toy

MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4


def rotation(angle):
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    return torch.tensor([[c, -s], [s, c]])


@pytest.fixture(scope="module")
def mixture():
    """Three unequal 2-D components, one anisotropic and rotated (METHODS.md §1.2)."""
    covs = torch.stack([torch.diag(torch.tensor([0.3, 0.3])) ** 2,
                        rotation(0.6) @ torch.diag(torch.tensor([0.5, 0.1])) ** 2 @ rotation(0.6).T,
                        torch.diag(torch.tensor([0.2, 0.2])) ** 2])
    return GaussianMixture([0.5, 0.3, 0.2], [[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], covs)


def test_two_exact_half_steps_are_one_exact_full_step(mixture):
    """The bootstrap target has the exact shortcut of a Gaussian mixture as a fixed point (METHODS.md A5 Test), at
    every level d = 1 .. 1/64 on the grid-aligned times the method trains on, including the 1-step jump t = 1, d = 1."""
    exact = ExactMixtureMap(mixture, n_steps=300)  # the exact normalised jump (z - Phi_{t->s}(z)) / (t - s)
    method = methods.get("shortcut", exact, (2,))
    torch.manual_seed(0)
    t, d = method.bootstrap_times(28, "cpu", torch.float64)  # 4 rows per level; level 0 is t = 1, d = 1
    z = points_on_the_path(mixture, t)
    target = shortcut_target(exact, z, t, d, None, clip=0.0)
    assert torch.allclose(target, exact(z, t, t - d), atol=1e-6)
    # A step-blind shortcut (the exact velocity at every d: what flow matching alone would give) is not a fixed point
    # at large d.
    blind = shortcut_target(ExactVelocity(mixture), z, t, d, None, clip=0.0)
    coarse = d >= 0.5
    assert (blind - mixture.velocity(z, t))[coarse].norm(dim=1).mean() > 0.2


def test_bootstrap_times_are_on_the_grid_of_their_step_and_levels_are_spread_evenly():
    method = methods.get("shortcut", ExactGaussian(MU, STD), (2,))
    torch.manual_seed(0)
    t, d = method.bootstrap_times(7 * 400, "cpu", torch.float64)
    assert method.levels == 7
    levels = torch.log2(1 / d).round()
    assert torch.equal(torch.bincount(levels.long()), torch.full((7,), 400))  # d = 1, 1/2, ..., 1/64
    assert ((t - d) >= 0).all() and (t <= 1).all()  # the jump t -> t - d stays inside [0, 1]
    steps = t / d
    assert torch.allclose(steps, steps.round()) and (steps >= 1).all()
    assert t[d == 1].eq(1).all() and set((t[d == 0.5] * 2).round().tolist()) == {1.0, 2.0}
    t_flow, d_flow = method.flow_times(5000, "cpu", torch.float64)
    assert torch.all(d_flow == 1 / 128) and t_flow.min() >= 1 / 128 and t_flow.max() <= 1
    assert torch.allclose(t_flow * 128, (t_flow * 128).round()) and len(set(t_flow.tolist())) == 128


def test_loss_zero_on_bootstrap_rows_for_the_exact_shortcut_and_targets_come_from_the_ema():
    torch.manual_seed(0)
    x = MU + STD * torch.randn(256, 2, dtype=torch.float64)
    exact = methods.get("shortcut", ExactGaussian(MU, STD), (2,), clip=0.0)
    out = exact.loss(x, None)
    assert out.metrics["mse_bootstrap"] < 1e-12 and out.metrics["mse_flow"] > 0.05  # FM rows keep eps - x noise

    class Zero(nn.Module):
        def forward(self, z, t, s, cond=None):
            return torch.zeros_like(z)

    from_ema = methods.get("shortcut", Zero(), (2,), clip=0.0)
    from_ema.use_ema(ExactGaussian(MU, STD))  # the Trainer hands its EMA student over like this
    assert from_ema.loss(x, None).metrics["mse_bootstrap"] > 0.1  # the student (zero) is pulled toward the EMA's jump
    online = methods.get("shortcut", Zero(), (2,), clip=0.0, bootstrap_from_ema=False)
    online.use_ema(ExactGaussian(MU, STD))
    assert online.loss(x, None).metrics["mse_bootstrap"] == 0  # targets from the (zero) online net instead


def test_clipping_bounds_the_target():
    big = ExactGaussian(torch.tensor([6.0, -6.0], dtype=torch.float64), 0.1)
    z = torch.randn(64, 2, dtype=torch.float64)
    ones = torch.ones(64, dtype=torch.float64)
    assert shortcut_target(big, z, ones, ones, None, clip=0.0).abs().max() > 5
    assert shortcut_target(big, z, ones, ones, None, clip=4.0).abs().max() <= 4


def test_labels_are_dropped_only_on_the_flow_matching_rows():
    calls = []

    class Recorder(nn.Module):
        def forward(self, z, t, s, cond=None):
            calls.append(cond.clone())
            return torch.zeros_like(z)

    method = methods.get("shortcut", Recorder(), (2,), num_classes=3, class_dropout=1.0)
    labels = torch.arange(64) % 3
    method.loss(torch.randn(64, 2), labels)
    first_half, second_half, student = calls  # two teacher half steps on the 64 / 8 bootstrap rows, then the student
    assert torch.equal(first_half, labels[:8]) and torch.equal(second_half, labels[:8])
    assert torch.equal(student[:8], labels[:8]) and student[8:].eq(3).all()  # 3 = the null label


@pytest.mark.parametrize("steps", [1, 2, 4, 128])
def test_sampling_with_the_exact_shortcut_lands_on_the_exact_flow_map(steps):
    method = methods.get("shortcut", ExactGaussian(MU, STD), (2,))
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(method.sample(noise, steps), MU + STD * noise, atol=1e-9)  # Phi_{1->0}(eps) = mu + s eps
    assert method.nfe(steps) == steps


def test_training_learns_a_one_step_map_that_flow_matching_at_one_step_does_not(toy_flow_matching):
    target = OneStepMap.seeded()
    shortcut = train_toy("shortcut", metric="mse_flow")  # with an EMA student (bootstrap teacher)
    one_step = target.compare("shortcut", shortcut, toy_flow_matching(400))  # untrained: 0.86, flow matching: 1.85
    assert sum(shortcut.losses[-50:]) < 0.9 * sum(shortcut.losses[:50])  # the flow-matching part of the loss went down
    assert one_step.after < 0.6 * one_step.before and one_step.after < 0.35 * one_step.flow, one_step
    assert target.error(shortcut.method.sample(target.noise, 4, net=shortcut.ema)) < 0.6 * one_step.before


def test_unet_class_conditional_loss_and_sampling():
    torch.manual_seed(0)
    net = nets.build("unet", (1, 8, 8), num_classes=3, channels=8, channel_mult=[1, 2])
    method = methods.get("shortcut", net, (1, 8, 8), num_classes=3)
    out = method.loss(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.metrics) == {"mse", "mse_flow", "mse_bootstrap"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    for steps in (1, 2):
        x = method.sample(torch.randn(4, 1, 8, 8), steps, labels=torch.tensor([0, 1, 2, 3]))
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    x = method.sample(torch.randn(2, 1, 8, 8), 1)  # unconditional (labels None) too
    assert x.shape == (2, 1, 8, 8)


def test_bad_options_are_clear_errors():
    net = ExactGaussian(MU, STD)
    with pytest.raises(JumpflowError, match="bootstrap_every"):
        methods.get("shortcut", net, (2,), bootstrap_evry=4)
    with pytest.raises(JumpflowError, match="power of two"):
        methods.get("shortcut", net, (2,), max_resolution=100)
    with pytest.raises(JumpflowError, match="bootstrap_every"):
        methods.get("shortcut", net, (2,), bootstrap_every=0)
    with pytest.raises(JumpflowError, match="clip"):
        methods.get("shortcut", net, (2,), clip=-1.0)
    method = methods.get("shortcut", net, (2,), max_resolution=64)
    noise = torch.randn(2, 2, dtype=torch.float64)
    for steps in (3, 128):
        with pytest.raises(JumpflowError, match="power of two"):
            method.sample(noise, steps)
    with pytest.raises(JumpflowError, match="positive integer"):
        method.sample(noise, 0)
    with pytest.raises(JumpflowError, match="guidance"):
        method.sample(noise, 1, guidance=2.0)
