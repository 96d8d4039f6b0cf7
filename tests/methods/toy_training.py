"""Small networks and short, seeded trainings on 8 gaussians for the method tests, and the one-step comparison
they feed.

Every method test ends with the same check: a few hundred AdamW steps on a small MLP must learn a one-step map that
flow matching, trained identically and sampled with one Euler step, does not (it collapses toward the data mean).
Two ways to train:

- `train_toy` / `fit`: a hand-written loop (seeded global RNG for the method's draws, a seeded generator for the
  data, optionally an EMA student handed to the method as its target net), fast and free of the Trainer's
  warm-up and logging; `OneStepMap` scores what it learned;
- `train_with_trainer`: a whole `jumpflow.train` run into a folder, read back with `jumpflow.load`.

The flow-matching baselines are shared between test modules by session fixtures (tests/methods/conftest.py).
"""

import json
from pathlib import Path
from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

import jumpflow
from jumpflow import TrainConfig, data, methods, nets
from jumpflow.ema import EMA

EIGHT_GAUSSIANS = data.load("8gaussians")  # 8 isotropic Gaussians (std 0.15) on a circle of radius 2


# --- networks --------------------------------------------------------------------------------------------------------
def toy_net(**net_options) -> nn.Module:
    """The toy backbone: a jumpflow MLP of width 64 and depth 2 on R^2 (its output layer starts at zero)."""
    return nets.build("mlp", (2,), width=64, depth=2, **net_options)


def random_mlp(**options) -> nn.Module:
    """A small float64 MLP (width 32, depth 2) whose zero-initialised output layer is re-drawn after
    torch.manual_seed(0), so its output is a non-trivial function."""
    torch.manual_seed(0)
    net = nets.build("mlp", (2,), width=32, depth=2, **options).double()
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.5)
    return net


# --- hand-written loops ----------------------------------------------------------------------------------------------
def toy_method(name: str, seed: int = 0, net_options: Optional[dict] = None, **options):
    """Method `name` on a fresh `toy_net`, its initial weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return methods.get(name, toy_net(**(net_options or {})), (2,), **options)


class ToyRun(NamedTuple):
    """A trained method, its EMA copy of the net (what samples; None when trained without EMA) and the metric `fit`
    collected at every step."""

    method: Any
    ema: Optional[nn.Module]
    losses: List[float]


def fit(method, steps: int, *, data_seed: int = 0, lr: float = 2e-3, ema_decay: Optional[float] = 0.99,
        metric: str = "loss", dataset=EIGHT_GAUSSIANS) -> ToyRun:
    """Train `method` in place for `steps` AdamW steps on batches of 256 from `dataset` (generator seeded
    `data_seed`; the method's own draws come from the global RNG as it stands).

    With `ema_decay`, an EMA copy of the net (jumpflow.ema.EMA) is updated after every step and handed to the method
    by `use_ema`, as the Trainer does (a shortcut's bootstrap teacher, TwinFlow's target). `metric` is what is
    collected per step: "loss" for the optimised loss, else the name of one of the loss's metrics."""
    ema = None
    if ema_decay is not None:
        ema = EMA(method.net, ema_decay)
        method.use_ema(ema.shadow)
    optimizer = torch.optim.AdamW(method.net.parameters(), lr=lr)
    gen, losses = torch.Generator().manual_seed(data_seed), []
    for step in range(steps):
        method.begin_step(step)  # as the Trainer does: curricula and EMA targets follow the step
        out = method.loss(dataset.sample_batch(256, gen)[0], None)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(method.net, step)
        losses.append((out.loss if metric == "loss" else out.metrics[metric]).item())
    return ToyRun(method, None if ema is None else ema.shadow, losses)


def train_toy(name: str, steps: int = 400, *, seed: int = 0, data_seed: Optional[int] = None,
              net_options: Optional[dict] = None, lr: float = 2e-3, ema_decay: Optional[float] = 0.99,
              metric: str = "loss", **options) -> ToyRun:
    """`fit` a fresh `toy_method(name, seed, net_options, **options)`; the data generator is seeded `data_seed`
    (default: `seed`)."""
    method = toy_method(name, seed, net_options, **options)
    return fit(method, steps, data_seed=seed if data_seed is None else data_seed, lr=lr, ema_decay=ema_decay,
               metric=metric)


# --- the one-step comparison -----------------------------------------------------------------------------------------
class OneStepComparison(NamedTuple):
    """Errors of one-step samples from fixed noise: `before` of the method `untrained` (its zero output layer makes
    the map the identity), `after` of the trained one, `flow` of flow matching (one Euler step: about the data
    mean)."""

    untrained: Any
    before: float
    after: float
    flow: float


class OneStepMap:
    """Fixed noise and its exact one-step map Phi_{1->0} on a mixture (RK4, computed once: 200 steps differ from 1000
    by < 1e-6 on 8 gaussians; None uses flow_map's default), with the errors the tests score samples by."""

    def __init__(self, noise: torch.Tensor, mixture=EIGHT_GAUSSIANS, n_steps: Optional[int] = 200):
        self.noise, self.mixture = noise, mixture
        steps = {} if n_steps is None else {"n_steps": n_steps}
        self.exact = mixture.flow_map(noise, 1.0, 0.0, **steps)
        self.spread = (self.exact - self.exact.mean(0)).pow(2).sum(1).mean().sqrt()

    @classmethod
    def seeded(cls, seed: int = 1, n: int = 500, **options) -> "OneStepMap":
        """n standard normal noises from a generator seeded `seed`."""
        return cls(torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)), **options)

    def error(self, x: torch.Tensor) -> float:
        """Mean distance of samples to the exact map of their noise (jumpflow.eval's flow-map error)."""
        return (x - self.exact).norm(dim=1).mean().item()

    def relative_error(self, x: torch.Tensor) -> float:
        """`error` over the spread of the exact targets (1.0 ~ answering their mean)."""
        return ((x - self.exact).norm(dim=1).mean() / self.spread).item()

    def compare(self, name: str, run: ToyRun, flow: ToyRun, net_options: Optional[dict] = None,
                relative: bool = False) -> OneStepComparison:
        """`error` (`relative_error` if `relative`) of one-step samples of an untrained `name` on a
        `toy_net(**net_options)`, of `run` and of the flow-matching run `flow`, each sampled with its EMA net where it
        has one."""
        score = self.relative_error if relative else self.error
        untrained = methods.get(name, toy_net(**(net_options or {})), (2,))
        return OneStepComparison(untrained, score(untrained.sample(self.noise, 1)),
                                 score(run.method.sample(self.noise, 1, net=run.ema)),
                                 score(flow.method.sample(self.noise, 1, net=flow.ema)))


# --- whole Trainer runs ----------------------------------------------------------------------------------------------
def train_with_trainer(method: str, out: Path, *, data: str = "8gaussians", steps: int = 250, log_every: int = 1,
                       options: Optional[dict] = None) -> Tuple[Any, List[float]]:
    """A `jumpflow.train` run of `method` into `out` (MLP width 64 depth 2, batch 256, lr 2e-3 after 20 warm-up steps,
    EMA 0.99, seed 0, no samples or checkpoints on the way): the loaded model and the logged losses."""
    cfg = TrainConfig(method=method, data=data, steps=steps, batch_size=256, lr=2e-3, warmup_steps=20,
                      backbone_options={"width": 64, "depth": 2}, ema_decay=0.99, log_every=log_every,
                      sample_every=0, checkpoint_every=0, progress=False, seed=0, method_options=options or {})
    jumpflow.train(cfg, out)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return jumpflow.load(out), losses
