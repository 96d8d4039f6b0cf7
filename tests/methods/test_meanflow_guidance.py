"""MeanFlow's classifier-free guidance folded into training (Geng et al. 2025, "Mean Flows for One-step Generative
Modeling", arXiv 2505.13447; METHODS.md A2): v_tilde = omega v + (1 - omega - kappa) u(z, t, t, null)
+ kappa u(z, t, t, c) replaces v in the JVP tangent and the target, for labelled samples with t in [t_start, t_end]."""

import pytest
import torch
from torch import nn

from jumpflow import methods, nets
from jumpflow.data.gaussian_mixture import GaussianMixture
from jumpflow.errors import JumpflowError
from jumpflow.methods.meanflow import adaptive_weighted, effective_guidance_scale, guided_field, meanflow_target
from tests.gaussian import ExactGaussian

torch.set_num_threads(1)

STD = 0.4
CLASS_MEANS = torch.tensor([[1.0, -0.5], [-1.0, 0.8]], dtype=torch.float64)  # two classes, same std
NULL = 2  # the null label of a 2-class model


class ExactClassField(nn.Module):
    """Exact fields of two Gaussian classes: s < t the class's exact average velocity, s == t its exact velocity v_c;
    the null label gives the two-class mixture's velocity v_uncond. `scale` != 1 turns the labelled velocity into the
    CFG field scale v_c + (1 - scale) v_uncond (what a guided model converges to)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.classes = [ExactGaussian(mu, STD) for mu in CLASS_MEANS]
        self.mixture = GaussianMixture([0.5, 0.5], CLASS_MEANS, [STD, STD])
        self.scale = scale

    def class_velocity(self, z, t, labels):
        per_class = torch.stack([c.velocity(z, t) for c in self.classes])  # (2, B, D)
        return per_class[labels.clamp(max=1), torch.arange(z.shape[0])]

    def forward(self, z, t, s, labels=None):
        v_u = self.mixture.velocity(z, t)
        v_c = self.scale * self.class_velocity(z, t, labels) + (1 - self.scale) * v_u
        average = torch.stack([c(z, t, s) for c in self.classes])[labels.clamp(max=1), torch.arange(z.shape[0])]
        labelled = torch.where((s < t)[:, None], average, v_c)
        return torch.where((labels == NULL)[:, None], v_u, labelled)


def points(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=gen)
    return z, t, labels


def guided_method(net=None, **options):
    return methods.get("meanflow", net if net is not None else ExactClassField(), (2,), num_classes=2, **options)


def random_conditional_mlp():
    """A 2-class MLP whose zero-initialised output layer is re-drawn, so its output (and the guidance) is not 0."""
    torch.manual_seed(0)
    net = nets.build("mlp", (2,), num_classes=2, width=32, depth=2)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.5)
    return net


def meanflow_loss_by_hand(method, x, labels, guided: str = "both"):
    """MeanFlow's loss as it was before guidance, from the method's own draws in its order; `guided` = "both" or
    "target" swaps v for v_tilde in the JVP tangent and target, or in the target only (the wrong placement)."""
    cfg = method.config
    z, t, r, v = method.training_point(x)
    labels = method.drop_labels(labels, cfg.class_dropout)
    fn = lambda z_, t_, r_: method.net(z_, t_, r_, labels).float()  # noqa: E731
    if guided == "off":
        u, target = meanflow_target(fn, z, t, r, v)
    else:
        v_tilde = method.guided_velocity(method.net, z, t, v, labels)
        u, target = meanflow_target(fn, z, t, r, v_tilde if guided == "both" else v)
        if guided == "target":  # v - (t - r) du/dt along v  ->  v_tilde - (t - r) du/dt along v
            target = target - v + v_tilde
    delta = (u - target).pow(2).flatten(1).sum(1)
    return adaptive_weighted(delta, cfg.adaptive_power, cfg.adaptive_eps).mean()


# --- (a) omega = 1, kappa = 0 is MeanFlow bit for bit -------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"guidance_omega": 1.0, "guidance_kappa": 0.0},
                                     {"guidance_t_start": 0.3, "guidance_t_end": 0.6}])
def test_unguided_loss_is_the_old_loss_bit_for_bit(options):
    method = guided_method(random_conditional_mlp(), **options)
    x, labels = torch.randn(64, 2), torch.randint(0, 2, (64,))
    torch.manual_seed(1)
    old = meanflow_loss_by_hand(method, x, labels, guided="off")
    torch.manual_seed(1)
    assert torch.equal(method.loss(x, labels).loss, old)
    torch.manual_seed(1)
    old = meanflow_loss_by_hand(method, x, None, guided="off")  # labels None (the null label): also unchanged
    torch.manual_seed(1)
    assert torch.equal(method.loss(x, None).loss, old)


def test_guided_loss_puts_v_tilde_in_the_tangent_and_the_target():
    # plain L2 (adaptive_power 0): the default adaptive weight maps each per-sample error to ~1, hiding differences
    method = guided_method(random_conditional_mlp(), guidance_omega=2.0, guidance_kappa=0.3, adaptive_power=0.0,
                           flow_matching_share=0.0)  # every row r < t: the tangent matters on all
    x, labels = torch.randn(64, 2), torch.randint(0, 2, (64,))
    torch.manual_seed(1)
    loss = method.loss(x, labels).loss
    torch.manual_seed(1)
    assert torch.allclose(loss, meanflow_loss_by_hand(method, x, labels, "both"), rtol=1e-6)
    for other in ("off", "target"):  # plain MeanFlow, or v_tilde in the target only: both measurably different
        torch.manual_seed(1)
        assert (loss - meanflow_loss_by_hand(method, x, labels, other)).abs() > 0.01 * loss.abs()
    loss.backward()  # the guided evaluations carry no graph; the loss still trains the net
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.net.parameters())


# --- (b) the fixed point moves to the guided field -------------------------------------------------------------------
@pytest.mark.parametrize("omega", [1.5, 3.0])
def test_guided_target_is_the_cfg_field_of_the_exact_net_at_kappa_zero(omega):
    """With the exact net and v = E[v | z_t, c] = v_c, v_tilde = omega v_c + (1 - omega) v_uncond: where r = t the
    MeanFlow target (which is v_tilde itself) is the CFG field, so u(z, t, t, c) is trained towards it."""
    net = ExactClassField()
    method = guided_method(net, guidance_omega=omega)
    z, t, labels = points()
    v_c, v_u = net.class_velocity(z, t, labels), net.mixture.velocity(z, t)
    assert (v_c - v_u).norm(dim=1).mean() > 0.1  # the classes differ: the check is not vacuous
    v_tilde = method.guided_velocity(net, z, t, v_c, labels)
    assert torch.allclose(v_tilde, omega * v_c + (1 - omega) * v_u, atol=1e-12)
    _, target = meanflow_target(lambda z_, t_, r_: net(z_, t_, r_, labels), z, t, t.clone(), v_tilde)
    assert torch.allclose(target, omega * v_c + (1 - omega) * v_u, atol=1e-12)


@pytest.mark.parametrize("omega, kappa", [(1.5, 0.5), (2.0, 0.25)])
def test_the_cfg_field_of_scale_omega_over_one_minus_kappa_is_the_fixed_point(omega, kappa):
    """kappa > 0 uses the net's own conditional velocity: a net already at the CFG field of scale omega / (1 - kappa)
    reproduces it as v_tilde (the paper's effective scale), and a net at another scale does not."""
    scale = effective_guidance_scale(omega, kappa)
    assert scale == pytest.approx(omega / (1 - kappa))
    z, t, labels = points()
    for net_scale, fixed in ((scale, True), (1.0, False)):
        net = ExactClassField(scale=net_scale)
        method = guided_method(net, guidance_omega=omega, guidance_kappa=kappa)
        v_c, v_u = net.class_velocity(z, t, labels), net.mixture.velocity(z, t)
        v_tilde = method.guided_velocity(net, z, t, v_c, labels)
        labelled = net(z, t, t, labels)
        assert torch.allclose(v_tilde, labelled, atol=1e-12) == fixed
        assert torch.equal(v_tilde, guided_field(v_c, v_u, labelled, omega, kappa))


# --- (c) guidance acts only inside [t_start, t_end] and only on labelled samples -------------------------------------
def test_guidance_is_off_outside_the_interval_and_for_dropped_labels():
    net = ExactClassField()
    method = guided_method(net, guidance_omega=2.0, guidance_t_start=0.3, guidance_t_end=0.6)
    z, t, labels = points(256)
    labels[:32] = NULL  # dropped labels
    v = torch.randn(256, 2, dtype=torch.float64)
    v_tilde = method.guided_velocity(net, z, t, v, labels)
    inside = (t >= 0.3) & (t <= 0.6) & (labels != NULL)
    assert inside.sum() > 20 and (~inside).sum() > 20
    assert torch.equal(v_tilde[~inside], v[~inside])
    expected = 2.0 * v - net.mixture.velocity(z, t)
    assert torch.allclose(v_tilde[inside], expected[inside], atol=1e-12)


# --- (d) bad options are clear errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"guidance_omega": 0.0}, "guidance_omega"), ({"guidance_omega": float("nan")}, "guidance_omega"),
    ({"guidance_kappa": 1.0}, "guidance_kappa"), ({"guidance_kappa": -0.1}, "guidance_kappa"),
    ({"guidance_t_start": 0.7, "guidance_t_end": 0.3}, "t_start"), ({"guidance_t_end": 1.5}, "t_end"),
])
def test_bad_guidance_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        guided_method(**options)


def test_guidance_needs_a_class_conditional_meanflow_and_sampling_takes_none():
    with pytest.raises(JumpflowError, match="class_conditional"):
        methods.get("meanflow", ExactClassField(), (2,), guidance_omega=2.0)
    methods.get("meanflow", ExactClassField(), (2,))  # unconditional with the defaults: fine
    with pytest.raises(JumpflowError, match="does not fold guidance"):  # a MeanFlow subclass with its own loss
        methods.get("modular_meanflow", ExactClassField(), (2,), num_classes=2, guidance_omega=2.0)
    method = guided_method(guidance_omega=2.0)
    with pytest.raises(JumpflowError, match="guidance"):  # guidance is in the weights, not a sampling option
        method.sample(torch.randn(2, 2, dtype=torch.float64), 1, labels=torch.tensor([0, 1]), guidance=2.0)
