"""Align Your Flow's objectives and stabilisers on 8 gaussians with the EXACT teacher (BENCHMARKS.md, "Align Your
Flow: what was tried").

    python benchmarks/ayf_study.py [VARIANT ...] [--out runs/ayf-study] [--steps 1000]

The teacher is the mixture's exact velocity, so whatever fails here fails in the objective, not in a teacher's
error. Each variant trains align_your_flow from a fresh MLP (width 128, 4 blocks, seed 0) for --steps AdamW steps
(batch 512, lr 2e-3 unless the variant changes it, EMA 0.999) in a hand-written loop, and prints the EMA net's mean
distance to the exact flow map of 2000 fixed noises at 1, 2, 8 and 64 steps, with the tangent (or residual) norm, every
250 steps. A variant's final line is kept in OUT/VARIANT.json and not retrained on a rerun.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from jumpflow import data, methods, nets
from jumpflow.distill import Teacher
from jumpflow.ema import EMA

VARIANTS = {
    "emd": {},  # the defaults: EMD, l2 tangent normalisation, warm-up to r = 0.99 over a tenth of the run
    "emd_r0": {"tangent_warmup_max": 1e-6},  # the JVP term off: flow matching on the teacher (a sanity row)
    "emd_r0.5": {"tangent_warmup_max": 0.5, "tangent_warmup_steps": 1000},
    "emd_lr3e-4": {"lr": 3e-4},
    "emd_narrow_gaps": {"gap_mean": -1.0, "gap_std": 1.0},
    "emd_norm_none": {"tangent_norm": "none"},
    "emd_norm_rms": {"tangent_norm": "rms"},
    "emd_fm_half": {"flow_matching_fraction": 0.5},
    "lmd": {"objective": "lmd"},
}
STEP_COUNTS = (1, 2, 8, 64)


def run(options: dict, steps: int, batch: int = 512) -> dict:
    torch.manual_seed(0)
    mixture = data.load("8gaussians")
    teacher = Teacher.from_velocity(lambda z, t, labels: mixture.velocity(z.double(), t.double()).to(z.dtype), (2,),
                                    teacher_id="exact-8gaussians")
    options = dict(options)
    lr = options.pop("lr", 2e-3)
    net = nets.build("mlp", (2,), width=128, depth=4)
    method = methods.get("align_your_flow", net, (2,), class_dropout=0.0, **options)
    method.attach_teacher(teacher, None)
    method.plan(steps)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    ema = EMA(net, 0.999)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    exact = mixture.flow_map(noise.double(), 1.0, 0.0).float()
    data_gen = torch.Generator().manual_seed(2)
    row = {}
    for step in range(steps):
        method.begin_step(step)
        out = method.loss(mixture.draw(batch, generator=data_gen).float(), None)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        ema.update(net, step)
        if step % 250 == 0 or step == steps - 1:
            with torch.no_grad():
                errors = {k: (method.sample(noise, k, net=ema.shadow) - exact).norm(dim=1).mean().item()
                          for k in STEP_COUNTS}
            row = {"step": step + 1, "tangent_norm": round(float(out.metrics["tangent_norm"]), 3),
                   **{f"map_error_{k}": round(e, 3) for k, e in errors.items()}}
            print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", help=f"{', '.join(VARIANTS)} (all when none given)")
    parser.add_argument("--out", default="runs/ayf-study")
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in args.variants or list(VARIANTS):
        done = Path(args.out) / f"{name}.json"
        if not done.exists():
            print(f"--- {name}", flush=True)
            done.write_text(json.dumps(run(VARIANTS[name], args.steps)))
        print(name, done.read_text(), flush=True)


if __name__ == "__main__":
    main()
