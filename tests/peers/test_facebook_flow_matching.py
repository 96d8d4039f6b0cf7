"""The flow_matching peer calls Meta's package; these tests pin its time/sign conversion to jumpflow's own path,
loss and sampler, so a side-by-side benchmark compares implementations, not conventions."""

import sys

import pytest
import torch
from torch import nn

import jumpflow
from jumpflow import TrainConfig, methods, paths
from jumpflow.data.toys import eight_gaussians
from jumpflow.errors import JumpflowError
from tests.gaussian import ExactVelocity

PEER = "peer.facebook_flow_matching"



class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, z, t, s, cond=None):
        return self.layers(torch.cat([z, t[:, None], s[:, None]], dim=1))


def test_their_path_is_ours_with_time_reversed():
    pytest.importorskip("flow_matching")
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    gen = torch.Generator().manual_seed(0)
    x, eps, t = torch.randn(64, 3, generator=gen), torch.randn(64, 3, generator=gen), torch.rand(64, generator=gen)
    theirs = AffineProbPath(scheduler=CondOTScheduler()).sample(x_0=eps, x_1=x, t=1 - t)
    assert torch.allclose(theirs.x_t, paths.interpolate(x, eps, t), atol=1e-6)
    assert torch.allclose(-theirs.dx_t, paths.conditional_velocity(x, eps), atol=1e-6)


def test_loss_equals_jumpflow_flow_matching_on_the_same_draws():
    pytest.importorskip("flow_matching")
    net = TinyNet()
    peer = methods.get(PEER, net, (2,))
    ours = methods.get("flow_matching", net, (2,), class_dropout=0.0)
    x = torch.randn(256, 2)
    torch.manual_seed(3)
    peer_loss = peer.loss(x, None).loss
    torch.manual_seed(3)
    our_loss = ours.loss(x, None).loss
    assert torch.allclose(peer_loss, our_loss, rtol=1e-6)
    assert peer_loss.item() > 0


def test_sampler_matches_jumpflow_flow_matching_with_an_exact_velocity():
    pytest.importorskip("flow_matching")
    net = ExactVelocity(eight_gaussians())
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_peer = methods.get(PEER, net, (2,)).sample(noise, 100)
    x_ours = methods.get("flow_matching", net, (2,)).sample(noise, 100)
    assert x_peer.shape == noise.shape
    assert (x_peer - x_ours).abs().max().item() < 1e-4  # the same Euler scheme, run through their solver
    exact = net.mixture.flow_map(noise, 1.0, 0.0)
    assert (x_peer - exact).abs().mean().item() < 0.05  # and it solves the ODE, not just something close to ours


def test_midpoint_is_more_accurate_than_euler_and_counts_two_evaluations_per_step():
    pytest.importorskip("flow_matching")
    net = ExactVelocity(eight_gaussians())
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = net.mixture.flow_map(noise, 1.0, 0.0)
    euler = methods.get(PEER, net, (2,))
    midpoint = methods.get(PEER, net, (2,), solver="midpoint")
    assert (euler.nfe(10), midpoint.nfe(10)) == (10, 20)
    euler_error = (euler.sample(noise, 20) - exact).abs().mean()
    midpoint_error = (midpoint.sample(noise, 10) - exact).abs().mean()  # same NFE budget as 20 Euler steps
    assert midpoint_error < euler_error


def test_sampler_spends_exactly_nfe_evaluations():
    """torchdiffeq's step_size=1/61 rounds to 62 steps; the peer passes the grid so NFE stays exact."""
    pytest.importorskip("flow_matching")
    calls = []

    class Counting(nn.Module):
        def forward(self, z, t, s, cond=None):
            calls.append(1)
            return torch.zeros_like(z)

    for steps in (1, 61, 109):
        calls.clear()
        peer = methods.get(PEER, Counting(), (2,))
        peer.sample(torch.randn(4, 2), steps)
        assert len(calls) == peer.nfe(steps) == steps


def test_bad_solver_and_options_are_refused():
    pytest.importorskip("flow_matching")
    with pytest.raises(JumpflowError, match="midpoint"):
        methods.get(PEER, TinyNet(), (2,), solver="dopri5")
    peer = methods.get(PEER, TinyNet(), (2,))
    with pytest.raises(JumpflowError, match="guidance"):
        peer.sample(torch.randn(2, 2), 2, guidance=2.0)


def test_trains_through_jumpflow_and_generates(tmp_path):
    pytest.importorskip("flow_matching")
    cfg = TrainConfig(method=PEER, data="8gaussians", steps=20, batch_size=64, warmup_steps=5,
                      backbone_options={"width": 32, "depth": 2}, log_every=10, sample_every=0,
                      checkpoint_every=0, progress=False, seed=0, device="cpu")
    jumpflow.train(cfg, tmp_path / "run")
    model = jumpflow.load(tmp_path / "run", device="cpu")
    x = model.generate(n=16, steps=4)
    assert x.shape == (16, 2)
    assert torch.isfinite(x).all()


def test_building_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "flow_matching", None)
    with pytest.raises(JumpflowError, match=r"jumpflow\[peers\]"):
        methods.get(PEER, TinyNet(), (2,))
