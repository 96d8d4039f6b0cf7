"""Re-MeanFlow (Zhang et al. 2025, arXiv 2511.23342) against an exact Gaussian teacher, its truncation and time
pairs, and a whole `jumpflow distill` run on a trained teacher."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import jumpflow
from jumpflow import methods
from jumpflow.distill import PairCache, Teacher
from jumpflow.distill.re_meanflow import pair_distance
from jumpflow.errors import JumpflowError
from jumpflow.train import Trainer
from tests.distill.test_reflow import MU, STD, exact_teacher, one_step_error
from tests.methods.toy_training import toy_net

# 200 Heun steps of the exact field: pairs within 1e-4 of the exact map n -> MU + STD n (50 steps: 1e-3).
EXACT_PAIRS = {"teacher_solver": "heun", "teacher_steps": 200}


def attached(tmp_path, pairs=2048, **options):
    torch.manual_seed(0)
    method = methods.get("re_meanflow", toy_net(), (2,), pairs=pairs, pair_cache=str(tmp_path / "pairs"),
                         **EXACT_PAIRS, **options)
    method.attach_teacher(exact_teacher(), tmp_path)
    return method


class CouplingVelocity(nn.Module):
    """The exact average velocity of the Gaussian teacher's coupling, as a function of (z_t, t) only.

    The coupled sample is x = MU + STD n, so z_t = (1 - t) x + t n = (1 - t) MU + ((1 - t) STD + t) n; solving for n
    gives the pair through z_t, and its line's velocity n - x = (1 - STD) n - MU, the same for every r <= t."""

    def forward(self, z, t, r, labels=None):
        t = t[:, None]
        noise = (z - (1 - t) * MU) / ((1 - t) * STD + t)
        return (1 - STD) * noise - MU


def test_the_target_is_the_pairs_velocity_so_the_exact_average_velocity_has_zero_loss(tmp_path):
    """Along a straight coupling u(z_t, r, t) = n - x is constant, so d/dt u = 0 and MeanFlow's target is v = n - x:
    the exact u has (near) zero loss. Plain MeanFlow (fresh noise, the same net) is far from zero: the coupling, not
    independent noise, is what makes the target exact."""
    method = attached(tmp_path)
    method.net = CouplingVelocity()
    torch.manual_seed(1)
    out = method.loss(torch.zeros(4096, 2), None)
    assert out.metrics["mse"] < 1e-7 and out.loss < 1e-3, (out.metrics["mse"], out.loss)

    independent = methods.get("meanflow", CouplingVelocity(), (2,), adaptive_power=0.5)
    data = MU + STD * torch.randn(4096, 2, generator=torch.Generator().manual_seed(2))
    assert independent.loss(data, None).metrics["mse"] > 0.1
    method.net = _Scaled(CouplingVelocity(), 1.1)  # 10% off: the loss sees it
    assert method.loss(torch.zeros(4096, 2), None).metrics["mse"] > 1e-3


class _Scaled(nn.Module):
    def __init__(self, net, factor):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, z, t, r, labels=None):
        return self.factor * self.net(z, t, r, labels)


def test_the_loss_is_meanflows_identity_on_the_coupling(tmp_path):
    """On a non-trivial net the per-sample error is u - (v - (t - r) du/dt), with du/dt the derivative along the
    pair's line z_t + h v (here a float64 central difference, not the loss's JVP)."""
    method = attached(tmp_path)
    with torch.no_grad():
        for p in method.net.parameters():
            if not p.any():  # the zero output layer would make every derivative vanish
                p.normal_(0.0, 0.5)
    torch.manual_seed(4)
    mse = method.loss(torch.zeros(512, 2), None).metrics["mse"]
    torch.manual_seed(4)
    z, t, r, v = (a.double() for a in method.coupled_point(512, "cpu")[:4])
    net, h = copy.deepcopy(method.net).double(), 1e-4
    du_dt = (net(z + h * v, t + h, r) - net(z - h * v, t - h, r)) / (2 * h)
    target = v - (t - r)[:, None] * du_dt
    expected = (net(z, t, r) - target).pow(2).mean()
    assert expected > 0.01 and abs(mse.item() - expected.item()) < 1e-4 * expected.item(), (mse, expected)


def test_training_points_lie_on_the_pairs_lines(tmp_path):
    method = attached(tmp_path)
    torch.manual_seed(3)
    z, t, r, v, labels = method.coupled_point(512, "cpu")
    torch.manual_seed(3)
    noise, sample, _ = method.pair_batch(512, "cpu")  # the same draw: the point's pair
    assert labels is None and (r <= t).all()
    assert torch.allclose(v, noise - sample) and torch.allclose(z, (1 - t[:, None]) * sample + t[:, None] * noise)


def test_truncation_drops_exactly_the_far_pairs_and_keeps_the_batch_size(tmp_path):
    attached(tmp_path, pairs=1000)  # fills the cache
    noise, sample, _ = PairCache.open(tmp_path / "pairs").load_all()
    distance = pair_distance(noise, sample)
    clip = distance.median().item()
    for options, kept in (({"distance_clip": clip}, distance < clip),
                          ({"distance_quantile": 0.3}, distance <= distance.sort().values[299])):
        method = attached(tmp_path, pairs=1000, **options)
        drawn, _, _ = method.pair_batch(20_000, "cpu")
        assert drawn.shape == (20_000, 2)  # a batch keeps its size
        assert set(map(tuple, drawn.unique(dim=0).tolist())) == set(map(tuple, noise[kept].tolist()))
        assert method.kept_share == pytest.approx(kept.float().mean().item())
    assert int((distance <= distance.sort().values[299]).sum()) == 300  # no ties: the quantile keeps exactly 30%
    assert attached(tmp_path, pairs=1000).kept_share == 1.0  # the default keeps every pair
    with pytest.raises(JumpflowError, match="drops every pair"):
        attached(tmp_path, pairs=1000, distance_clip=distance.min().item() / 2)


def test_time_pairs_follow_the_papers_schedule():
    method = methods.get("re_meanflow", toy_net(), (2,))
    torch.manual_seed(0)
    n = 200_000
    t, r = method.sample_time_pair(n, "cpu")
    assert (0 <= r).all() and (r <= t).all() and (t <= 1).all()
    same = r == t
    assert abs(same.float().mean().item() - 0.75) < 0.005  # consistency_ratio 0.25: 75% flow matching
    # A long jump from t > 0.8 never stops short of 0.4: it goes to the data.
    late = (t > 0.8) & ~same
    assert ((r[late] == 0) | (r[late] >= 0.4)).all() and (r[late] == 0).float().mean() > 0.1
    # U-shaped t, density (p(t) + p(1 - t)) / 2 with p(t) = a e^{a t} / (e^a - 1), a = 4: the share of [lo, hi] is
    # (e^{a hi} - e^{a lo} + e^{a (1 - lo)} - e^{a (1 - hi)}) / (2 (e^a - 1)); uniform t would give hi - lo.
    a = 4.0
    for lo, hi in ((0.0, 0.1), (0.4, 0.6), (0.9, 1.0)):
        exact = (math.exp(a * hi) - math.exp(a * lo) + math.exp(a * (1 - lo)) - math.exp(a * (1 - hi))) / (
            2 * math.expm1(a))
        share = ((t >= lo) & (t < hi)).float().mean().item()
        assert abs(share - exact) < 0.004, (lo, hi, share, exact)

    # The interval t - r: a logit-normal pinned at 0.1 (tiny std) gives r = t - 0.1 wherever no rule applies.
    pinned = methods.get("re_meanflow", toy_net(), (2,), interval_mean=math.log(0.1 / 0.9), interval_std=1e-6,
                         flow_matching_share=0.0)
    t, r = pinned.sample_time_pair(n, "cpu")
    free = t >= 0.1
    assert torch.allclose((t - r)[free], torch.full_like(t[free], 0.1), atol=1e-5)
    assert (r[~free] < 1e-6).all()  # a jump longer than t ends at the data


def test_a_short_training_learns_the_one_step_map_far_better_than_the_teachers_euler_step(tmp_path):
    """The teacher's single Euler step lands every sample on the data mean (error STD E|n| ~ 0.38)."""
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    teacher_error = (exact_teacher().sample(noise, 1) - (MU + STD * noise)).norm(dim=1).mean().item()
    assert teacher_error > 0.3
    method = attached(tmp_path)
    untrained = one_step_error(method)
    optimizer = torch.optim.AdamW(method.net.parameters(), lr=3e-3)
    # A linear decay: at a constant rate the last iterate's error swings between 0.01 and 0.08 from seed to seed.
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.02, total_iters=300)
    for _ in range(300):
        loss = method.loss(torch.zeros(256, 2), None).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    assert one_step_error(method) < 0.05 < teacher_error / 6 and untrained > 1.0, (one_step_error(method), untrained)


@pytest.mark.parametrize("options, match", [
    ({"distance_clip": 0.0}, "distance_clip"), ({"distance_quantile": 1.5}, "distance_quantile"),
    ({"distance_clip": 0.8, "distance_quantile": 0.9}, "not both"), ({"time_exponent": 0.0}, "time_exponent"),
    ({"interval_std": 0.0}, "interval_std"), ({"zero_r_below": 1.5}, "zero_r_below"),
    ({"flow_matching_share": 1.2}, "flow_matching_share"), ({"adaptive_eps": 0.0}, "adaptive_eps"),
    ({"jvp_mode": "reverse"}, "jvp_mode"), ({"pairs": 0}, "pairs"), ({"consistency_ratio": 0.25}, "unknown option"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get("re_meanflow", toy_net(), (2,), **options)


def test_without_a_teacher_it_says_how_to_get_one():
    with pytest.raises(JumpflowError, match="jumpflow distill"):
        methods.get("re_meanflow", toy_net(), (2,)).loss(torch.zeros(8, 2), None)


# --- the whole path: a trained teacher, `jumpflow distill`, resume ---------------------------------------------------
def test_distill_end_to_end_starts_from_the_teacher_and_resumes_exactly(teacher_run, tmp_path):
    changes = {"steps": 12, "batch_size": 64, "progress": False, "sample_every": 0, "checkpoint_every": 6,
               "pairs": 200, "teacher_steps": 4, "pair_cache": str(tmp_path / "pairs"), "distance_quantile": 0.9}
    whole = jumpflow.api.distill(teacher_run, "re_meanflow", tmp_path / "whole", changes)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("self_check", {}).get("ok") == 1.0 for r in records)  # the JVP check ran on coupled points
    cfg = jumpflow.TrainConfig.load(tmp_path / "whole" / "config.yaml")
    assert cfg.method == "re_meanflow" and cfg.method_options["distance_quantile"] == 0.9
    start = Trainer(cfg, tmp_path / "start").method.net  # init_from_teacher (the default): the teacher's weights
    teacher = Teacher.from_checkpoint(teacher_run).net
    assert all(torch.equal(p, q) for p, q in zip(start.parameters(), teacher.parameters()))

    jumpflow.api.train(cfg, tmp_path / "cut", stop_after=9)  # stopped after its step-6 checkpoint
    jumpflow.api.distill(None, None, tmp_path / "cut", {"progress": False}, resume=True)
    a, b = jumpflow.load(whole), jumpflow.load(tmp_path / "cut")
    for (name, p), q in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(p, q), name
    for steps in (1, 2):  # MeanFlow's flow-map jumps, without the teacher
        assert torch.isfinite(a.generate(16, steps=steps, seed=0)).all()
