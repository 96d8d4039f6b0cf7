import pytest
import torch
from torch import nn

from jumpflow import methods
from jumpflow.data.toys import gmm1d
from jumpflow.errors import JumpflowError
from tests.gaussian import ExactVelocity



@pytest.fixture(scope="module")
def mixture():
    return gmm1d()


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_100_step_sampler_reproduces_the_mixture_under_its_exact_density(mixture, solver):
    method = methods.get("flow_matching", ExactVelocity(mixture), (1,), solver=solver)
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = method.sample(noise, 100)
    real = mixture.draw(4000, torch.Generator().manual_seed(1)).double()
    ll, ll_real = mixture.log_prob(x).mean().item(), mixture.log_prob(real).mean().item()
    assert abs(ll - ll_real) < 0.1  # mean log-likelihood matches that of real samples
    share_right = (x > 0).double().mean().item()
    assert abs(share_right - 0.5) < 0.03  # both modes kept with their weights
    # and the samples sit on the exact flow map of their noise (the ODE is solved, not just the law matched)
    exact = mixture.flow_map(noise, 1.0, 0.0)
    tolerance = 0.05 if solver == "euler" else 0.01
    assert (x - exact).abs().mean().item() < tolerance


def test_one_euler_step_collapses_toward_the_data_mean(mixture):
    """The failure mode one-step methods beat: 1-step Euler from t=1 gives eps - v(eps, 1) = E[x] exactly."""
    method = methods.get("flow_matching", ExactVelocity(mixture), (1,))
    noise = torch.randn(2000, 1, dtype=torch.float64)
    x = method.sample(noise, 1)
    assert x.abs().max().item() < 1e-6  # E[x] = 0 for the symmetric mixture


def test_nfe_counts_heun_evaluations(mixture):
    assert methods.get("flow_matching", ExactVelocity(mixture), (1,)).nfe(10) == 10
    assert methods.get("flow_matching", ExactVelocity(mixture), (1,), solver="heun").nfe(10) == 20


def test_loss_targets_the_conditional_velocity():
    """A zero net has loss E|eps - x|^2 / D (the loss is a per-coordinate mean)."""
    torch.manual_seed(0)
    class Zero(nn.Module):
        def forward(self, z, t, s, cond=None):
            return torch.zeros_like(z)

    zero = methods.get("flow_matching", Zero(), (2,))
    x = torch.randn(4096, 2) * 0.1 + 3.0
    assert abs(zero.loss(x, None).loss.item() - (1 + 9 + 0.01)) < 0.3  # per coordinate: Var eps + mean^2 + Var x


def test_guidance_mixes_conditional_and_unconditional_velocities():
    class ByLabel(nn.Module):
        def forward(self, z, t, s, cond=None):
            return torch.ones_like(z) * cond[:, None].float()

    method = methods.get("flow_matching", ByLabel(), (2,), num_classes=3)
    labels = torch.tensor([1, 1])
    v = method.velocity(method.net, torch.zeros(2, 2), torch.ones(2), labels, guidance=2.0)
    assert torch.allclose(v, torch.full((2, 2), 3 + 2.0 * (1 - 3)))  # v_u + w (v_c - v_u), null label = 3


def test_unknown_solver_is_refused(mixture):
    method = methods.get("flow_matching", ExactVelocity(mixture), (1,))
    with pytest.raises(JumpflowError, match="heun"):
        method.sample(torch.randn(2, 1), 2, solver="rk45")
