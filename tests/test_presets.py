"""The GPU recipe presets (presets.py): they validate whole, build the networks their comments say, sample the time
pairs their papers describe, and run end to end through `jumpflow train --preset` with only the sizes shrunk."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from jumpflow import methods
from jumpflow.build import DataInfo, build_method
from jumpflow.cli import main
from jumpflow.config import TrainConfig
from jumpflow.errors import JumpflowError
from jumpflow.methods.base import make_config
from jumpflow.presets import PRESETS, get_preset

RECIPES = ("meanflow-cifar10", "imf-dit")
CIFAR = DataInfo("cifar10", "image", (3, 32, 32), 10)


def recipe_config(name: str) -> TrainConfig:
    values = TrainConfig().to_dict()
    values.update(get_preset(name))
    return TrainConfig.from_dict(values)


def parameters_on_meta(cfg: TrainConfig, info: DataInfo) -> int:
    """Build the preset's method (backbone options merged with the method's requirements, method config validated)
    without allocating memory, and count the student network's parameters."""
    num_classes = info.num_classes if cfg.class_conditional else 0
    with torch.device("meta"):
        method = build_method(cfg, DataInfo(info.name, info.kind, info.shape, num_classes))
    return sum(p.numel() for p in method.net.parameters())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_as_a_train_config_with_its_method_config(name):
    cfg = recipe_config(name)
    assert cfg.data == "cifar10" and cfg.precision == cfg.compile == cfg.channels_last == "auto"
    make_config(methods.METHODS[cfg.method].Config, cfg.method_options)  # unknown option names raise
    parameters_on_meta(cfg, CIFAR)  # and the method's own checks (imf validates in __init__) pass


def test_meanflow_cifar10_is_the_released_recipe():
    cfg = recipe_config("meanflow-cifar10")
    assert (cfg.method, cfg.backbone, cfg.class_conditional) == ("meanflow", "unet", False)
    assert (cfg.lr, cfg.batch_size, cfg.ema_decay, cfg.steps) == (6e-4, 1024, 0.9999, 800_000)
    assert cfg.method_options["adaptive_power"] == 0.75
    assert cfg.data_options == {"hflip": True}


def test_meanflow_cifar10_samples_the_v1_time_pairs():
    """75% of pairs are drawn with r != t (the code's ratio=0.75; read as flow_matching_share=0.75 it would be 25%),
    logit(t) ~ N(-0.6, 1.6), r ~ LN(-4, 1.6) capped at t. A drawn r above t is capped to r = t, so the share with
    r < t is 0.75 * P(logit r < logit t) = 0.75 * Phi(3.4 / (1.6 sqrt 2)) ~= 0.700."""
    cfg = recipe_config("meanflow-cifar10")
    torch.manual_seed(0)
    with torch.device("meta"):
        method = build_method(cfg, CIFAR)
    t, r = method.sample_time_pair(200_000, "cpu")
    jump = r < t
    expected = 0.75 * 0.5 * (1 + math.erf(3.4 / (1.6 * math.sqrt(2)) / math.sqrt(2)))
    assert abs(jump.float().mean().item() - expected) < 0.005
    logit_t = torch.logit(t.double())
    assert abs(logit_t.mean().item() + 0.6) < 0.02 and abs(logit_t.std().item() - 1.6) < 0.02
    assert torch.all(r <= t) and r[jump].median().item() < 0.05


def test_imf_dit_samples_half_the_batch_at_r_equals_t():
    cfg = recipe_config("imf-dit")
    torch.manual_seed(0)
    with torch.device("meta"):
        method = build_method(cfg, CIFAR)
    t, r, same = method.sample_time_pair(1000, "cpu")
    assert same[:500].all() and not same[500:].any() and torch.equal(r[same], t[same])
    assert cfg.adam_beta2 == 0.95 and cfg.lr == 1e-4 and cfg.batch_size == 1024 and cfg.ema_decay == 0.9999


def test_meanflow_cifar10_unet_is_within_ten_percent_of_the_papers_55m():
    count = parameters_on_meta(recipe_config("meanflow-cifar10"), CIFAR)
    assert abs(count - 55e6) / 55e6 < 0.10, count  # 57,624,323 when written


def test_imf_dit_is_a_b2_dit_without_adaln():
    count = parameters_on_meta(recipe_config("imf-dit"), CIFAR)
    assert 85e6 < count < 95e6, count  # 89,051,160 when written; with adaLN it would be ~133M


def _tiny_images(path, n=32, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8),
             y=rng.integers(0, 10, size=n).astype(np.int64))
    return path


# Only the sizes shrink; everything else (dropout, attention, in-context tokens without adaLN, method options,
# optimiser, EMA, hflip, "auto" switches) is the recipe's own.
SHRINK = {
    "meanflow-cifar10": ["backbone_options.channels=16", "backbone_options.channel_mult=[1, 2]",
                         "backbone_options.num_res_blocks=1"],
    "imf-dit": ["backbone_options.size=tiny/4"],
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps_end_to_end_through_the_cli(name, tmp_path):
    data = _tiny_images(tmp_path / "images.npz")
    out = tmp_path / "run"
    assert main(["train", "--preset", name, "--data", str(data), "--steps", "2", "--batch-size", "8",
                 "--out", str(out), "device=cpu", "progress=false", *SHRINK[name]]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    recipe = get_preset(name)
    for key in ("method", "method_options", "lr", "ema_decay", "adam_beta2", "grad_clip", "warmup_steps",
                "class_conditional", "data_options", "precision", "compile", "channels_last"):
        assert saved[key] == recipe[key], key
    kept = {k: v for k, v in recipe["backbone_options"].items() if k not in ("channels", "channel_mult",
                                                                               "num_res_blocks", "size")}
    assert kept.items() <= saved["backbone_options"].items()
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [rec["loss"] for rec in losses if "loss" in rec]
    assert losses and all(math.isfinite(v) for v in losses)

    import jumpflow

    model = jumpflow.load(out, device="cpu")
    options = {"cls": 3, "guidance": 7.5, "interval": (0.4, 0.65)} if name == "imf-dit" else {}
    samples = model.generate(4, steps=1, seed=0, **options)
    assert samples.shape == (4, 3, 32, 32) and torch.isfinite(samples).all()


def test_meanflow_cifar10_trains_with_the_codes_dropout(tmp_path, capsys):
    """With dropout on, the JVP self-check (eval mode) passes and training runs."""
    data = _tiny_images(tmp_path / "images.npz")
    code = main(["train", "--preset", "meanflow-cifar10", "--data", str(data), "--steps", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "run"), "device=cpu", "progress=false", *SHRINK["meanflow-cifar10"]])
    assert code == 0, capsys.readouterr().err
    assert get_preset("meanflow-cifar10")["backbone_options"]["dropout"] == 0.2


def test_get_preset_returns_a_copy_the_caller_may_edit():
    mine = get_preset("imf-dit")
    mine["backbone_options"]["size"] = "tiny"
    mine["method_options"].clear()
    assert PRESETS["imf-dit"]["backbone_options"]["size"] == "B/2" and PRESETS["imf-dit"]["method_options"]


def test_unknown_preset_is_a_clear_error_listing_the_recipes():
    with pytest.raises(JumpflowError, match="unknown preset 'huge'.*imf-dit.*meanflow-cifar10"):
        get_preset("huge")
