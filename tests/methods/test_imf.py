import math

import pytest
import torch
from torch import nn

import jumpflow.methods.imf  # noqa: F401  (registers "imf")
from jumpflow import TrainConfig, methods, nets
from jumpflow.build import DataInfo, backbone_options, build_method
from jumpflow.data.gaussian_mixture import GaussianMixture
from jumpflow.errors import JumpflowError
from jumpflow.methods.imf import compound_velocity, effective_guidance, guidance_inputs, guided_velocity
from jumpflow.methods.meanflow import meanflow_target
from tests.gaussian import ExactGaussian
from tests.methods.toy_training import EIGHT_GAUSSIANS, OneStepMap, fit, toy_method

torch.set_num_threads(1)

MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4
CLASS_MEANS = torch.tensor([[1.0, -0.5], [-1.0, 0.8]], dtype=torch.float64)  # two classes, same std
IMF_NET = {"extra_inputs": 3, "heads": 2}  # what imf needs of its backbone: the guidance inputs and the v-head


class ExactTwoHeads(nn.Module):
    """[u, v] of Gaussian data: u-head the exact average velocity, v-head the exact velocity (extra ignored)."""

    def __init__(self, exact):
        super().__init__()
        self.exact = exact

    def forward(self, z, t, s, cond=None, extra=None):
        return torch.cat([self.exact(z, t, s), self.exact.velocity(z, t)], dim=1)


class ExactGuidedVelocity(nn.Module):
    """v-head = the exact CFG field omega v_cond + (1 - omega) v_uncond of two Gaussian classes, omega read back from
    the extra input 1 - 1/omega; the null label (2) gives the mixture's velocity. u-head: zeros (unused)."""

    def __init__(self):
        super().__init__()
        self.classes = [ExactGaussian(mu, STD) for mu in CLASS_MEANS]
        self.mixture = GaussianMixture([0.5, 0.5], CLASS_MEANS, [STD, STD])

    def conditional(self, z, t, cond):
        v_u = self.mixture.velocity(z, t)
        per_class = torch.stack([c.velocity(z, t) for c in self.classes])  # (2, B, D)
        picked = per_class[cond.clamp(max=1), torch.arange(z.shape[0])]
        return torch.where((cond == 2)[:, None], v_u, picked), v_u

    def forward(self, z, t, s, cond=None, extra=None):
        omega = (1 / (1 - extra[:, :1])).to(z.dtype)
        v_cond, v_u = self.conditional(z, t, cond)
        return torch.cat([torch.zeros_like(z), omega * v_cond + (1 - omega) * v_u], dim=1)


def times(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    return t, t * torch.rand(n, generator=gen, dtype=torch.float64)


def test_compound_velocity_is_the_exact_velocity_at_meanflows_fixed_point():
    """The paper's test (omega = 1, interval (0, 1)): for the exact u and the exact v as JVP tangent, V = u + (t - r)
    du/dt is exactly v, so the v-loss residual against E[v_t | z] = v is zero: MeanFlow's stationary point."""
    exact = ExactGaussian(MU, STD)
    t, r = times(64)
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = exact.velocity(z, t)
    compound, v_head = compound_velocity(ExactTwoHeads(exact), z, t, r, v)
    assert torch.allclose(compound, v, atol=1e-9)
    assert torch.equal(v_head, v)  # the v-head output of the same forward
    # A perturbed average velocity is not stationary.
    perturbed = lambda z_, t_, r_: ExactTwoHeads(exact)(z_, t_, r_) + 0.1 * torch.sin(torch.cat([z_, z_], 1))  # noqa
    compound, _ = compound_velocity(perturbed, z, t, r, v)
    assert (compound - v).norm(dim=1).mean() > 0.05
    # r = t: V is the u-head itself (the flow-matching rows).
    compound, _ = compound_velocity(ExactTwoHeads(exact), z, t, t.clone(), v)
    assert torch.equal(compound, v)


def test_imf_residual_equals_meanflows_for_any_network():
    """V - v = u - sg(v - (t - r) du/dt) for every u: with the tangent and the target both v, iMF's v-loss residual
    is MeanFlow's u-loss residual, so both have the same stationary points (on a random real backbone)."""
    torch.manual_seed(0)
    net = nets.build("mlp", (2,), width=32, depth=2, extra_inputs=3, heads=2).double()
    with torch.no_grad():
        net.out.weight.normal_(0, 0.3)
    extra = guidance_inputs(*torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64).T).expand(16, 3)
    two_heads = lambda z_, t_, r_: net(z_, t_, r_, None, extra)  # noqa: E731
    t, r = times(16, seed=2)
    z, v = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    compound, _ = compound_velocity(two_heads, z, t, r, v)
    u, target = meanflow_target(lambda z_, t_, r_: two_heads(z_, t_, r_)[:, :2], z, t, r, v)
    assert torch.allclose(compound - v, u - target, atol=1e-12)
    compound.sum().backward()  # gradients reach the parameters through u only (du/dt is detached)
    assert net.out.weight.grad[2:].abs().sum() == 0 and net.out.weight.grad[:2].abs().sum() > 0


def test_guidance_arithmetic():
    """METHODS.md A3: if v_c = omega v_cond + (1 - omega) v_u, then (1 - 1/omega)(v_c - v_u) = (omega - 1)(v_cond -
    v_u), and the guided target v_g = v_cond + (1 - 1/omega)(v_c - v_u) has v_c as its fixed point."""
    net = ExactGuidedVelocity()
    gen = torch.Generator().manual_seed(3)
    z, t = torch.randn(32, 2, generator=gen, dtype=torch.float64), torch.rand(32, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (32,), generator=gen)
    omega = 1 + 7 * torch.rand(32, generator=gen, dtype=torch.float64)
    v_cond, v_u = net.conditional(z, t, labels)
    v_c = omega[:, None] * v_cond + (1 - omega[:, None]) * v_u
    assert torch.allclose((1 - 1 / omega[:, None]) * (v_c - v_u), (omega[:, None] - 1) * (v_cond - v_u))
    assert torch.allclose(guided_velocity(v_cond, v_c, v_u, omega), v_c)
    assert (v_c - v_cond).abs().max() > 0.1  # guidance does something here
    # Guidance acts only inside [t_min, t_max].
    t_min, t_max = torch.full_like(t, 0.3), torch.full_like(t, 0.6)
    inside = (t >= 0.3) & (t <= 0.6)
    assert inside.any() and (~inside).any()
    assert torch.equal(effective_guidance(omega, t, t_min, t_max), torch.where(inside, omega, 1.0))


def test_guided_target_from_the_models_own_velocity_head():
    """Wiring of the method: the exact CFG field as v-head and E[eps - x | z, y] = v_cond as v_t give v_g = v_c and
    the tangent v_c; dropped labels give v_g = v_t with the null-label tangent; omega = 1 gives v_g = v_t."""
    net = ExactGuidedVelocity()
    method = methods.get("imf", net, (2,), num_classes=2)
    gen = torch.Generator().manual_seed(4)
    n = 48
    z, t = torch.randn(n, 2, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=gen)
    omega = torch.where(torch.arange(n) % 3 == 0, 1.0, 1 + 7 * torch.rand(n, generator=gen, dtype=torch.float64))
    dropped = torch.arange(n) % 4 == 1
    v_cond, v_u = net.conditional(z, t, labels)
    v_c = omega[:, None] * v_cond + (1 - omega[:, None]) * v_u
    v_g, tangent = method.guided_target(net, z, t, v_cond, labels, omega, dropped)
    keep = ~dropped
    assert torch.allclose(v_g[keep], v_c[keep]) and torch.allclose(tangent[keep], v_c[keep])
    assert torch.equal(v_g[dropped], v_cond[dropped]) and torch.allclose(tangent[dropped], v_u[dropped])
    unguided = keep & (omega == 1)
    assert unguided.any() and torch.allclose(v_g[unguided], v_cond[unguided])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampling_with_the_exact_average_velocity_lands_on_the_exact_flow_map(steps):
    method = methods.get("imf", ExactTwoHeads(ExactGaussian(MU, STD)), (2,))
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(method.sample(noise, steps), MU + STD * noise, atol=1e-6)  # Phi_{1->0}(eps) = mu + s eps


def test_time_pairs_guidance_scales_and_intervals():
    torch.manual_seed(0)
    method = methods.get("imf", ExactTwoHeads(ExactGaussian(MU, STD)), (2,))
    n = 20000
    t, r, same = method.sample_time_pair(n, "cpu")
    assert (r <= t).all() and torch.equal(same, torch.arange(n) < n // 2) and torch.equal(r[same], t[same])
    assert (r[~same] < t[~same]).all()
    omega = method.sample_guidance(n, "cpu")
    assert omega.min() >= 1 and omega.max() <= 8
    assert abs(omega.log().mean().item() - math.log(8) / 2) < 0.02  # log-uniform on [1, 1 + s_max]
    power = methods.get("imf", ExactTwoHeads(ExactGaussian(MU, STD)), (2,), guidance_beta=2.0)
    omega = power.sample_guidance(n, "cpu")  # density ~ omega^-2 on [1, 8]: median 16/9
    assert omega.min() >= 1 and omega.max() <= 8 + 1e-5 and abs(omega.median().item() - 16 / 9) < 0.03
    t_min, t_max = method.sample_interval(same)
    assert (t_min[same] == 0).all() and (t_max[same] == 1).all()
    assert 0 <= t_min[~same].min() and t_min[~same].max() <= 0.5 <= t_max[~same].min() and t_max.max() <= 1


def probe_mse(method):
    """The unweighted squared error on one fixed batch with fixed draws (times, noise, omega), the global RNG left as
    it was: iMF's adaptively weighted loss D / (D + 0.01) sits near 1 per head whatever D is, so it shows little."""
    x = EIGHT_GAUSSIANS.sample_batch(2048, torch.Generator().manual_seed(1))[0]
    state = torch.get_rng_state()
    torch.manual_seed(2)
    mse = method.loss(x, None).metrics["mse"].item()
    torch.set_rng_state(state)
    return mse


def test_training_learns_a_one_step_map_that_flow_matching_at_one_step_does_not(toy_flow_matching):
    target = OneStepMap.seeded()
    method = toy_method("imf", net_options=IMF_NET)
    mse_before = probe_mse(method)
    imf = fit(method, 300)  # the EMA copy is what samples
    mse_after = probe_mse(method)
    one_step = target.compare("imf", imf, toy_flow_matching(300), net_options=IMF_NET)  # untrained: the identity map
    assert mse_after < 0.95 * mse_before, (mse_before, mse_after)  # most of it is the noise of eps - x
    assert one_step.after < 0.6 * one_step.before and one_step.after < 0.5 * one_step.flow, one_step
    assert target.error(method.sample(target.noise, 2, net=imf.ema)) < 0.6 * one_step.before


def test_unet_class_conditional_training_and_guided_sampling():
    torch.manual_seed(0)
    net = nets.build("unet", (1, 8, 8), num_classes=3, channels=8, channel_mult=[1, 2], extra_inputs=3, heads=2)
    method = methods.get("imf", net, (1, 8, 8), num_classes=3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        out = method.loss(x, labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert torch.isfinite(out.loss) and set(out.metrics) == {"mse", "mse_v"}
    assert all(p.grad is not None for p in net.cond.extra.parameters())  # guidance inputs are trained
    noise, classes = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for steps in (1, 2):
        plain = method.sample(noise, steps, labels=classes)
        guided = method.sample(noise, steps, labels=classes, guidance=2.0, interval=(0.3, 0.8))
        assert plain.shape == guided.shape == (4, 1, 8, 8) and torch.isfinite(guided).all()
        assert (plain - guided).abs().max() > 0  # omega is an input of the net
    assert method.sample(noise[:2], 1).shape == (2, 1, 8, 8)  # labels None: the null label
    assert method.self_check(x, labels)["ok"] == 1.0
    method.config.velocity_head_time = "instantaneous"  # the other v-head option trains too
    assert torch.isfinite(method.loss(x, labels).loss)


def test_build_merges_the_backbone_requirements_and_refuses_conflicts():
    info = DataInfo("8gaussians", "vector", (2,), 0)
    cfg = TrainConfig(method="imf", backbone_options={"width": 32, "depth": 1})
    assert backbone_options(cfg) == {"width": 32, "depth": 1, "extra_inputs": 3, "heads": 2}
    method = build_method(cfg, info)
    assert (method.net.extra_inputs, method.net.heads) == (3, 2) and cfg.backbone_options == {"width": 32, "depth": 1}
    assert build_method(TrainConfig(method="imf", backbone_options={"heads": 2}), info).net.heads == 2  # agreeing
    with pytest.raises(JumpflowError, match=r"needs backbone option\(s\) heads=2; the config sets heads=1"):
        build_method(TrainConfig(method="imf", backbone_options={"heads": 1}), info)
    assert backbone_options(TrainConfig(method="meanflow", backbone_options={"width": 8})) == {"width": 8}
    with pytest.raises(JumpflowError, match="extra_inputs=3"):  # a plain backbone handed to imf by hand
        methods.get("imf", nets.build("mlp", (2,), width=8, depth=1), (2,))


def test_bad_options_are_clear_errors():
    exact = ExactTwoHeads(ExactGaussian(MU, STD))
    with pytest.raises(JumpflowError, match="guidance_max"):
        methods.get("imf", exact, (2,), guidance_mx=3.0)
    for bad, match in [({"velocity_head_time": "zero"}, "velocity_head_time"), ({"jvp_mode": "fd"}, "jvp_mode"),
                       ({"flow_matching_share": 1.5}, "flow_matching_share"), ({"guidance_max": -1}, "guidance_max"),
                       ({"time_sampler": "beta"}, "time_sampler"), ({"interval_split": 2}, "interval_split")]:
        with pytest.raises(JumpflowError, match=match):
            methods.get("imf", exact, (2,), **bad)
    noise = torch.randn(2, 2, dtype=torch.float64)
    unconditional = methods.get("imf", exact, (2,))
    with pytest.raises(JumpflowError, match="positive integer"):
        unconditional.sample(noise, 0)
    with pytest.raises(JumpflowError, match="unconditional"):
        unconditional.sample(noise, 1, guidance=2.0)
    conditional = methods.get("imf", exact, (2,), num_classes=2)
    for options, match in [({"guidance": 0.5}, ">= 1"), ({"guidance": float("nan")}, ">= 1"),
                           ({"interval": (0.7, 0.3)}, "t_min <= t_max"), ({"interval": (0.2,)}, "pair"),
                           ({"guidance": "strong"}, "number")]:
        with pytest.raises(JumpflowError, match=match):
            conditional.sample(noise, 1, **options)


def test_jvp_tangent_option_switches_between_the_model_velocity_and_eps_minus_x(monkeypatch):
    """The paper's tangent is the v-head's own velocity; jvp_tangent="conditional" (an ablation) uses MeanFlow's
    eps - x instead."""
    import jumpflow.methods.imf as imf

    seen = {}
    real_compound, real_conditional = imf.compound_velocity, imf.conditional_velocity

    def compound(two_heads, z, t, r, tangent, jvp_mode="exact"):
        seen["tangent"] = tangent
        return real_compound(two_heads, z, t, r, tangent, jvp_mode)

    def conditional(x, noise):
        seen["eps_minus_x"] = real_conditional(x, noise)
        return seen["eps_minus_x"]

    monkeypatch.setattr(imf, "compound_velocity", compound)
    monkeypatch.setattr(imf, "conditional_velocity", conditional)
    exact = ExactGaussian(MU, STD)
    x = MU + STD * torch.randn(64, 2, dtype=torch.float64)
    methods.get("imf", ExactTwoHeads(exact), (2,)).loss(x, None)
    assert not torch.allclose(seen["tangent"], seen["eps_minus_x"])  # the exact velocity, not eps - x
    methods.get("imf", ExactTwoHeads(exact), (2,), jvp_tangent="conditional").loss(x, None)
    assert torch.equal(seen["tangent"], seen["eps_minus_x"])
    with pytest.raises(JumpflowError, match="jvp_tangent"):
        methods.get("imf", ExactTwoHeads(exact), (2,), jvp_tangent="noise")
