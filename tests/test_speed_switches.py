"""Speed switches (TrainConfig.grad_accum, channels_last, precision, compile) change speed, not what is learned."""

import json

import pytest
import torch
from safetensors.torch import load_file

import jumpflow
from jumpflow import TrainConfig
from jumpflow.errors import JumpflowError
from jumpflow.methods import LossOutput
from jumpflow.methods.flow_matching import FlowMatching
from jumpflow.paths import conditional_velocity, interpolate


def tiny(**overrides) -> TrainConfig:
    values = dict(method="flow_matching", data="8gaussians", steps=4, batch_size=32, lr=1e-3, warmup_steps=2,
                  backbone_options={"width": 32, "depth": 1}, log_every=1, sample_every=0, checkpoint_every=0,
                  progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def image(**overrides) -> TrainConfig:
    """A small UNet on 8x8 digits."""
    values = dict(data="digits", batch_size=8, backbone="unet",
                  backbone_options={"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1})
    values.update(overrides)
    return tiny(**values)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


class PerSampleFlowMatching(FlowMatching):
    """Flow matching whose time and noise are functions of each sample instead of random draws: the loss is then a
    plain mean of per-sample terms, so one batch and its two halves must give the same gradient."""

    name = "per_sample_flow_matching_test"

    def loss(self, x, labels):
        noise = torch.sin(7.0 * x + 1.0)
        t = torch.sigmoid(x.flatten(1).sum(1))
        v = self.net(interpolate(x, noise, t), t, t, labels)
        loss = (v - conditional_velocity(x, noise)).pow(2).mean()
        return LossOutput(loss, {"mse": loss.detach()})


def test_grad_accum_gives_the_gradients_of_one_big_batch(tmp_path, monkeypatch):
    monkeypatch.setitem(jumpflow.methods.METHODS._entries, PerSampleFlowMatching.name, PerSampleFlowMatching)
    one = jumpflow.train(tiny(method=PerSampleFlowMatching.name), tmp_path / "one")
    two = jumpflow.train(tiny(method=PerSampleFlowMatching.name, grad_accum=2), tmp_path / "two")
    four = jumpflow.train(tiny(method=PerSampleFlowMatching.name, grad_accum=4), tmp_path / "four")
    a, b, c = load_file(str(one)), load_file(str(two)), load_file(str(four))
    for key in a:
        if key.startswith(("model.", "ema.", "optim.")):
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
            assert torch.allclose(a[key], c[key], rtol=1e-5, atol=1e-6), key
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
    assert not torch.equal(a["model.net.out.weight"], torch.zeros_like(a["model.net.out.weight"]))  # it trained


def test_grad_accum_with_random_losses_trains_and_resumes_exactly(tmp_path):
    full = jumpflow.train(tiny(method="meanflow", grad_accum=2, checkpoint_every=2), tmp_path / "full")
    jumpflow.train(tiny(method="meanflow", grad_accum=2, checkpoint_every=2), tmp_path / "cut", stop_after=3)
    resumed = jumpflow.train({}, tmp_path / "cut", resume=True)
    a, b = load_file(str(full)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_unet_gives_the_same_losses(tmp_path):
    from jumpflow.train import Trainer

    plain = losses(jumpflow.train(image(steps=3), tmp_path / "plain").parents[1])
    trainer = Trainer(image(steps=3, channels_last=True), tmp_path / "cl")
    convs = [p for p in trainer.method.net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    trainer.fit()
    assert losses(tmp_path / "cl") == pytest.approx(plain, rel=1e-4)


@pytest.mark.parametrize("method", ["meanflow", "tvm"])
def test_jvp_methods_train_a_channels_last_unet_with_the_same_losses(tmp_path, method):
    """A JVP through the UNet's GroupNorm on channels-last activations (torch's forward-mode rule needs them
    contiguous); TVM also back-propagates through it. The GPU recipes turn channels_last on."""
    plain = losses(jumpflow.train(image(method=method, steps=3), tmp_path / "plain").parents[1])
    cl = losses(jumpflow.train(image(method=method, steps=3, channels_last=True), tmp_path / "cl").parents[1])
    assert cl == pytest.approx(plain, rel=1e-4)


def test_bf16_autocast_runs_on_cpu_with_a_channels_last_unet(tmp_path):
    bf16 = losses(jumpflow.train(image(steps=2, precision="bf16", channels_last=True), tmp_path / "bf16").parents[1])
    fp32 = losses(jumpflow.train(image(steps=2), tmp_path / "fp32").parents[1])
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)  # autocast ran, and changed only rounding


def test_auto_switches_are_on_for_cuda_only_and_bad_values_are_refused():
    cfg = tiny(compile="auto", channels_last="auto", precision="auto")
    cfg.validate()
    assert not cfg.switch_on("compile", "cpu") and cfg.switch_on("compile", "cuda")
    assert not cfg.switch_on("channels_last", "cpu") and cfg.switch_on("channels_last", "cuda")
    assert cfg.autocast_dtype("cpu") is None and tiny().autocast_dtype("cuda") is None
    assert tiny(precision="bf16").autocast_dtype("cpu") is torch.bfloat16
    for bad in (dict(compile="fast"), dict(channels_last=2), dict(grad_accum=0), dict(precision="fp16")):
        with pytest.raises(JumpflowError, match=next(iter(bad))):
            tiny(**bad).validate()


def test_compile_trains_like_eager_or_skips_with_the_reason(tmp_path, monkeypatch):
    """Dynamo traces the backbone (the path `compile=true` takes) with the aot_eager backend: inductor's C++ build of
    even this MLP takes ~40 s on one CPU thread, too slow for the suite (it passed this test when last run by hand:
    JUMPFLOW_TEST_INDUCTOR=1 runs it)."""
    import os

    if not os.environ.get("JUMPFLOW_TEST_INDUCTOR"):
        real = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, **{"backend": "aot_eager", **kw}))
    eager = losses(jumpflow.train(tiny(steps=2), tmp_path / "eager").parents[1])
    try:
        ckpt = jumpflow.train(tiny(steps=2, compile=True), tmp_path / "compiled")
    except Exception as e:  # noqa: BLE001 - any failure of the compiler stack on this platform
        if isinstance(e, JumpflowError):
            raise
        reason = f"torch.compile does not work on this platform: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(reason)
        pytest.skip(reason)
    assert losses(ckpt.parents[1]) == pytest.approx(eager, rel=1e-4)
    assert any(k.startswith("model.net.") for k in load_file(str(ckpt)))  # no "_orig_mod." in checkpoint keys
    assert not any("_orig_mod" in k for k in load_file(str(ckpt)))
