"""Reflow and InstaFlow against an exact teacher, and the whole `jumpflow distill` path on a trained one."""

import json

import pytest
import torch

import jumpflow
from jumpflow import methods
from jumpflow.distill import Teacher
from jumpflow.errors import JumpflowError
from tests.distill.helpers import train_on_pairs
from tests.gaussian import ExactGaussian
from tests.methods.toy_training import toy_net

MU, STD = torch.tensor([1.5, -1.0]), 0.3
EXACT = ExactGaussian(MU.double(), STD)
HEUN = {"teacher_solver": "heun", "teacher_steps": 50}  # pairs within 2e-3 of the exact map (100 Euler steps: 2e-2)


def exact_teacher() -> Teacher:
    """The exact flow-matching velocity of N(MU, STD^2 I) data, whose 1 -> 0 flow map is z -> MU + STD z."""
    return Teacher.from_velocity(lambda z, t, labels: EXACT.velocity(z.double(), t.double()).float(), (2,),
                                 teacher_id="exact-gaussian")


def distilled(name, tmp_path, steps=300, **options):
    """`name` trained for `steps` AdamW steps on the exact teacher's 2048 pairs."""
    torch.manual_seed(0)
    method = methods.get(name, toy_net(), (2,), pairs=2048, pair_cache=str(tmp_path / "pairs"), **HEUN, **options)
    return train_on_pairs(method, exact_teacher(), tmp_path, steps)


def one_step_error(method, n=2000):
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(5))
    exact = MU + STD * noise  # the exact flow map of the Gaussian
    return (method.sample(noise, 1) - exact).norm(dim=1).mean().item()


def test_the_exact_teachers_pairs_are_its_flow_map(tmp_path):
    method = methods.get("reflow", toy_net(), (2,), pairs=1000, pair_cache=str(tmp_path / "pairs"), **HEUN)
    method.attach_teacher(exact_teacher(), tmp_path)
    noise, sample, labels = method.pair_batch(500, "cpu")
    assert labels is None and (sample - (MU + STD * noise)).norm(dim=1).max() < 2e-3


def test_reflow_straightens_the_flow_so_one_euler_step_lands_on_the_map(tmp_path):
    """The teacher's coupling z_1 -> MU + STD z_1 is a straight line for every pair, so the reflowed velocity is
    constant along its paths and one Euler step is exact; the teacher's own one Euler step returns the data mean
    (its error is the whole spread, STD * E|z| ~ 0.38)."""
    teacher_error = (exact_teacher().sample(torch.randn(2000, 2), 1) - MU).norm(dim=1).mean().item()
    assert teacher_error < 1e-5  # one step of the teacher: every sample at the mean
    method = distilled("reflow", tmp_path)
    assert one_step_error(method) < 0.06, one_step_error(method)


def test_instaflow_learns_the_one_step_map_and_samples_only_in_one_step(tmp_path):
    method = distilled("instaflow", tmp_path)
    assert one_step_error(method) < 0.06, one_step_error(method)
    with pytest.raises(JumpflowError, match="one step"):
        method.sample(torch.randn(4, 2), 2)


def test_a_pair_method_without_a_teacher_says_how_to_get_one():
    method = methods.get("reflow", toy_net(), (2,))
    with pytest.raises(JumpflowError, match="jumpflow distill"):
        method.loss(torch.zeros(8, 2), None)


@pytest.mark.parametrize("options, match", [({"pairs": 0}, "pairs"), ({"teacher_solver": "rk4"}, "solver"),
                                            ({"distance": "lpips"}, "distance")])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get("instaflow", toy_net(), (2,), **options)


# --- the whole path: a trained teacher, `jumpflow distill`, resume, load ------------------------------------------
def student_changes(tmp_path, **more):
    return {"steps": 20, "batch_size": 64, "progress": False, "sample_every": 0, "checkpoint_every": 10,
            "pairs": 300, "teacher_steps": 8, "pair_cache": str(tmp_path / "pairs"), **more}


def test_distill_takes_the_teachers_data_and_backbone_and_resumes_exactly(teacher_run, tmp_path):
    whole = jumpflow.api.distill(teacher_run, "reflow", tmp_path / "whole", student_changes(tmp_path))
    cfg = jumpflow.TrainConfig.load(tmp_path / "whole" / "config.yaml")
    assert cfg.data == "8gaussians" and cfg.backbone_options == {"width": 32, "depth": 2}
    assert cfg.teacher.endswith(".safetensors") and cfg.method_options["pairs"] == 300

    jumpflow.api.train(cfg, tmp_path / "cut", stop_after=15)  # killed at step 15, after its step-10 checkpoint
    jumpflow.api.distill(None, None, tmp_path / "cut", {"progress": False}, resume=True)
    a, b = jumpflow.load(whole), jumpflow.load(tmp_path / "cut")
    for (name, p), q in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(p, q), name
    # The student samples like any run, without its teacher.
    assert a.generate(16, steps=1, seed=0).shape == (16, 2)


def test_the_student_starts_from_the_teacher_unless_told_not_to(teacher_run, tmp_path):
    from jumpflow.train import Trainer

    teacher = Teacher.from_checkpoint(teacher_run)
    for start in (True, False):
        cfg = jumpflow.api.distill_config(teacher_run, "reflow", student_changes(tmp_path, init_from_teacher=start))
        trainer = Trainer(cfg, tmp_path / f"start-{start}")
        for net in (trainer.method.net, trainer.ema.shadow):  # the EMA copy is taken after the start
            same = all(torch.equal(p, q) for p, q in zip(net.parameters(), teacher.net.parameters()))
            assert same == start


def test_distill_refuses_what_it_cannot_do(teacher_run, tmp_path):
    with pytest.raises(JumpflowError, match="trains from data"):
        jumpflow.api.distill(teacher_run, "meanflow", tmp_path / "a")
    with pytest.raises(JumpflowError, match="unknown method|valid"):
        jumpflow.api.distill(teacher_run, "dmd7", tmp_path / "b")
    with pytest.raises(JumpflowError, match="takes no teacher"):
        jumpflow.api.train({"method": "meanflow", "data": "8gaussians", "teacher": str(teacher_run), "steps": 1,
                            "progress": False}, tmp_path / "c")
    with pytest.raises(JumpflowError, match="distils a teacher"):
        jumpflow.api.train({"method": "reflow", "data": "8gaussians", "steps": 1, "progress": False}, tmp_path / "d")
    with pytest.raises(JumpflowError, match="shape"):
        jumpflow.api.train({"method": "reflow", "data": "digits", "teacher": str(teacher_run), "steps": 1,
                            "progress": False}, tmp_path / "e")


def test_cli_distill_then_sample(teacher_run, tmp_path, capsys):
    from jumpflow.cli import main

    args = ["distill", "--teacher", str(teacher_run), "--method", "reflow", "--steps", "10", "--out",
            str(tmp_path / "s"), "progress=false", "pairs=200", "teacher_steps=4", f"pair_cache={tmp_path / 'p'}"]
    assert main(args) == 0
    assert "teacher pairs" not in capsys.readouterr().err  # progress=false silences the pair cache's bar too
    assert main(["sample", "--ckpt", str(tmp_path / "s"), "--n", "8", "--steps", "1",
                 "--out", str(tmp_path / "x.npy")]) == 0
    assert main(["distill", "--teacher", str(teacher_run), "--method", "ict", "--out", str(tmp_path / "t")]) == 2
    assert "trains from data" in capsys.readouterr().err
    listed = {e["name"]: e["kind"] for e in json.loads(_methods_json(main, capsys))}
    assert listed["reflow"] == listed["instaflow"] == "distillation"


def _methods_json(main, capsys):
    capsys.readouterr()
    main(["methods", "--json"])
    return capsys.readouterr().out


def test_a_smaller_student_than_its_teacher_trains_from_its_own_start(teacher_run, tmp_path):
    """SlimFlow's situation: the student's backbone is narrower, so the teacher's weights cannot be its start."""
    from jumpflow.train import Trainer

    cfg = jumpflow.api.distill_config(teacher_run, "reflow", student_changes(
        tmp_path, backbone="mlp", backbone_options={"width": 16, "depth": 1}))
    trainer = Trainer(cfg, tmp_path / "small")
    student = sum(p.numel() for p in trainer.method.net.parameters())
    teacher = sum(p.numel() for p in Teacher.from_checkpoint(teacher_run).net.parameters())
    assert student < teacher / 3
    first = [p.detach().clone() for p in trainer.method.net.parameters()]
    trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(first, trainer.method.net.parameters()))
    assert jumpflow.load(tmp_path / "small").generate(8, steps=1, seed=0).shape == (8, 2)
