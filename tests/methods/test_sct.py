import math

import pytest
import torch
from torch import nn

from jumpflow import methods, nets
from jumpflow.errors import JumpflowError
from jumpflow.eval import mode_coverage, sliced_wasserstein
from jumpflow.methods.sct import (HALF_PI, SCT, angle_to_time, consistency_function, consistency_tangent,
                                  normalise_tangent, time_to_angle, trigflow_network, trigflow_scale,
                                  trigflow_velocity)
from tests.gaussian import ExactGaussian
from tests.methods.toy_training import OneStepMap, random_mlp, train_with_trainer

MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4
SIGMA_D = 0.5


class ExactTrigFlow(nn.Module):
    """TrigFlow's F for Gaussian data N(MU, STD^2 I), in the backbone signature net(x / sigma_d, 2 theta / pi, 0).

    Built from the exact flow map in jumpflow time: f*(x_theta, theta) = Phi_{t->0}(x_theta / c(theta)) (same SNR,
    c = cos + sigma_d sin), and F = (cos(theta) x_theta - f*) / (sigma_d sin(theta)) so that sct's consistency
    function is f* exactly. `bias` perturbs it by bias * x_in (a wrong F)."""

    def __init__(self, sigma_data=SIGMA_D, bias=0.0):
        super().__init__()
        self.gaussian, self.sigma_data, self.bias = ExactGaussian(MU, STD), sigma_data, bias

    def forward(self, x_in, t_in, s, cond=None):
        theta = t_in * HALF_PI
        x = self.sigma_data * x_in
        z_t = x / trigflow_scale(theta, self.sigma_data)[:, None]
        t = angle_to_time(theta, self.sigma_data)
        data = self.gaussian.flow_map(z_t, t, torch.zeros_like(t))
        exact = (torch.cos(theta)[:, None] * x - data) / (self.sigma_data * torch.sin(theta))[:, None]
        return exact + self.bias * x_in


def marginal_trigflow_velocity(x, theta, sigma_data=SIGMA_D):
    """The PF-ODE's dx_theta / dtheta at x_theta, converted from the exact jumpflow velocity."""
    gaussian = ExactGaussian(MU, STD)
    z_t = x / trigflow_scale(theta, sigma_data)[:, None]
    t = angle_to_time(theta, sigma_data)
    return trigflow_velocity(z_t, gaussian.velocity(z_t, t), theta, sigma_data)


# --- the identity sCT rests on -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_data", [0.5, 1.4])
def test_the_exact_consistency_function_makes_the_tangent_vanish(sigma_data):
    """g = cos(theta) df/dtheta along the PF-ODE (r = 1, marginal dx/dtheta) is zero for the exact TrigFlow consistency
    function of Gaussian data, with its JVP-rearranged derivative; a perturbed F, or the warm-up r < 1, is not."""
    torch.manual_seed(0)
    theta = torch.rand(64, dtype=torch.float64) * (HALF_PI - 0.02) + 0.01
    x = torch.randn(64, 2, dtype=torch.float64) * sigma_data
    velocity = marginal_trigflow_velocity(x, theta, sigma_data)
    exact = trigflow_network(ExactTrigFlow(sigma_data), sigma_data)
    out, g = consistency_tangent(exact, x, theta, velocity, sigma_data)
    assert g.abs().max() < 1e-9
    assert torch.allclose(out, exact(x, theta))  # the primal output is F itself
    _, wrong = consistency_tangent(trigflow_network(ExactTrigFlow(sigma_data, bias=0.05), sigma_data), x, theta,
                                   velocity, sigma_data)
    assert wrong.flatten(1).norm(dim=1).mean() > 1e-2
    _, warm = consistency_tangent(exact, x, theta, velocity, sigma_data, warmup_ratio=0.5)
    assert warm.flatten(1).norm(dim=1).mean() > 1e-2  # the warm-up changes the fixed point until r = 1


def test_tangent_is_cos_times_the_derivative_of_f_along_the_tangent_for_any_network():
    """g (r = 1) = cos(theta) d/dtheta f(x_theta, theta) along (dx/dtheta, 1), sign included, for a random network:
    the JVP rearrangement (tangents scaled by cos sin) and the assembly of g against a central difference of f."""
    net = random_mlp()
    torch.manual_seed(1)
    theta = torch.rand(32, dtype=torch.float64) * (HALF_PI - 0.2) + 0.1
    x, dx = torch.randn(32, 2, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    _, g = consistency_tangent(trigflow_network(net, SIGMA_D), x, theta, dx, SIGMA_D)
    h = 1e-5
    plus = consistency_function(net, x + h * dx, theta + h, SIGMA_D)
    minus = consistency_function(net, x - h * dx, theta - h, SIGMA_D)
    expected = torch.cos(theta)[:, None] * (plus - minus) / (2 * h)
    assert expected.abs().max() > 0.1
    assert torch.allclose(g, expected, atol=1e-6)


def test_scts_conditional_tangent_is_unbiased():
    """sCT uses dx/dtheta = cos(theta) z - sin(theta) x0 for the pair (x0, z) behind x_theta. g is affine in dx/dtheta,
    so its posterior mean is the exact g (zero for the exact F): check the conditional velocity averages to the
    marginal one over posterior draws of x0 given x_theta (Gaussian posterior, Monte Carlo)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.tensor([0.3, 0.8, 1.3], dtype=torch.float64)
    x_theta = torch.randn(3, 2, generator=g, dtype=torch.float64) * SIGMA_D
    t = angle_to_time(theta, SIGMA_D)[:, None]
    z_t = x_theta / trigflow_scale(theta, SIGMA_D)[:, None]
    # x0 | z_t ~ N(c2 (MU / s^2 + (1 - t) z_t / t^2), c2 I), 1 / c2 = 1 / s^2 + (1 - t)^2 / t^2
    c2 = 1 / (1 / STD ** 2 + (1 - t) ** 2 / t ** 2)
    mean = c2 * (MU / STD ** 2 + (1 - t) * z_t / t ** 2)
    x0 = mean[:, None] + c2.sqrt()[:, None] * torch.randn(3, 200_000, 2, generator=g, dtype=torch.float64)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    z = (x_theta[:, None] - cos * x0) / sin  # the noise that, with x0, gives x_theta
    conditional = (cos * z - sin * x0).mean(1)
    assert torch.allclose(conditional, marginal_trigflow_velocity(x_theta, theta), atol=0.01)


def test_boundary_condition_holds_exactly_for_any_network():
    net = random_mlp()
    x = torch.randn(64, 2, dtype=torch.float64)
    zero = torch.zeros(64, dtype=torch.float64)
    assert torch.equal(consistency_function(net, x, zero, SIGMA_D), x)  # f(x, 0) = x
    assert (consistency_function(net, x, zero + 0.5, SIGMA_D) - x).abs().max() > 0.1  # the net acts elsewhere


def test_jumpflow_and_trigflow_times_and_points_convert_by_equal_snr():
    t = torch.tensor([0.0, 1e-3, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    for sigma_data in (0.5, 1.0, 1.4):
        theta = time_to_angle(t, sigma_data)
        assert theta[0] == 0 and math.isclose(theta[-1].item(), HALF_PI)  # data <-> data, noise <-> noise
        assert torch.allclose(angle_to_time(theta, sigma_data), t)
        inner = theta[1:-1]
        assert torch.allclose(sigma_data * torch.tan(inner), t[1:-1] / (1 - t[1:-1]))  # EDM's sigma on both sides
        # The same (x, eps) lands on the same point up to scale: x_theta = (cos + sigma_d sin) z_t, z = sigma_d eps.
        x, eps = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        x_theta = torch.cos(theta)[:, None] * x + torch.sin(theta)[:, None] * sigma_data * eps
        z_t = (1 - t)[:, None] * x + t[:, None] * eps
        assert torch.allclose(x_theta, trigflow_scale(theta, sigma_data)[:, None] * z_t)
        # ... and the conditional velocities agree: eps - x converts to cos(theta) z - sin(theta) x0.
        converted = trigflow_velocity(z_t, eps - x, theta, sigma_data)
        assert torch.allclose(converted, torch.cos(theta)[:, None] * sigma_data * eps - torch.sin(theta)[:, None] * x)


def test_training_angles_follow_the_lognormal_sigma():
    method = methods.get("sct", random_mlp(), (2,))
    torch.manual_seed(0)
    theta, sigma = method.sample_angles(100_000, "cpu")
    assert (theta > 0).all() and (theta < HALF_PI).all()
    assert torch.allclose(SIGMA_D * torch.tan(theta.double()), sigma.double(), rtol=1e-4)
    assert abs(sigma.log().mean().item() + 1.0) < 0.02 and abs(sigma.log().std().item() - 1.4) < 0.02


def test_tangent_normalisation():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(normalise_tangent(g, 0.1), torch.tensor([[3 / 5.1, 4 / 5.1], [0.0, 0.0]]))
    rms = 5 / math.sqrt(2)
    assert torch.allclose(normalise_tangent(g, 0.1, "rms"), torch.tensor([[3 / (rms + 0.1), 4 / (rms + 0.1)], [0, 0]]))


# --- sampling ------------------------------------------------------------------------------------------------------
def test_sampling_with_the_exact_consistency_function_gives_the_data_distribution():
    method = methods.get("sct", ExactTrigFlow(), (2,))
    assert method.nfe(1) == 1 and method.nfe(2) == 2 and method.bench_steps == (1, 2)
    assert method.default_sample_steps == 1
    noise = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(method.sample(noise, 1), MU + STD * noise)  # f(sigma_d eps, pi/2) = Phi_{1->0}(eps)
    assert torch.allclose(method.sampling_angles(2), torch.tensor([HALF_PI, 1.1], dtype=torch.float64))
    for steps, angles in ((2, None), (3, None), (2, [HALF_PI, 0.5])):
        torch.manual_seed(1)
        x = method.sample(noise, steps, angles=angles)
        assert (x.mean(0) - MU).abs().max() < 0.02 and (x.std(0) - STD).abs().max() < 0.02
    for steps in (1, 3, 4, 8):
        angles = method.sampling_angles(steps)
        assert angles.numel() == steps and angles[0] == HALF_PI and (angles.diff() < 0).all() and angles[-1] > 0
    uniform = methods.get("sct", ExactTrigFlow(), (2,), mid_angle=math.pi / 4).sampling_angles(4)
    assert torch.allclose(uniform, torch.tensor([4, 3, 2, 1], dtype=torch.float64) * math.pi / 8)


# --- the method's own parameters and state ---------------------------------------------------------------------
def test_adaptive_weight_and_step_counter_are_trained_and_saved_with_the_method():
    net = nets.build("mlp", (2,), width=16, depth=1)
    method = methods.get("sct", net, (2,), tangent_warmup_steps=4)
    params = method.trainable_parameters()
    assert len(params) == len(list(net.parameters())) + len(list(method.adaptive_weight.parameters()))
    assert any(k.startswith("adaptive_weight.") for k in method.state_dict()) and "training_step" in method.state_dict()
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    out = method.loss(x, None)
    out.loss.backward()
    assert method.adaptive_weight.out.bias.grad.abs() > 0  # w_phi gets a gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    for _ in range(5):
        out = method.loss(x, None)
    assert int(method.training_step) == 6 and float(out.metrics["warmup"]) == 1.0  # r = min(1, 5 / 4)
    method.eval()
    method.loss(x, None)  # evaluation does not advance the warm-up
    assert int(method.training_step) == 6
    restored = methods.get("sct", nets.build("mlp", (2,), width=16, depth=1), (2,), tangent_warmup_steps=4)
    restored.load_state_dict(method.state_dict())
    assert int(restored.training_step) == 6
    plain = methods.get("sct", nets.build("mlp", (2,), width=16, depth=1), (2,), adaptive_weighting=False)
    assert plain.adaptive_weight is None and len(plain.trainable_parameters()) == len(list(plain.net.parameters()))
    assert torch.isfinite(plain.loss(x, None).loss)


def test_sigma_data_is_measured_once_on_training_data_and_saved():
    method = methods.get("sct", nets.build("mlp", (2,), width=16, depth=1), (2,))
    assert method.sigma_d == 0.5  # nothing measured yet: the paper's value
    torch.manual_seed(0)
    method.loss(3.0 * torch.randn(4096, 2), None)
    assert abs(method.sigma_d - 3.0) < 0.1
    method.loss(torch.randn(64, 2), None)  # measured once: later batches do not move it
    assert abs(method.sigma_d - 3.0) < 0.1
    restored = methods.get("sct", nets.build("mlp", (2,), width=16, depth=1), (2,))
    restored.load_state_dict(method.state_dict())
    assert restored.sigma_d == method.sigma_d
    fixed = methods.get("sct", nets.build("mlp", (2,), width=16, depth=1), (2,), sigma_data=0.7)
    fixed.loss(3.0 * torch.randn(64, 2), None)
    assert fixed.sigma_d == 0.7


def test_tangent_warmup_defaults_to_the_paper_or_a_tenth_of_a_short_run():
    method = methods.get("sct", nets.build("mlp", (2,), width=16, depth=1), (2,))
    method.training_step.fill_(5000)
    assert float(method.warmup_ratio()) == 0.5  # outside a Trainer: the paper's 10k
    method.plan(2000)
    assert float(method.warmup_ratio()) == 1.0
    method.training_step.fill_(100)
    assert float(method.warmup_ratio()) == 0.5  # a tenth of 2000 steps
    method.plan(10**6)
    assert float(method.warmup_ratio()) == pytest.approx(0.01)  # long runs: 10k


def test_self_check_passes_on_the_mlp():
    method = methods.get("sct", nets.build("mlp", (2,), width=16, depth=1), (2,))
    torch.manual_seed(0)
    report = method.self_check(torch.randn(32, 2), None)
    assert report["ok"] == 1.0 and report["jvp_norm"] > 0


# --- real backbones ------------------------------------------------------------------------------------------------
def test_unet_loss_and_sampling_with_labels():
    torch.manual_seed(0)
    net = nets.build("unet", (1, 8, 8), num_classes=3, channels=8, channel_mult=[1, 2])
    method = methods.get("sct", net, (1, 8, 8), num_classes=3, class_dropout=0.2, tangent_norm="rms")
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    out = method.loss(x, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    method.eval()
    for steps in (1, 2, 3):
        assert method.sample(torch.randn(4, 1, 8, 8), steps, labels=labels).shape == (4, 1, 8, 8)
    assert method.sample(torch.randn(2, 1, 8, 8), 1).shape == (2, 1, 8, 8)  # labels=None: the null label


def test_training_learns_a_one_step_map_far_better_than_one_step_flow_matching(tmp_path, trainer_flow_matching):
    target = OneStepMap.seeded(n_steps=None)  # the exact map to flow_map's default precision
    mixture, noise = target.mixture, target.noise
    flow, _ = trainer_flow_matching
    fm_error = target.relative_error(flow.generate(noise=noise, steps=1))
    assert fm_error > 0.8  # 1-step flow matching: about the data mean
    model, losses = train_with_trainer("sct", tmp_path / "sct")  # warm-up: a tenth of the run; sigma_d: measured
    assert abs(model.method.sigma_d - 1.42) < 0.1  # 8 gaussians' per-coordinate std, sqrt(2 + 0.15^2)
    assert sum(losses[-20:]) < 0.8 * sum(losses[:20])  # measured 2.44 -> 1.03 (w_phi's share included)
    x = model.generate(noise=noise, steps=1)
    error = target.relative_error(x)
    assert error < 0.35 and error < 0.5 * fm_error  # measured 0.16 (fm: 0.91)
    assert mode_coverage(x, mixture) == 1.0
    assert sliced_wasserstein(x, mixture.draw(500, torch.Generator().manual_seed(2))) < 0.5
    torch.manual_seed(0)
    two = model.generate(noise=noise, steps=2)
    assert sliced_wasserstein(two, mixture.draw(500, torch.Generator().manual_seed(2))) < 0.5
    # w_phi was trained (it starts at 0) and came back with the checkpoint.
    assert model.method.adaptive_weight.out.weight.abs().sum() > 0


# --- errors --------------------------------------------------------------------------------------------------------
def test_bad_options_are_clear_errors():
    net = random_mlp()
    with pytest.raises(JumpflowError, match="sigma_data"):
        methods.get("sct", net, (2,), sigma_data=-0.5)
    with pytest.raises(JumpflowError, match="sigma_d"):
        methods.get("sct", net, (2,), sigma_d=0.5)  # unknown name, with the valid ones listed
    with pytest.raises(JumpflowError, match="tangent_norm"):
        methods.get("sct", net, (2,), tangent_norm="l1")
    for warmup in (-1, 2.5):
        with pytest.raises(JumpflowError, match="tangent_warmup_steps"):
            methods.get("sct", net, (2,), tangent_warmup_steps=warmup)
    with pytest.raises(JumpflowError, match="mid_angle"):
        methods.get("sct", net, (2,), mid_angle=2.0)
    with pytest.raises(JumpflowError, match="class_dropout"):
        methods.get("sct", net, (2,), class_dropout=1.0)
    with pytest.raises(JumpflowError, match="jvp_mode"):
        methods.get("sct", net, (2,), jvp_mode="forward")
    with pytest.raises(JumpflowError, match="time_std"):
        methods.get("sct", net, (2,), time_std=0.0)
    method = methods.get("sct", net, (2,))
    noise = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(JumpflowError, match="positive integer"):
        method.sample(noise, 0)
    for angles in ([1.0], [0.5, 1.0], [HALF_PI, 0.0], [2.0, 0.5]):
        with pytest.raises(JumpflowError, match="strictly decreasing"):
            method.sample(noise, 2, angles=angles)


def test_registered_with_its_paper():
    assert methods.METHODS["sct"] is SCT
    assert "2410.11081" in SCT.paper and SCT.kind == "from_scratch"
