import json

import pytest
import torch
from safetensors.torch import load_file

import jumpflow
from jumpflow import TrainConfig
from jumpflow.checkpoint import list_checkpoints
from jumpflow.errors import JumpflowError, TrainingDiverged
from jumpflow.methods.flow_matching import FlowMatching


def tiny(**overrides) -> TrainConfig:
    values = dict(method="meanflow", data="8gaussians", steps=12, batch_size=32, lr=1e-3, warmup_steps=3,
                  backbone_options={"width": 32, "depth": 1}, log_every=2, sample_every=0, checkpoint_every=4,
                  keep_checkpoints=10, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path):
    full = jumpflow.train(tiny(), tmp_path / "full")
    jumpflow.train(tiny(), tmp_path / "cut", stop_after=6)  # killed at step 6: last checkpoint is step 4
    assert max(list_checkpoints(tmp_path / "cut")) == 4
    resumed = jumpflow.train(tiny(), tmp_path / "cut", resume=True)
    a, b = load_file(str(full)), load_file(str(resumed))
    assert set(a) == set(b)
    for key in a:
        if key.startswith(("model.", "ema.", "optim.")):
            assert torch.equal(a[key], b[key]), key
    # and the run really trained: weights moved away from their initial values
    first = load_file(str(list_checkpoints(tmp_path / "full")[4]))
    assert not torch.equal(first["model.net.out.weight"], a["model.net.out.weight"])


def test_run_directory_holds_config_metrics_pictures_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    jumpflow.train(tiny(steps=8, sample_every=4, method_options={"adaptive_power": 0.75}), out)
    saved = TrainConfig.load(out / "config.yaml")
    assert saved.method_options == {"adaptive_power": 0.75} and saved.steps == 8
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(set(r) >= {"loss", "lr", "grad_norm", "mse"} for r in records)
    assert records[0]["lr"] < records[-1]["lr"] == 1e-3  # linear warm-up, then constant
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000004.png", "step_0000008.png"]
    assert sorted(list_checkpoints(out)) == [4, 8]


def test_old_checkpoints_are_pruned_to_keep_checkpoints(tmp_path):
    jumpflow.train(tiny(keep_checkpoints=2), tmp_path / "run")
    assert sorted(list_checkpoints(tmp_path / "run")) == [8, 12]


def test_existing_run_is_refused_without_resume_and_left_untouched(tmp_path):
    out = tmp_path / "run"
    ckpt = jumpflow.train(tiny(steps=4), out)
    before = ckpt.read_bytes()
    with pytest.raises(JumpflowError, match="--resume"):
        jumpflow.train(tiny(steps=4), out)
    assert ckpt.read_bytes() == before


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = FlowMatching.loss

    def poisoned(self, x, labels):
        calls["n"] += 1
        out = real_loss(self, x, labels)
        if calls["n"] > 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(FlowMatching, "loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 6.*step_0000004"):
        jumpflow.train(tiny(method="flow_matching"), out)
    assert sorted(list_checkpoints(out)) == [4]
    assert jumpflow.load(out).step == 4  # the kept checkpoint is whole and loads


def test_checkpoint_alone_samples_with_ema_weights_and_fixed_noise(tmp_path):
    ckpt = jumpflow.train(tiny(), tmp_path / "run")
    model = jumpflow.load(ckpt)
    noise = torch.randn(16, 2)
    a = model.generate(noise=noise, steps=1)
    b = jumpflow.load(tmp_path / "run").generate(noise=noise, steps=1)
    assert torch.equal(a, b) and a.shape == (16, 2)
    ema = load_file(str(ckpt))
    assert torch.equal(model.net.out.weight, ema["ema.out.weight"])
    assert not torch.equal(ema["ema.out.weight"], ema["model.net.out.weight"])
    assert torch.equal(model.generate(4, seed=3), model.generate(4, seed=3))


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(JumpflowError, match="does not exist"):
        jumpflow.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01not a checkpoint")
    with pytest.raises(JumpflowError, match="corrupt"):
        jumpflow.load(bad)
    ckpt = jumpflow.train(tiny(steps=4), tmp_path / "run")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(JumpflowError, match="corrupt"):
        jumpflow.load(truncated)
    with pytest.raises(JumpflowError, match="no checkpoint"):
        jumpflow.load(tmp_path)


def test_vector_files_are_standardised_and_samples_come_back_in_data_space(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    data = rng.normal(size=(512, 3)) * np.array([100.0, 1.0, 0.01]) + np.array([1000.0, 0.0, -5.0])
    np.save(tmp_path / "data.npy", data.astype(np.float32))
    ckpt = jumpflow.train(tiny(data=str(tmp_path / "data.npy"), method="flow_matching", steps=4), tmp_path / "run")
    samples = jumpflow.load(ckpt).generate(256, steps=2, seed=0)
    assert abs(samples[:, 0].mean().item() - 1000.0) < 50  # decoded back to the data's own scale
    assert abs(samples[:, 2].mean().item() + 5.0) < 0.5


def test_meanflow_runs_its_jvp_self_check_before_training(tmp_path):
    out = tmp_path / "run"
    jumpflow.train(tiny(steps=2), out)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["self_check"]["ok"] == 1.0
    assert first["self_check"]["jvp_relative_error"] < 1e-2
    assert first["self_check"]["jvp_norm"] > 1e-3  # not vacuous although the backbone's output layer starts at zero


def test_failed_self_check_stops_before_any_step(tmp_path, monkeypatch):
    from jumpflow.methods.meanflow import MeanFlow

    monkeypatch.setattr(MeanFlow, "self_check", lambda self, x, labels: {"jvp_relative_error": 0.7, "ok": 0.0})
    with pytest.raises(JumpflowError, match="finite_difference"):
        jumpflow.train(tiny(), tmp_path / "run")
    assert not list_checkpoints(tmp_path / "run")


def test_bf16_autocast_applies_to_flow_matching_and_not_to_meanflows_fp32_jvp(tmp_path):
    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    for method in ("meanflow", "flow_matching"):
        bf16 = losses(jumpflow.train(tiny(method=method, steps=4, precision="bf16"), tmp_path / method).parents[1])
        fp32 = losses(jumpflow.train(tiny(method=method, steps=4), tmp_path / f"{method}-fp32").parents[1])
        assert all(torch.isfinite(torch.tensor(bf16)))
        if method == "flow_matching":
            assert bf16 != fp32  # same seed: only the precision differs, so autocast really ran
        else:  # MeanFlow's u comes out of the JVP, which runs with autocast off (METHODS.md C.3): fp32 throughout
            assert bf16 == fp32


def test_cosine_schedule_warms_up_then_decays_to_zero(tmp_path):
    from jumpflow.train import Trainer

    trainer = Trainer(tiny(steps=103, warmup_steps=3, lr_schedule="cosine"), tmp_path / "run")
    rates = [trainer.learning_rate(step) for step in range(103)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[3:], rates[4:])) and rates[-1] < 1e-6
    with pytest.raises(JumpflowError, match="lr_schedule"):
        tiny(lr_schedule="linear").validate()


def test_time_limit_ends_training_with_a_checkpoint_and_the_clock_survives_resume(tmp_path, monkeypatch):
    import importlib

    from jumpflow.checkpoint import load_checkpoint

    train_module = importlib.import_module("jumpflow.train")  # the module, not the jumpflow.train function

    clock = iter(range(10**6))  # a fake clock: every reading is one second later, so the test does not time anything
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: float(next(clock)))
    out = tmp_path / "run"
    jumpflow.train(tiny(steps=10_000, time_limit_s=20.0, checkpoint_every=0), out)
    _, meta = load_checkpoint(list_checkpoints(out)[max(list_checkpoints(out))])
    first_step, first_seconds = int(meta["step"]), float(meta["train_seconds"])
    assert 0 < first_step < 10_000 and first_seconds >= 20.0
    assert (out / "samples" / f"step_{first_step:07d}.png").exists()

    jumpflow.train({"time_limit_s": 40.0}, out, resume=True)
    _, meta = load_checkpoint(list_checkpoints(out)[max(list_checkpoints(out))])
    assert int(meta["step"]) > first_step and 40.0 <= float(meta["train_seconds"]) < 40.0 + first_seconds


def test_negative_time_limit_is_refused():
    with pytest.raises(JumpflowError, match="time_limit_s"):
        tiny(time_limit_s=-1.0).validate()


def test_methods_see_the_trainers_ema_student_without_saving_it_twice(tmp_path):
    from jumpflow.train import Trainer

    trainer = Trainer(tiny(), tmp_path / "run")
    assert trainer.method.ema_net is trainer.ema.shadow and trainer.method.ema_net is not trainer.method.net
    assert not any(k.startswith("_ema_net") for k in trainer.method.state_dict())
    ckpt = jumpflow.train(tiny(steps=4), tmp_path / "run2")
    assert not any(".ema_net." in k or k.startswith("model._ema") for k in load_file(str(ckpt)))


class TwoOptimizers(FlowMatching):
    """Flow matching plus an auxiliary 'critic' net with its own optimizer at half the lr, updated twice per step
    before the student (a two-time-scale rule, as DMD2's fake-score net)."""

    name = "two_optimizers_test"

    def __init__(self, net, config, shape, num_classes=0):
        super().__init__(net, config, shape, num_classes)
        self.critic = torch.nn.Linear(2, 2)

    def optimizers(self):
        return {"net": (list(self.net.parameters()), 1.0), "critic": (list(self.critic.parameters()), 0.5)}

    def updates(self, step):
        return ("critic", "critic", "net")

    def update_loss(self, name, x, labels):
        if name == "critic":
            loss = (self.critic(x) - x.flip(1)).pow(2).mean()
            return jumpflow.methods.LossOutput(loss, {"fit": loss.detach()})
        return self.loss(x, labels)


def test_several_optimizers_update_in_the_methods_order_and_resume_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(jumpflow.methods.METHODS._entries, TwoOptimizers.name, TwoOptimizers)
    cfg = tiny(method=TwoOptimizers.name, checkpoint_every=6, log_every=6)
    jumpflow.train(cfg, tmp_path / "whole")
    jumpflow.train(tiny(method=TwoOptimizers.name, checkpoint_every=6, log_every=6), tmp_path / "cut", stop_after=8)
    jumpflow.train({}, tmp_path / "cut", resume=True)
    a = load_file(str(list_checkpoints(tmp_path / "whole")[12]))
    b = load_file(str(list_checkpoints(tmp_path / "cut")[12]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("model.critic.") for k in a) and any(k.startswith("optim_critic.") for k in a)
    assert a["optim_critic.0.step"].item() == 24 and a["optim.0.step"].item() == 12  # two critic updates a step
    record = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")][-1]
    assert {"critic.loss", "critic.grad_norm", "critic.fit"} <= record.keys()
    middle = load_file(str(list_checkpoints(tmp_path / "whole")[6]))
    assert not torch.equal(a["model.critic.weight"], middle["model.critic.weight"])  # the critic did train
