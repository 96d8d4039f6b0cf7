"""SIM against the exact Gaussian teacher (its gradient is the score divergence's, its squared distance is SiD at
alpha = 1), and the whole `jumpflow distill` path on a trained one. Fixtures and helpers are test_sid's."""

import math

import pytest
import torch

from jumpflow import methods
from jumpflow.errors import JumpflowError
from tests.distill.test_sid import (MU, STD, affine_method, check_distill_end_to_end, divergence_gradient,
                                    generator_gradient, train_by_hand)
from tests.gaussian import ExactGaussian
from tests.methods.toy_training import toy_net

NAME = "sim"
WRONG_M, WRONG_A = MU + torch.tensor([0.4, -0.2], dtype=torch.float64), 0.6  # a shifted, too wide generator


def pseudo_huber(c):
    return lambda y: (y.pow(2).sum(1) + c * c).sqrt() - c


@pytest.mark.parametrize("distance", ["pseudo_huber", "l2"])
def test_the_exact_generator_with_the_exact_fake_score_is_a_fixed_point(distance):
    method = affine_method(NAME, MU, STD, distance=distance)
    torch.manual_seed(0)
    method.loss(torch.zeros(512, 2, dtype=torch.float64), None).loss.backward()
    assert method.net.m.grad.abs().max() < 1e-12 and method.net.a.grad.abs() < 1e-12
    method.fake_net = ExactGaussian(MU, 2 * STD)  # a fake score that is not the generator's breaks it
    method.zero_grad()
    method.loss(torch.zeros(512, 2, dtype=torch.float64), None).loss.backward()
    assert method.net.a.grad.abs() > 0.05


@pytest.mark.parametrize("options, distance", [
    ({}, pseudo_huber(0.1 * math.sqrt(2))), ({"huber_c": 1.0}, pseudo_huber(math.sqrt(2))),
    ({"distance": "l2"}, lambda y: y.pow(2).sum(1))])
def test_the_gradient_is_the_score_divergences(options, distance):
    """The score-gradient theorem, checked: with the exact fake score, grad L_SIM = grad_theta E d(f_theta - f_phi)
    over samples held fixed (the sampling distribution's stop-gradient), by autograd through the generator's own
    exact denoiser. A flipped sign or a missing derivative of d'(y) through z_t fails it."""
    ours = generator_gradient(affine_method(NAME, WRONG_M, WRONG_A, **options), 100_000)
    exact = divergence_gradient(affine_method(NAME, WRONG_M, WRONG_A, **options), 100_000, distance,
                                through_samples=False)
    assert exact.norm() > 0.05 and (ours - exact).norm() < 0.01 * exact.norm(), (ours, exact)  # measured < 1e-3


def test_the_squared_distance_is_sid_at_alpha_one():
    """d = |y|^2 gives L = 2 Delta . (f_psi - x_g) = 2 x SiD's (f_phi - f_psi) . [(f_phi - x_g) - (f_phi - f_psi)]."""
    losses, grads = [], []
    for name, options in (("sim", {"distance": "l2"}), ("sid", {"alpha": 1.0})):
        method = affine_method(name, WRONG_M, WRONG_A, **options)
        torch.manual_seed(0)
        loss = method.loss(torch.zeros(256, 2, dtype=torch.float64), None).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([method.net.m.grad, method.net.a.grad[None]]))
    assert losses[1].abs() > 1e-3 and torch.allclose(losses[0], 2 * losses[1], rtol=1e-12, atol=0)
    assert torch.allclose(grads[0], 2 * grads[1], rtol=1e-10, atol=0)


def test_hand_loop_moves_the_samples_moments_to_the_data():
    """As test_sid's: the toy fake score starts from scratch, so it gets a two-time-scale head start."""
    (mean_before, cov_before), (mean_after, cov_after) = train_by_hand(NAME, 200, fake_updates=3, fake_lr_scale=2.0)
    assert mean_before > 1.7 and cov_before > 0.55  # N(0, t_init^2 I) against N(MU, 0.09 I)
    assert mean_after < 0.25 * mean_before, mean_after  # measured 0.08 (from 1.80)
    assert cov_after < 0.5 * cov_before, cov_after  # measured 0.04 (from 0.57)


def test_shares_sids_generator_and_hooks():
    method = methods.get(NAME, toy_net(), (2,))
    assert method.generator_time == pytest.approx(2.5 / 3.5) and tuple(method.updates(0)) == ("fake", "net")
    with pytest.raises(JumpflowError, match="one step"):
        method.sample(torch.zeros(8, 2), 2)
    with pytest.raises(JumpflowError, match="jumpflow distill"):
        method.loss(torch.zeros(8, 2), None)


@pytest.mark.parametrize("options, match", [
    ({"distance": "l1"}, "distance"), ({"huber_c": 0.0}, "huber_c"), ({"huber_c": math.inf}, "huber_c"),
    ({"fake_updates": 0}, "fake_updates"), ({"sigma_init": -1.0}, "sigma_init"), ({"alpha": 1.2}, "unknown option")])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get(NAME, toy_net(), (2,), **options)


def test_distill_end_to_end_starts_from_the_teacher_and_resumes_exactly(teacher_run, tmp_path):
    check_distill_end_to_end(teacher_run, tmp_path, NAME, {})
