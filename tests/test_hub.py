"""Sharing a trained model: Hub-layout export, offline/online loading, describe, pictures, CLI export."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import jumpflow
from jumpflow import api
from jumpflow.cli import main
from jumpflow.errors import JumpflowError
from jumpflow.plots import image_grid

TINY_MLP = {"batch_size": 32, "backbone_options": {"width": 32, "depth": 1}, "sample_every": 0,
            "checkpoint_every": 0, "progress": False, "log_every": 1, "lr": 2e-3}
TINY_UNET = {"channels": 8, "channel_mult": [1], "num_res_blocks": 1, "head_channels": 8, "frequency_dim": 32}


def tiny_run(out, **changes):
    api.train({**TINY_MLP, "steps": 4, **changes}, out)
    return out


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    """2-D data far from zero mean / unit scale with 3 labels: the export must carry the scaler and the classes."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=600)
    x = np.stack([50.0 + 10.0 * y + rng.normal(size=600), -3.0 + 0.1 * rng.normal(size=600)], 1).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory, labelled_file):
    """A class-conditional MeanFlow run on standardised file data, scored like a `jumpflow bench` cell."""
    cell = tmp_path_factory.mktemp("bench") / "blobs" / "meanflow"
    run = tiny_run(cell / "run", method="meanflow", data=str(labelled_file), class_conditional=True, seed=1)
    model = jumpflow.load(run)
    rows = []
    for k in (1, 2):  # what bench's evaluate_cell writes beside the run: metrics of this checkpoint per NFE
        samples = model.generate(256, steps=k, seed=0)
        rows.append({"method": "meanflow", "steps": k, "nfe": k, "train_step": model.step, "final": True,
                     "dataset": "blobs", "metrics": {"mean_error": float((samples.mean(0) - 60).abs().sum()),
                                                     "mean_error_floor": 0.01}})
    (cell / "rows.json").write_text(json.dumps({"key": "test", "rows": rows}))
    return run


@pytest.fixture(scope="module")
def hub_dir(vector_run, tmp_path_factory):
    return jumpflow.load(vector_run).save_pretrained(tmp_path_factory.mktemp("export") / "hub")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    api.train({**TINY_MLP, "method": "flow_matching", "data": "digits", "steps": 1, "batch_size": 4,
               "backbone": "unet", "backbone_options": TINY_UNET, "class_conditional": True,
               "method_options": {"class_dropout": 0.5}}, out)
    return out


@pytest.fixture(scope="module")
def fresh_process(hub_dir, tmp_path_factory):
    """One new Python process, offline: samples from from_pretrained(dir), and the errors a repo id and a push give."""
    tmp = tmp_path_factory.mktemp("fresh")
    script = textwrap.dedent(f"""
        import json, numpy as np, torch
        torch.set_num_threads(1)
        import jumpflow
        model = jumpflow.from_pretrained({str(hub_dir)!r})
        np.save({str(tmp / "samples.npy")!r}, model.generate(64, steps=2, seed=7, cls=1).numpy())
        errors = {{}}
        for name, call in (("download", lambda: jumpflow.from_pretrained("jumpflow-tests/no-such-model")),
                           ("push", lambda: model.push_to_hub("jumpflow-tests/no-such-model"))):
            try:
                call()
            except jumpflow.JumpflowError as e:
                errors[name] = str(e)
        print(json.dumps(errors))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {"samples": np.load(tmp / "samples.npy"), "errors": json.loads(proc.stdout.strip().splitlines()[-1])}


def test_export_in_a_fresh_process_gives_the_same_samples_bytes(vector_run, fresh_process):
    ours = jumpflow.load(vector_run).generate(64, steps=2, seed=7, cls=1).numpy()
    assert fresh_process["samples"].tobytes() == ours.tobytes()
    assert np.abs(ours[:, 0] - 60).max() < 200  # decoded to data units, not left standardised near 0


def test_offline_repo_id_and_push_fail_with_clear_messages(fresh_process):
    pytest.importorskip("huggingface_hub")  # without it the message names the extra instead (tested below)
    errors = fresh_process["errors"]
    assert "offline mode is on" in errors["download"] and "jumpflow-tests/no-such-model" in errors["download"]
    assert "offline mode is on" in errors["push"] and "save_pretrained" in errors["push"]


def test_export_holds_ema_weights_and_scaler_only(vector_run, hub_dir):
    from safetensors import safe_open

    files = sorted(p.name for p in hub_dir.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    run = jumpflow.load(vector_run)
    with safe_open(str(hub_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "jumpflow-hub-1"
        keys = set(f.keys())
        assert not any(k.startswith(("optim", "rng", "model.")) for k in keys)
        for name, value in run.net.state_dict().items():
            assert torch.equal(f.get_tensor(f"ema.{name}"), value)
        assert torch.equal(f.get_tensor("scaler.mean"), run.scaler.mean)
    config = json.loads((hub_dir / "config.json").read_text())
    assert config["method"] == "meanflow" and config["jumpflow_version"] == jumpflow.__version__
    assert config["data"]["num_classes"] == 3 and config["scaler"]["kind"] == "standard"
    assert config["step"] == 4 and config["config"]["backbone_options"] == {"width": 32, "depth": 1}


def test_load_reads_an_export_like_a_run(vector_run, hub_dir):
    run, exported = jumpflow.load(vector_run), jumpflow.load(hub_dir)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run.generate(noise=noise, steps=1, cls=2), exported.generate(noise=noise, steps=1, cls=2))
    assert exported.step == run.step and exported.train_seconds == pytest.approx(run.train_seconds, abs=1e-3)
    assert exported.describe() == run.describe()


def test_describe_says_what_the_model_is(vector_run, image_run):
    d = jumpflow.load(vector_run).describe()
    assert d["method"] == "meanflow" and "Mean Flows" in d["paper"]
    assert d["data"] == {"name": "blobs", "kind": "vector", "shape": [2]} and d["classes"] == [0, 1, 2]
    assert d["steps"] == [1, 2, 4, 8, 16, 32, 64, 128] and d["nfe"] == d["steps"] and d["default_steps"] == 1
    assert d["max_steps"] is None and d["guidance"] is False and d["training_step"] == 4
    image = jumpflow.load(image_run).describe()
    assert image["data"]["shape"] == [1, 8, 8] and image["num_classes"] == 10 and image["guidance"] is True
    assert 100 in image["steps"]  # flow matching's own default step count is offered too
    json.dumps(d), json.dumps(image)  # plain JSON values, for a web page


def test_guidance_goes_to_samplers_that_take_it_and_is_refused_elsewhere(vector_run, image_run):
    with pytest.raises(JumpflowError, match="this model takes no guidance"):
        jumpflow.load(vector_run).generate(4, seed=0, cls=1, guidance=2.0)
    model = jumpflow.load(image_run)
    plain = model.generate(4, steps=2, seed=0, cls=3)
    assert torch.equal(model.generate(4, steps=2, seed=0, cls=3, guidance=1.0), plain)  # w = 1 is no guidance
    assert not torch.allclose(model.generate(4, steps=2, seed=0, cls=3, guidance=3.0), plain)
    with pytest.raises(JumpflowError, match="give one"):
        model.generate(4, steps=2, seed=0, guidance=3.0)
    with pytest.raises(JumpflowError, match="finite number"):
        model.generate(4, steps=2, seed=0, cls=3, guidance=float("nan"))


def test_model_card_names_method_data_nfe_and_measured_metrics(vector_run, hub_dir, tmp_path):
    card = (hub_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: jumpflow\n")
    assert "# meanflow on blobs" in card and "Geng et al. 2025, Mean Flows" in card
    assert "3 classes" in card and "| 2 | 2 |" in card
    last = [json.loads(line) for line in (vector_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert f"Training log at step 4: loss {last['loss']:.4g}" in card
    rows = json.loads((vector_run.parent / "rows.json").read_text())["rows"]
    assert f"| 1 | 1 | {rows[0]['metrics']['mean_error']:.4g} (floor 0.01) |" in card
    assert "No evaluation was recorded" not in card
    # a checkpoint copied out of its run has no records: the card says so
    ckpt = next((vector_run / "checkpoints").iterdir())
    lone = tmp_path / ckpt.name
    lone.write_bytes(ckpt.read_bytes())
    lone_card = (jumpflow.load(lone).save_pretrained(tmp_path / "lone") / "README.md").read_text()
    assert "No evaluation was recorded for this run" in lone_card
    # re-exporting an export keeps the measurements it carried
    again = jumpflow.load(hub_dir).save_pretrained(tmp_path / "again")
    assert (again / "README.md").read_text() == card


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage"), "corrupt"),
    (lambda d: (d / "model.safetensors").unlink(), "missing"),
    (lambda d: (d / "config.json").write_text('{"format": "jumpflow-hub-1", "method": '), "corrupt"),
])
def test_damaged_export_is_a_clear_error(hub_dir, tmp_path, damage, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(hub_dir, copy)
    damage(copy)
    with pytest.raises(JumpflowError, match=message):
        jumpflow.from_pretrained(copy)


def test_a_checkpoint_renamed_to_model_safetensors_is_refused(vector_run, hub_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(hub_dir, copy)
    (copy / "model.safetensors").write_bytes(next((vector_run / "checkpoints").iterdir()).read_bytes())
    with pytest.raises(JumpflowError, match="not a jumpflow export"):
        jumpflow.load(copy)


def test_overwrite_refusal_keeps_the_old_files(vector_run, tmp_path):
    model = jumpflow.load(vector_run)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(JumpflowError, match="not empty and holds no jumpflow export"):
        model.save_pretrained(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind
    model.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model.save_pretrained(target)  # an export is replaced without asking
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_missing_hub_package_names_the_extra(monkeypatch, vector_run):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(JumpflowError, match=r"jumpflow\[hub\]"):
        jumpflow.from_pretrained("someone/some-model")
    with pytest.raises(JumpflowError, match=r"jumpflow\[hub\]"):
        jumpflow.load(vector_run).push_to_hub("someone/some-model")
    with pytest.raises(JumpflowError, match="does not exist"):
        jumpflow.from_pretrained("./no/such/dir")


def test_missing_diffusers_names_the_extra(monkeypatch):
    from jumpflow import diffusers_export

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(JumpflowError, match=r"jumpflow\[diffusers\]"):
        diffusers_export.require_diffusers()


def test_to_image_is_a_grid_for_images_and_a_scatter_for_vectors(vector_run, image_run, tmp_path):
    model = jumpflow.load(image_run)
    samples = model.generate(4, steps=1, seed=0, cls=0)
    picture = model.to_image(samples)
    assert picture.size == (2 * 9 + 1, 2 * 9 + 1) and picture.mode == "L"  # 2x2 tiles of 8 px + 1 px borders
    assert np.array_equal(np.asarray(picture), np.asarray(image_grid(samples)))
    vectors = jumpflow.load(vector_run)
    points = vectors.generate(300, seed=0)
    scatter = vectors.to_image(points)
    assert scatter.mode == "RGB" and scatter.size == (352, 374)  # one 3.2 x 3.4 in panel at 110 dpi
    assert len(np.unique(np.asarray(scatter).reshape(-1, 3), axis=0)) > 2  # points drawn, not a blank canvas
    path = vectors.save_png(points, tmp_path / "pics" / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(JumpflowError, match="expected"):
        vectors.to_image(samples)


def test_cli_export_writes_a_loadable_folder_and_reports_errors(vector_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(vector_run), "--out", str(out)]) == 0
    assert "jumpflow.from_pretrained" in capsys.readouterr().out
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(jumpflow.load(out).generate(noise=noise, cls=0),
                       jumpflow.load(vector_run).generate(noise=noise, cls=0))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    for argv, message in ((["--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist"),
                          (["--ckpt", str(vector_run), "--out", str(tmp_path / "busy")], "--overwrite")):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert (tmp_path / "busy" / "x.txt").read_text() == "x" and not (tmp_path / "o").exists()
