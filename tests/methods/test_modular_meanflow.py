import pytest
import torch
from torch import nn

import jumpflow.methods.modular_meanflow  # noqa: F401  (registers "modular_meanflow")
from jumpflow import methods, nets
from jumpflow.errors import JumpflowError
from jumpflow.methods.modular_meanflow import modular_meanflow_residual
from tests.gaussian import ExactGaussian, ExactVelocity
from tests.methods.toy_training import OneStepMap, train_toy

MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4
LAMBDAS = (0.0, 0.5, 1.0)


def small_mlp(num_classes=0, width=32, depth=2, seed=0, dtype=torch.float32):
    """A jumpflow MLP whose zero output layer is re-drawn (a zero layer would hide the JVP's gradient)."""
    torch.manual_seed(seed)
    net = nets.build("mlp", (2,), num_classes=num_classes, width=width, depth=depth).to(dtype)
    with torch.no_grad():
        net.out.weight.normal_(0.0, 0.3)
        net.out.bias.normal_(0.0, 0.3)
    return net


def gradients(method, x, labels=None, seed=1):
    """Parameter gradients of one loss evaluation with the method's random draws fixed by `seed`."""
    method.net.zero_grad()
    torch.manual_seed(seed)
    out = method.loss(x, labels)
    out.loss.backward()
    return out, [p.grad.clone() for p in method.net.parameters()]


def fixed(modulation, **options):
    """Options for a fixed lambda (no curriculum), with the JVP along eps - x (the loss as the paper's summaries
    write it, whose algebra these tests check) unless `jvp_tangent` says otherwise."""
    return dict(dict(modulation=modulation, modulation_warmup_steps=0, jvp_tangent="conditional"), **options)


# --- the identity and its fixed point -------------------------------------------------------------------------------
def test_exact_average_velocity_zeroes_the_residual_for_every_lambda():
    """MeanFlow identity (METHODS.md §1.3.1): u + (t - r) du/dt - v = 0 for the exact u of a Gaussian and the marginal
    v, whatever share lambda of the gradient goes through du/dt (SG_lambda changes gradients, never values)."""
    exact = ExactGaussian(MU, STD)
    gen = torch.Generator().manual_seed(0)
    t = 0.01 + 0.98 * torch.rand(64, generator=gen, dtype=torch.float64)
    r = t * torch.rand(64, generator=gen, dtype=torch.float64)
    r[:16] = t[:16]  # r = t rows: the residual is u(z, t, t) - v
    z = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    v = exact.velocity(z, t)
    for lam in (0.0, torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)):
        u, residual = modular_meanflow_residual(exact, z, t, r, v, lam)
        assert torch.allclose(u, exact(z, t, r)) and residual.abs().max() < 1e-9
    # The instantaneous velocity in place of u is not a zero, and its residual is the same for every lambda.
    wrong = [modular_meanflow_residual(lambda z_, t_, r_: exact.velocity(z_, t_), z, t, r, v, lam)[1]
             for lam in (0.0, torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))]
    assert wrong[0].abs().max() > 1e-2 and torch.equal(wrong[0], wrong[1]) and torch.equal(wrong[0], wrong[2])


@pytest.mark.parametrize("lam", LAMBDAS)
def test_point_mass_data_gives_zero_loss_for_the_exact_average_velocity(lam):
    """For a point mass the conditional velocity eps - x is the marginal one: the whole loss (with its JVP, time
    pairs and adaptive weight) vanishes for the exact u at every lambda."""
    method = methods.get("modular_meanflow", ExactGaussian(MU, 0.0), (2,), **fixed(lam))
    torch.manual_seed(0)
    out = method.loss(MU.expand(512, 2).clone(), None)
    assert out.metrics["mse"].item() < 1e-14 and out.loss.item() < 1e-11  # round-off of (z - Phi) / (t - r)


class PerturbedGaussian(nn.Module):
    """u_theta = exact Gaussian average velocity + theta sin(z + t): one parameter, exact at theta = 0."""

    def __init__(self):
        super().__init__()
        self.exact = ExactGaussian(MU, STD)
        self.theta = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, z, t, r, cond=None):
        return self.exact(z, t, r) + self.theta * torch.sin(z + t[:, None])


def test_exact_u_is_stationary_at_lambda_zero_and_biased_by_the_velocity_noise_at_lambda_positive():
    """Training sees the noisy conditional velocity v_c = eps - x, both as the target and as the JVP tangent. At the
    exact u the residual is res = a + B v_c with B = (t - r) grad_z u - I = -dPhi_{t->r}/dz, and E[res | z_t] = 0.

    lambda = 0 (MeanFlow): the gradient 2 E[res . g] vanishes, the exact u is stationary. lambda > 0 adds
    2 lambda (t - r) E[res . grad_z g v_c], which keeps the covariance term 2 lambda (t - r) tr(B^T grad_z g Cov(v_c |
    z_t)): the gradient of the noise variance E|B (v_c - v)|^2, which shrinks the flow map's Jacobian. For
    x ~ N(mu, s^2 I): Cov(v_c | z_t) = s^2 / sigma_t^2 I and B = -(sigma_r / sigma_t) I. The measured gradient
    (plain L2, 100k samples) matches this prediction; with a point mass (no noise) the loss is 0 (test above)."""
    n = 100_000
    x = MU + STD * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    measured = {}
    for lam in LAMBDAS:
        net = PerturbedGaussian()
        method = methods.get("modular_meanflow", net, (2,), **fixed(lam, adaptive_power=0.0, flow_matching_share=0.0))
        torch.manual_seed(1)
        method.loss(x, None).loss.backward()
        measured[lam] = net.theta.grad.item()
    torch.manual_seed(1)
    z, t, r, _ = method.training_point(x)  # replay the draws
    t, r = t.double(), r.double()
    exact = ExactGaussian(MU, STD)
    sigma_t, sigma_r = exact.sigma(t), exact.sigma(r)
    grad_g_trace = torch.cos(z + t[:, None]).sum(1)  # tr(B^T grad_z g) / (-sigma_r / sigma_t)
    bias = (2 * (t - r) * (-sigma_r / sigma_t) * grad_g_trace * STD ** 2 / sigma_t ** 2).mean().item()
    assert abs(measured[0.0]) < 0.01, measured  # MC standard error ~ 1e-3
    assert abs(bias) > 0.05
    for lam in (0.5, 1.0):
        assert measured[lam] == pytest.approx(lam * bias, rel=0.05), (measured, bias)


# --- gradients -------------------------------------------------------------------------------------------------------
def test_the_model_tangent_keeps_the_exact_u_stationary_for_every_lambda():
    """jvp_tangent="model" takes du/dt along sg(u_theta(z_t, t, t)), a function of z_t alone: the derivative of du/dt
    with respect to theta is then fixed given z_t and the residual's zero conditional mean cancels the whole gradient
    at the exact u, for every lambda. The same draws as the test above, whose lambda = 1 gradient is far from 0."""
    n = 100_000
    x = MU + STD * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    for tangent in ("conditional", "model"):
        net = PerturbedGaussian()
        method = methods.get("modular_meanflow", net, (2,), **fixed(1.0, adaptive_power=0.0, flow_matching_share=0.0,
                                                                     jvp_tangent=tangent))
        torch.manual_seed(1)
        method.loss(x, None).loss.backward()
        grads[tangent] = net.theta.grad.item()
    assert abs(grads["conditional"]) > 0.1 and abs(grads["model"]) < 0.01, grads  # MC standard error ~ 1e-3


def test_lambda_zero_reproduces_meanflow_gradients_exactly():
    """MeanFlow regresses u on sg(v - (t - r) du/dt); the v-form u + (t - r) sg(du/dt) - v with full stop-gradient
    has the same value and gradient. Same seed, same batch, same options: every parameter gradient is equal, and so
    is the curriculum's first step (lambda(0) = 0)."""
    x, labels = torch.randn(64, 2), torch.randint(0, 3, (64,))
    options = dict(time_pair="independent", flow_matching_share=0.5, adaptive_power=0.75, class_dropout=0.2)
    net = small_mlp(num_classes=3)
    reference = methods.get("meanflow", net, (2,), num_classes=3, **options)
    out_mf, grads_mf = gradients(reference, x, labels)
    for config in (fixed(0.0), dict(modulation=1.0, modulation_warmup_steps=100, jvp_tangent="conditional")):
        method = methods.get("modular_meanflow", net, (2,), num_classes=3, **options, **config)
        out, grads = gradients(method, x, labels)
        assert torch.equal(out.loss, out_mf.loss)
        assert all(torch.equal(g, g_mf) for g, g_mf in zip(grads, grads_mf))


def test_lambda_one_gradient_matches_finite_differences_and_differs_from_meanflow():
    """lambda = 1 back-propagates through the JVP: on a float64 MLP with plain L2 the gradient is that of the full
    loss ||u + (t - r) du/dt - v||^2, checked by a central difference in the weights; lambda = 0 (MeanFlow) differs
    and lambda = 0.5 sits exactly halfway (SG_lambda scales the JVP's share of the gradient linearly)."""
    net = small_mlp(width=16, depth=1, dtype=torch.float64)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    for lam in LAMBDAS:
        method = methods.get("modular_meanflow", net, (2,), **fixed(lam, adaptive_power=0.0, flow_matching_share=0.25))
        grads[lam] = gradients(method, x)[1]
    method = methods.get("modular_meanflow", net, (2,), **fixed(1.0, adaptive_power=0.0, flow_matching_share=0.25))
    params = list(net.parameters())
    directions = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype)
                  for i, p in enumerate(params)]

    def loss_at(step):
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(step * d)
            torch.manual_seed(1)
            value = method.loss(x, None).loss.item()
            for p, d in zip(params, directions):
                p.sub_(step * d)
        return value

    h = 1e-5
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    analytic = sum((g * d).sum() for g, d in zip(grads[1.0], directions)).item()
    assert analytic == pytest.approx(numeric, rel=1e-6)
    flat = {lam: torch.cat([g.flatten() for g in grads[lam]]) for lam in LAMBDAS}
    assert (flat[1.0] - flat[0.0]).norm() > 0.1 * flat[1.0].norm()
    assert torch.allclose(flat[0.5], (flat[0.0] + flat[1.0]) / 2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tangent", ["conditional", "model"])
def test_lambda_one_gradient_matches_autograd_through_a_double_backward_jvp(tangent):
    """With MeanFlow's adaptive weight (p = 1, a stop-gradient weight: no finite difference of the loss applies),
    against an independent reference: du/dt from torch.autograd.functional.jvp (the double-backward trick) with
    create_graph=True, on the same draws, along eps - x or along the detached model velocity u(z, t, t)."""
    net = small_mlp(width=16, depth=1, dtype=torch.float64)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    method = methods.get("modular_meanflow", net, (2,), **fixed(1.0, jvp_tangent=tangent))
    _, grads = gradients(method, x, seed=1)

    torch.manual_seed(1)
    z, t, r, v = method.training_point(x)  # the loss's draws, replayed (float32 times, as the loss uses them)
    dz = v if tangent == "conditional" else net(z, t, t).detach()
    u, du_dt = torch.autograd.functional.jvp(lambda z_, t_, r_: net(z_, t_, r_), (z, t, r),
                                             (dz, torch.ones_like(t), torch.zeros_like(r)), create_graph=True)
    delta = (u + (t - r)[:, None] * du_dt - v).pow(2).sum(1)
    loss = (delta / (delta.detach() + 0.01)).mean()
    reference = torch.autograd.grad(loss, list(net.parameters()))
    for g, g_ref in zip(grads, reference):
        assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)


# --- curriculum ------------------------------------------------------------------------------------------------------
def test_curriculum_warms_lambda_linearly_then_holds_it():
    """lambda(k) = modulation * min(1, k / T_warm): 0, 1/2, 1, 1 at k = 0, T/2, T, 2T; counted by training losses only,
    in a buffer that checkpoints carry."""
    method = methods.get("modular_meanflow", small_mlp(), (2,), modulation_warmup_steps=100)
    values = []
    for k in (0, 50, 100, 200):
        method.training_step.fill_(k)
        values.append(float(method.modulation()))
    assert values == [0.0, 0.5, 1.0, 1.0]
    assert "training_step" in method.state_dict()
    method.training_step.zero_()
    method.loss(torch.randn(8, 2), None)
    method.eval()
    out = method.loss(torch.randn(8, 2), None)
    assert int(method.training_step) == 1 and out.metrics["modulation"].item() == pytest.approx(0.01)
    half = methods.get("modular_meanflow", small_mlp(), (2,), modulation=0.5, modulation_warmup_steps=100)
    half.training_step.fill_(50)
    assert float(half.modulation()) == 0.25  # the curriculum rises to `modulation`
    assert float(methods.get("modular_meanflow", small_mlp(), (2,), **fixed(0.7)).modulation()) == pytest.approx(0.7)
    assert methods.get("modular_meanflow", small_mlp(), (2,), **fixed(0.0)).modulation() == 0.0  # no graph


# --- sampling and training -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampling_with_the_exact_average_velocity_lands_on_the_exact_flow_map(steps):
    """MeanFlow's sampler (inherited); its time grid is float32, hence the tolerance."""
    method = methods.get("modular_meanflow", ExactGaussian(MU, STD), (2,))
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(method.sample(noise, steps), MU + STD * noise, atol=1e-6)  # Phi_{1->0}(eps) = mu + s eps


def boundary_mse(net, x):
    """The r = t rows' loss, u_theta(z_t, t, t) vs eps - x (flow matching), on fixed draws: what the identity is
    anchored on. (The total MSE need not fall: the (t - r) du/dt part grows as the map learns to bend.)"""
    method = methods.get("modular_meanflow", net, (2,), flow_matching_share=1.0).eval()
    torch.manual_seed(5)
    return method.loss(x, None).metrics["mse"].item()


def test_training_learns_a_one_step_map_that_flow_matching_at_one_step_does_not(toy_flow_matching):
    """Through the curriculum into lambda = 1 (T_warm = 100 of 300 steps)."""
    target = OneStepMap.seeded()
    x_eval = target.mixture.draw(2000, torch.Generator().manual_seed(2))
    floor = boundary_mse(ExactVelocity(target.mixture), x_eval)  # E Var(eps - x | z_t): no velocity does better
    run = train_toy("modular_meanflow", steps=300, metric="mse", modulation_warmup_steps=100)  # the EMA copy samples
    method, mse = run.method, run.losses
    one_step = target.compare("modular_meanflow", run, toy_flow_matching(300))
    before, after, flow_one_step = one_step.before, one_step.after, one_step.flow
    boundary_before, boundary_after = boundary_mse(one_step.untrained.net, x_eval), boundary_mse(method.net, x_eval)
    print(f"1-step map error: untrained {before:.3f}, modular_meanflow {after:.3f}, flow matching {flow_one_step:.3f}; "
          f"boundary mse {boundary_before:.3f} -> {boundary_after:.3f} (floor {floor:.3f}), "
          f"training mse {sum(mse[:50]) / 50:.3f} -> {sum(mse[-50:]) / 50:.3f}")
    assert int(method.training_step) == 300 and float(method.modulation()) == 1.0
    assert boundary_after - floor < 0.75 * (boundary_before - floor)  # measured 0.57
    assert after < 0.6 * before and after < 0.4 * flow_one_step
    assert target.error(method.sample(target.noise, 2, net=run.ema)) < 0.6 * before


def test_unet_class_conditional_loss_double_backward_and_sampling():
    """Double backward through GroupNorm and the written-out attention at lambda = 1, with labels; self_check verifies
    the JVP and its gradient on this backbone."""
    torch.manual_seed(0)
    net = nets.build("unet", (1, 8, 8), num_classes=3, channels=8, channel_mult=[1, 2], attention_resolutions=[4])
    with torch.no_grad():  # a zero output layer would make the JVP's own gradient vanish
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    x, labels = torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    grads = {}
    for lam in (0.0, 1.0):
        method = methods.get("modular_meanflow", net, (1, 8, 8), num_classes=3, **fixed(lam))
        out, grads[lam] = gradients(method, x, labels)
        assert torch.isfinite(out.loss) and set(out.metrics) == {"mse", "modulation"}
        assert all(torch.isfinite(g).all() for g in grads[lam])
    difference = sum((g1 - g0).norm() for g1, g0 in zip(grads[1.0], grads[0.0]))
    assert difference > 1e-3 * sum(g.norm() for g in grads[1.0])  # the JVP's gradient reached the parameters
    for steps in (1, 2, 3):
        samples = method.sample(torch.randn(4, 1, 8, 8), steps, labels=torch.tensor([0, 1, 2, 3]))  # 3 = null label
        assert samples.shape == (4, 1, 8, 8) and torch.isfinite(samples).all()
    assert method.sample(torch.randn(2, 1, 8, 8), 1).shape == (2, 1, 8, 8)  # unconditional (labels None) too
    report = method.self_check(x, labels)
    assert report["ok"] == 1.0 and report["jvp_norm"] > 0 and report["jvp_backward_relative_error"] < 1e-2


def test_self_check_on_the_mlp_checks_the_backward_only_when_lambda_can_be_positive():
    torch.manual_seed(0)
    x = torch.randn(32, 2)
    report = methods.get("modular_meanflow", nets.build("mlp", (2,), width=32), (2,)).self_check(x, None)
    assert report["ok"] == 1.0 and report["jvp_backward_relative_error"] < 1e-2
    meanflow_like = methods.get("modular_meanflow", nets.build("mlp", (2,), width=32), (2,), modulation=0.0)
    report = meanflow_like.self_check(x, None)
    assert report["ok"] == 1.0 and "jvp_backward_relative_error" not in report


# --- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"modulation": 1.5}, "modulation"),
    ({"modulation": -0.1}, "modulation"),
    ({"modulation_warmup_steps": -1}, "modulation_warmup_steps"),
    ({"modulation_warmup_steps": 2.5}, "modulation_warmup_steps"),
    ({"jvp_mode": "finite_difference"}, "finite_difference"),
    ({"jvp_mode": "reverse"}, "jvp_mode"),
    ({"flow_matching_share": 1.2}, "flow_matching_share"),
    ({"adaptive_eps": 0.0}, "adaptive_eps"),
    ({"jvp_tangent": "marginal"}, "jvp_tangent"),
    ({"lambda_warmup": 10}, "unknown option"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get("modular_meanflow", ExactGaussian(MU, STD), (2,), **options)


def test_bad_sampling_arguments_and_time_pairs_are_clear_errors():
    # lambda = 0 with the finite-difference JVP is MeanFlow's fallback and is allowed.
    methods.get("modular_meanflow", ExactGaussian(MU, STD), (2,), modulation=0.0, jvp_mode="finite_difference")
    method = methods.get("modular_meanflow", ExactGaussian(MU, STD), (2,))
    with pytest.raises(JumpflowError, match="positive integer"):
        method.sample(torch.randn(2, 2, dtype=torch.float64), 0)
    with pytest.raises(JumpflowError, match="guidance"):
        method.sample(torch.randn(2, 2, dtype=torch.float64), 1, guidance=2.0)
    bad = methods.get("modular_meanflow", ExactGaussian(MU, STD), (2,), time_pair="shuffled")
    with pytest.raises(JumpflowError, match="independent"):
        bad.loss(torch.randn(4, 2, dtype=torch.float64), None)
