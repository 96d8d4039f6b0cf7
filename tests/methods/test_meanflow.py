import pytest
import torch

from jumpflow import methods
from jumpflow.errors import JumpflowError
from jumpflow.methods.meanflow import meanflow_target
from tests.gaussian import ExactGaussian

MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4


def test_target_equals_the_exact_average_velocity_at_the_fixed_point():
    """MeanFlow identity (METHODS.md §1.3.1): with u the exact average velocity and v the marginal velocity, the
    training target v - (t - r) du/dt is u itself."""
    exact = ExactGaussian(MU, STD)
    torch.manual_seed(0)
    t = torch.rand(64, dtype=torch.float64) * 0.98 + 0.01
    r = t * torch.rand(64, dtype=torch.float64)
    z = torch.randn(64, 2, dtype=torch.float64)
    v = exact.velocity(z, t)
    u, target = meanflow_target(lambda z_, t_, r_: exact(z_, t_, r_), z, t, r, v)
    assert torch.allclose(target, u, atol=1e-9)
    # A wrong average velocity (the instantaneous one) is not a fixed point.
    _, wrong = meanflow_target(lambda z_, t_, r_: exact.velocity(z_, t_), z, t, r, v)
    assert (wrong - exact.velocity(z, t)).abs().max() > 1e-2


def test_target_reduces_to_the_velocity_when_r_equals_t():
    exact = ExactGaussian(MU, STD)
    t = torch.rand(16, dtype=torch.float64)
    z, v = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    _, target = meanflow_target(lambda z_, t_, r_: exact(z_, t_, r_), z, t, t.clone(), v)
    assert torch.allclose(target, v)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampling_with_the_exact_average_velocity_lands_on_the_exact_flow_map(steps):
    exact = ExactGaussian(MU, STD)
    method = methods.get("meanflow", exact, (2,))
    noise = torch.randn(256, 2, dtype=torch.float64)
    x = method.sample(noise, steps)
    assert torch.allclose(x, MU + STD * noise, atol=1e-9)  # Phi_{1->0}(eps) = mu + s eps


def test_time_pairs_are_ordered_and_the_flow_matching_share_is_respected():
    torch.manual_seed(0)
    method = methods.get("meanflow", ExactGaussian(MU, STD), (2,), flow_matching_share=0.75)
    t, r = method.sample_time_pair(20000, "cpu")
    assert (r <= t).all() and (t <= 1).all() and (r >= 0).all()
    assert abs((r == t).float().mean().item() - 0.75) < 0.02


def test_loss_is_finite_and_backpropagates_on_a_real_backbone():
    from jumpflow import nets

    torch.manual_seed(0)
    method = methods.get("meanflow", nets.build("mlp", (2,)), (2,))
    out = method.loss(torch.randn(32, 2), None)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.net.parameters())


def test_unknown_option_and_bad_steps_are_clear_errors():
    with pytest.raises(JumpflowError, match="adaptive_power"):
        methods.get("meanflow", ExactGaussian(MU, STD), (2,), adaptive_pwr=1.0)
    method = methods.get("meanflow", ExactGaussian(MU, STD), (2,))
    with pytest.raises(JumpflowError, match="positive integer"):
        method.sample(torch.randn(2, 2, dtype=torch.float64), 0)


def test_independent_time_pairs_put_r_near_zero_and_keep_r_below_t():
    torch.manual_seed(0)
    method = methods.get("meanflow", ExactGaussian(MU, STD), (2,), time_pair="independent", time_mean=-0.6,
                         time_std=1.6, flow_matching_share=0.0)
    t, r = method.sample_time_pair(20000, "cpu")
    assert (r <= t).all()
    corner = ((t > 0.9) & (r < 0.1)).float().mean()  # the pairs that train the 1-step jump (t ~ 1, r ~ 0)
    assert r.median() < 0.05 and corner > 0.02
    t, r = methods.get("meanflow", ExactGaussian(MU, STD), (2,), flow_matching_share=0.0).sample_time_pair(20000, "cpu")
    assert ((t > 0.9) & (r < 0.1)).float().mean() < 0.002  # the paper's sorted pairs almost never reach it
    bad = methods.get("meanflow", ExactGaussian(MU, STD), (2,), time_pair="shuffled")
    with pytest.raises(JumpflowError, match="independent"):
        bad.sample_time_pair(4, "cpu")
