"""The diffusers export: diffusers' from_pretrained and FlowMapEulerDiscreteScheduler reproduce jumpflow's samples."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import jumpflow  # noqa: E402
from jumpflow import api  # noqa: E402
from jumpflow.cli import main  # noqa: E402
from jumpflow.diffusers_export import export_diffusers  # noqa: E402
from jumpflow.errors import JumpflowError  # noqa: E402

TINY = {"batch_size": 32, "backbone_options": {"width": 32, "depth": 1}, "sample_every": 0, "checkpoint_every": 0,
        "progress": False, "lr": 2e-3, "steps": 4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A class-conditional MeanFlow run on standardised file data, a shortcut run (power-of-two steps up to 8), and
    a flow-matching run (a velocity model: not a flow map)."""
    root = tmp_path_factory.mktemp("diffusers")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=600)
    x = np.stack([20.0 * y + rng.normal(size=600), 5.0 + 0.1 * rng.normal(size=600)], 1).astype(np.float32)
    np.savez(root / "blobs.npz", x=x, y=y)
    api.train({**TINY, "method": "meanflow", "data": str(root / "blobs.npz"), "class_conditional": True}, root / "mf")
    api.train({**TINY, "method": "shortcut", "data": "8gaussians", "method_options": {"max_resolution": 8}},
              root / "sc")
    api.train({**TINY, "method": "flow_matching", "data": "8gaussians"}, root / "fm")
    return root


@pytest.fixture(scope="module")
def exported(runs):
    return export_diffusers(runs / "mf", runs / "mf-diffusers")


def pipeline(directory):
    from jumpflow.diffusers_export import JumpflowPipeline

    pipe = JumpflowPipeline.from_pretrained(str(directory))  # diffusers' DiffusionPipeline.from_pretrained
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_export_is_a_diffusers_pipeline_folder_with_the_flow_map_scheduler(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "JumpflowPipeline"
    assert index["flow_map"] == ["jumpflow.diffusers_export", "JumpflowFlowMapModel"]
    assert index["scheduler"] == ["diffusers", "FlowMapEulerDiscreteScheduler"]
    assert (exported / "flow_map" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.0
    card = (exported / "README.md").read_text()
    assert "library_name: diffusers" in card and "JumpflowPipeline.from_pretrained" in card


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_diffusers_samples_equal_jumpflow_samples_for_the_same_seed(runs, exported, steps):
    pipe = pipeline(exported)
    assert isinstance(pipe.scheduler, diffusers.FlowMapEulerDiscreteScheduler)
    ours = jumpflow.load(runs / "mf").generate(64, steps=steps, seed=5, cls=2)
    theirs = pipe(batch_size=64, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                  class_labels=2).samples
    assert theirs.shape == (64, 2)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert ours[:, 0].mean() > 10  # in data units (the scaler travelled with the export)


def test_jumpflow_loads_the_diffusers_folder_too(runs, exported):
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    a = jumpflow.load(exported).generate(noise=noise, steps=2, cls=1)
    b = jumpflow.load(runs / "mf").generate(noise=noise, steps=2, cls=1)
    assert torch.equal(a, b)


def test_pipeline_keeps_the_methods_step_rule_and_checks_its_inputs(runs, tmp_path):
    out = export_diffusers(jumpflow.load(runs / "sc"), tmp_path / "sc")
    pipe = pipeline(out)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(pipe(batch_size=8, num_inference_steps=8, generator=gen()).samples,
                               jumpflow.load(runs / "sc").generate(8, steps=8, seed=0), rtol=1e-5, atol=1e-5)
    with pytest.raises(JumpflowError, match="power of two"):
        pipe(batch_size=2, num_inference_steps=3)
    with pytest.raises(JumpflowError, match="at most 8 steps"):
        pipe(batch_size=2, num_inference_steps=16)
    with pytest.raises(JumpflowError, match="unconditional"):
        pipe(batch_size=2, class_labels=1)
    with pytest.raises(JumpflowError, match="pil"):
        pipe(batch_size=2, output_type="pil")
    assert pipe(batch_size=3, output_type="np").samples.shape == (3, 2)


def test_a_velocity_model_is_refused_and_nothing_is_written(runs, tmp_path, capsys):
    with pytest.raises(JumpflowError, match="does not sample by flow-map jumps"):
        export_diffusers(runs / "fm", tmp_path / "fm")
    assert main(["export", "--ckpt", str(runs / "fm"), "--out", str(tmp_path / "fm"), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "does not sample by flow-map jumps" in err and "--format hub" in err and "Traceback" not in err
    assert not (tmp_path / "fm").exists() and list(tmp_path.iterdir()) == []


def test_cli_exports_for_diffusers(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", "--ckpt", str(runs / "mf"), "--out", str(out), "--format", "diffusers"]) == 0
    assert "JumpflowPipeline.from_pretrained" in capsys.readouterr().out
    x = pipeline(out)(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(1),
                      class_labels=0).samples
    torch.testing.assert_close(x, jumpflow.load(runs / "mf").generate(4, steps=1, seed=1, cls=0), rtol=1e-5,
                               atol=1e-5)


def test_image_models_export_and_give_pil_images(tmp_path):
    unet = {"channels": 8, "channel_mult": [1], "num_res_blocks": 1, "head_channels": 8, "frequency_dim": 32}
    api.train({**TINY, "method": "meanflow", "data": "digits", "steps": 1, "batch_size": 4, "backbone": "unet",
               "backbone_options": unet}, tmp_path / "run")
    pipe = pipeline(export_diffusers(tmp_path / "run", tmp_path / "out"))
    ours = jumpflow.load(tmp_path / "run").generate(3, steps=2, seed=4)
    theirs = pipe(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(4)).samples
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    images = pipe(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(4),
                  output_type="pil").samples
    assert len(images) == 3 and images[0].size == (8, 8)
    expected = ((ours[0, 0].clamp(-1, 1) + 1) / 2 * 255).round().numpy()
    assert np.abs(np.asarray(images[0], dtype=np.float64) - expected).max() <= 1  # same picture, 8-bit rounding
