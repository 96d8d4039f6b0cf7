"""Short real trainings: a one-step method must actually learn a one-step map, not just lower its loss."""

import torch

from jumpflow.data.toys import gmm1d
from jumpflow.eval import flow_map_error
from tests.methods.toy_training import train_with_trainer


def test_meanflow_learns_the_one_step_map_of_a_two_mode_mixture(tmp_path):
    mixture = gmm1d()
    noise = torch.randn(1000, 1, generator=torch.Generator().manual_seed(1))
    meanflow, losses = train_with_trainer("meanflow", tmp_path / "mf", data="gmm1d", steps=200, log_every=20)
    flow, _ = train_with_trainer("flow_matching", tmp_path / "fm", data="gmm1d", steps=200, log_every=20)
    assert sum(losses[-5:]) < sum(losses[:5])
    mf_error = flow_map_error(meanflow.generate(noise=noise, steps=1), noise, mixture, relative=True)
    fm_error = flow_map_error(flow.generate(noise=noise, steps=1), noise, mixture, relative=True)
    # 1.0 is the error of predicting the data mean, which is what 1-step flow matching converges to.
    assert fm_error > 0.8
    assert mf_error < 0.35  # measured 0.23 at 200 steps (0.17 at 400)
    x = meanflow.generate(noise=noise, steps=1)
    assert abs((x > 0).float().mean().item() - 0.5) < 0.1  # both modes, with their weights
