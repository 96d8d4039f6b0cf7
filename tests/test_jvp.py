import pytest
import torch
from torch import nn

from jumpflow.errors import JumpflowError
from jumpflow.jvp import jvp_self_check, refuse_ddp, total_derivative


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 2)).double()


def fn_of(net):
    return lambda z, t, r: net(torch.cat([z, t[:, None], r[:, None]], dim=1))


def test_exact_jvp_matches_central_difference_of_the_total_derivative():
    net = small_net()
    fn = fn_of(net)
    z, v = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t, r = torch.rand(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    out, exact = total_derivative(fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    h = 1e-5  # d/dh f(z + h v, t + h, r) at h = 0
    fd = (fn(z + h * v, t + h, r) - fn(z - h * v, t - h, r)) / (2 * h)
    assert torch.allclose(out, fn(z, t, r))
    assert torch.allclose(exact, fd, atol=1e-8)
    _, approx = total_derivative(fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)),
                                 mode="finite_difference", step=1e-5)
    assert torch.allclose(approx, exact, atol=1e-8)


def test_exact_mode_keeps_the_gradient_through_the_primal_output():
    net = small_net()
    z, t = torch.randn(4, 2, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    r = torch.zeros(4, dtype=torch.float64)
    out, _ = total_derivative(fn_of(net), (z, t, r), (z, torch.ones_like(t), torch.zeros_like(r)))
    out.sum().backward()
    reference = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    fn_of(net)(z, t, r).sum().backward()
    for g, ref in zip((p.grad for p in net.parameters()), reference):
        assert torch.allclose(g, ref)


def test_self_check_agrees_on_a_smooth_model_and_flags_a_wrong_rule():
    net = small_net().float()
    z, t, r = torch.randn(16, 2), torch.rand(16), torch.zeros(16)
    tangents = (torch.randn(16, 2), torch.ones(16), torch.zeros(16))
    assert jvp_self_check(fn_of(net), (z, t, r), tangents)["ok"]

    class WrongRule(torch.autograd.Function):  # forward-mode rule deliberately off by a factor 3
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, tangent):
            return tangent * 6

    report = jvp_self_check(lambda z, t, r: WrongRule.apply(fn_of(net)(z, t, r)), (z, t, r), tangents)
    assert not report["ok"] and report["relative_error"] > 0.5


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(JumpflowError, match="finite_difference"):
        total_derivative(lambda z: z, (torch.ones(1),), (torch.ones(1),), mode="magic")


def test_ddp_module_is_refused_with_the_fix_in_the_message(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
        with pytest.raises(JumpflowError, match="model.module"):
            refuse_ddp(nn.ModuleDict({"student": wrapped}))
        refuse_ddp(wrapped.module)  # the unwrapped module is fine
    finally:
        dist.destroy_process_group()


def test_a_finite_difference_jvp_sees_one_dropout_mask():
    """Dropout in train mode: the three forwards of the central difference replay one mask, so it agrees with the
    exact JVP taken from the same RNG state (with three masks it would be off by ~100%)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Dropout(0.5), torch.nn.Tanh(),
                              torch.nn.Linear(32, 4)).double().train()
    z, v = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    torch.manual_seed(1)
    _, exact = total_derivative(net, (z,), (v,), mode="exact")
    torch.manual_seed(1)
    _, approx = total_derivative(net, (z,), (v,), mode="finite_difference", step=1e-5)
    assert (exact - approx).norm() < 1e-6 * exact.norm()
