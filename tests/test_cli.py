import json
import subprocess
import sys

import numpy as np
import pytest

from jumpflow.cli import main

TINY = ["--data", "8gaussians", "--batch-size", "32", "backbone_options={width: 32, depth: 1}",
        "sample_every=0", "checkpoint_every=0", "progress=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--method", "meanflow", "--steps", "6", "--out", str(out), "--seed", "3",
                 "--lr", "2e-3", "adaptive_power=0.75", *TINY]) == 0
    return out


def test_train_saves_the_resolved_config_with_flags_and_overrides(run_dir):
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["seed"] == 3 and cfg["lr"] == 2e-3 and cfg["steps"] == 6
    assert cfg["method_options"] == {"adaptive_power": 0.75}
    assert cfg["backbone_options"] == {"width": 32, "depth": 1}


def test_sample_then_eval_round_trip_with_flow_map_error(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run_dir), "--n", "300", "--steps", "1", "--seed", "1", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["samples"].shape == (300, 2) and f["noise"].shape == (300, 2)
    capsys.readouterr()
    assert main(["eval", "--samples", str(out), "--data", "8gaussians"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("sliced_wasserstein", "sliced_wasserstein_floor", "log_likelihood", "flow_map_error"):
        assert np.isfinite(metrics[key]), key


def test_given_noise_reproduces_samples(run_dir, tmp_path):
    noise = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    for name in ("a.npy", "b.npy"):
        assert main(["sample", "--ckpt", str(run_dir), "--noise", str(tmp_path / "noise.npy"), "--steps", "2",
                     "--out", str(tmp_path / name)]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (50, 2) and np.array_equal(a, b)
    assert main(["sample", "--ckpt", str(run_dir), "--n", "50", "--seed", "9", "--out", str(tmp_path / "c.npy")]) == 0
    assert not np.array_equal(a, np.load(tmp_path / "c.npy"))


def test_sample_png_is_written(run_dir, tmp_path):
    assert main(["sample", "--ckpt", str(run_dir), "--n", "200", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_json_lists_both_methods_with_their_papers(capsys):
    assert main(["methods", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert {"flow_matching", "meanflow"} <= set(entries)
    for e in entries.values():
        assert e["kind"] in ("from_scratch", "distillation", "peer") and e["paper"] and isinstance(e["defaults"], dict)
    assert entries["meanflow"]["defaults"]["adaptive_power"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "nope", "--out", "{tmp}/a"],
     "valid methods: align_your_flow, consistency_distillation, dmd2, ect, "),
    (["train", "--data", "nope", "--out", "{tmp}/a"], "valid datasets"),
    (["train", "--backbone", "resnet", "--out", "{tmp}/a", "--steps", "1"], "valid backbones"),
    (["train", "--out", "{tmp}/a", "lr"], "not key=value"),
    (["train", "--out", "{tmp}/a", "learning_rate=3"], "unknown config key 'learning_rate'"),
    (["train", "--out", "{tmp}/a", "--steps", "-5"], "steps must be a positive"),
    (["train", "--out", "{tmp}/a", "--preset", "huge"], "valid presets"),
    (["train", "--data", "{tmp}/bad_shape.npy", "--out", "{tmp}/a", "--steps", "1"], "dims"),
    (["train", "--data", "{tmp}/has_nan.npy", "--out", "{tmp}/a", "--steps", "1"], "NaN"),
    (["sample", "--ckpt", "{tmp}/missing", "--n", "2", "--out", "{tmp}/x.npy"], "does not exist"),
    (["sample", "--ckpt", "{tmp}/corrupt.safetensors", "--n", "2", "--out", "{tmp}/x.npy"], "corrupt"),
    (["eval", "--samples", "{tmp}/bad_shape.npy", "--data", "checkerboard"], "shape"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, argv, message):
    np.save(tmp_path / "bad_shape.npy", np.zeros((4, 2, 2, 2, 2), dtype=np.float32))
    np.save(tmp_path / "has_nan.npy", np.array([[0.0, np.nan], [1.0, 2.0], [0.5, 0.5]], dtype=np.float32))
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_existing_run_is_refused_by_the_cli(run_dir, capsys):
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert main(["train", "--method", "meanflow", "--steps", "6", "--out", str(run_dir), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_resume_continues_a_run_to_more_steps(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--out", str(copy), "--resume", "--steps", "8", "progress=false"]) == 0
    assert (copy / "checkpoints" / "step_0000008.safetensors").exists()
    assert main(["train", "--out", str(copy), "--resume", "progress=false"]) == 0  # saved steps (8) are kept
    from jumpflow.checkpoint import list_checkpoints

    assert max(list_checkpoints(copy)) == 8


def test_resume_refuses_to_change_the_recipe(run_dir, capsys):
    assert main(["train", "--out", str(run_dir), "--resume", "--lr", "0.5"]) == 2
    assert "cannot change lr when resuming" in capsys.readouterr().err


def test_the_installed_entry_point_reports_errors_with_a_nonzero_exit():
    proc = subprocess.run([sys.executable, "-m", "jumpflow", "train", "--method", "nope", "--out", "/tmp/x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown method 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert subprocess.run([sys.executable, "-m", "jumpflow", "--help"], capture_output=True).returncode == 0


def test_digits_preset_builds_and_trains_a_step(tmp_path):
    out = tmp_path / "digits"
    assert main(["train", "--preset", "digits", "--method", "flow_matching", "--steps", "1", "--batch-size", "4",
                 "--out", str(out), "progress=false"]) == 0
    import jumpflow

    model = jumpflow.load(out)
    assert model.generate(3, steps=2, seed=0).shape == (3, 1, 8, 8)
    assert (out / "samples" / "step_0000001.png").exists()


def test_eval_scores_image_samples_on_the_digits_feature_net(tmp_path, capsys):
    from jumpflow import data

    digits = data.load("digits")
    np.save(tmp_path / "real.npy", digits.train[:200].numpy())
    np.save(tmp_path / "noise.npy", np.clip(np.random.default_rng(0).normal(size=(200, 1, 8, 8)), -1, 1))
    scores = {}
    for name in ("real", "noise"):
        assert main(["eval", "--samples", str(tmp_path / f"{name}.npy"), "--data", "digits"]) == 0
        scores[name] = json.loads(capsys.readouterr().out)
    assert scores["real"]["fd"] < 0.2 * scores["noise"]["fd"]
    assert scores["real"]["recall"] > 0.5 > scores["noise"]["recall"]
    assert "fd_floor" in scores["real"]
