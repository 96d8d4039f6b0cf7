"""Guided sampling in one network evaluation: an improved MeanFlow model (iMF; Geng et al. 2025, "Improved Mean Flows:
On the Challenges of Fastforward Generative Models", arXiv 2512.02012) takes the classifier-free guidance scale as a
network input, so a 1-step sample is guided at no extra cost. Issue 7's done-criterion: as the scale grows, 1-step
samples of class k are judged more surely of class k by the digits feature net's classifier (as in
tests/test_class_conditional.py).

The run is deliberately short (80 steps, ~16 s on one thread): after 200 steps the unguided 1-step samples are already
classified at 0.997 confidence and guidance has no room left to show (measured 0.985 -> 0.994 -> 0.998).
"""

import pytest
import torch

import jumpflow
from jumpflow import api, data
from jumpflow.eval.feature_nets import extract, feature_net_for

torch.set_num_threads(1)

CLASSES = range(10)
PER_CLASS = 50
SCALES = (1.0, 2.0, 4.0)
INTERVAL = (0.4, 0.65)  # where in time guidance acts: the official iMF evaluation default
RUN = {"method": "imf", "data": "digits", "class_conditional": True, "steps": 80, "batch_size": 64, "lr": 2e-3,
       "warmup_steps": 20, "ema_decay": 0.99, "backbone": "unet", "seed": 0,
       "backbone_options": {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "head_channels": 16,
                            "frequency_dim": 32},
       "sample_every": 0, "checkpoint_every": 0, "progress": False, "log_every": 100}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return jumpflow.load(api.train(RUN, tmp_path_factory.mktemp("guided_one_step") / "run"))  # ~16 s, one thread


@pytest.fixture(scope="module")
def by_scale(model):
    """scale -> (accuracy, mean classifier probability of the requested class), over 10 classes x 50 1-step samples."""
    classifier = feature_net_for(data.load("digits"))  # cached; ~12 s on one thread the first time
    results = {}
    for scale in SCALES:
        accuracy, confidence = [], []
        for k in CLASSES:
            x = model.generate(PER_CLASS, steps=1, seed=k, cls=k, guidance=scale, interval=INTERVAL)
            probs = extract(classifier, x.clamp(-1, 1))[1].softmax(1)
            accuracy.append((probs.argmax(1) == k).double().mean().item())
            confidence.append(probs[:, k].mean().item())
        results[scale] = (sum(accuracy) / len(CLASSES), sum(confidence) / len(CLASSES))
    return results


def test_one_step_samples_grow_more_class_consistent_as_guidance_grows(by_scale):
    (acc1, conf1), (acc2, conf2), (acc4, conf4) = (by_scale[s] for s in SCALES)
    # measured: confidence 0.866 -> 0.947 -> 0.988, accuracy 0.888 -> 0.960 -> 0.996 (seed 0, 80 steps)
    assert conf2 > conf1 + 0.04 and conf4 > conf2 + 0.02, by_scale
    assert acc1 < acc2 < acc4, by_scale
    assert acc1 > 0.6  # already conditional without guidance (chance is 0.1)


def test_guidance_is_one_network_evaluation(model):
    """The scale is an input, not a second (unconditional) forward: 1 step is 1 NFE, and the scale changes the
    sample."""
    calls = []
    hook = model.method.net.register_forward_hook(lambda *args: calls.append(1))
    try:
        guided = model.generate(4, steps=1, seed=0, cls=3, guidance=4.0, interval=INTERVAL)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert not torch.allclose(guided, model.generate(4, steps=1, seed=0, cls=3, guidance=1.0, interval=INTERVAL))


def test_cli_passes_the_methods_sampling_options(model, tmp_path, capsys):
    import numpy as np

    from jumpflow.cli import main

    out = tmp_path / "s.npy"
    args = ["sample", "--ckpt", str(model.source), "--n", "4", "--steps", "1", "--class", "2", "--guidance", "3",
            "--out", str(out)]
    assert main(args + ["interval=[0.4, 0.65]"]) == 0
    expected = model.generate(4, steps=1, seed=0, cls=2, guidance=3.0, interval=(0.4, 0.65))
    assert torch.allclose(torch.from_numpy(np.load(out)), expected)
    assert not torch.allclose(expected, model.generate(4, steps=1, seed=0, cls=2, guidance=3.0))  # it mattered
    assert main(args + ["intervall=[0.4, 0.65]"]) == 2
    assert "no option intervall; valid: guidance, interval" in capsys.readouterr().err
