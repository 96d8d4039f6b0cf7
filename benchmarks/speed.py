"""Speed as ratios measured in one run: training step time of every registered method relative to flow matching
(interleaved, so machine load hits all alike), and samples/s of each method at its default step count (1 for
one-step methods) relative to 100-step flow matching, on the runs a `jumpflow bench` left behind.

    python benchmarks/speed.py [--bench runs/bench-toys] [--dataset checkerboard] [--batch-size 1024]

Quality is `jumpflow bench`'s job; this prints markdown tables (copy them to BENCHMARKS.md with the command and the
machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from pathlib import Path

import torch

from jumpflow import data as data_lib
from jumpflow import methods
from jumpflow.build import DataInfo, build_method
from jumpflow.config import TrainConfig


def step_times_ms(variants, shape, batch_size: int, rounds: int = 5, steps: int = 20) -> dict:
    """Median ms per training step of each (label, method, options), interleaved so machine load hits all alike."""
    built = {}
    for label, name, options in variants:
        torch.manual_seed(0)
        cfg = TrainConfig(method=name, method_options=options, backbone="mlp")  # the backbone the method needs
        method = build_method(cfg, DataInfo("speed", "vector", tuple(shape), 0))
        built[label] = (method, torch.optim.AdamW(method.parameters(), lr=1e-4))
    x = torch.randn(batch_size, *shape)
    times = {label: [] for label in built}
    for _ in range(rounds):
        for label, (method, opt) in built.items():
            for i in range(steps + 3):
                if i == 3:
                    started = time.perf_counter()
                loss = method.loss(x, None).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[label].append(1000 * (time.perf_counter() - started) / steps)
    return {label: statistics.median(t) for label, t in times.items()}


def sampling_throughput(models: dict, shape, n: int = 10000) -> dict:
    """Samples per second of each (label -> (loaded model, steps)), same noise."""
    noise = torch.randn(n, *shape)
    out = {}
    for label, (model, steps) in models.items():
        model.generate(noise=noise[:100], steps=steps)  # warm-up
        started = time.perf_counter()
        model.generate(noise=noise, steps=steps)
        out[label] = n / (time.perf_counter() - started)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="runs/bench-toys", help="a jumpflow bench output folder")
    p.add_argument("--dataset", default="checkerboard")
    p.add_argument("--batch-size", type=int, default=1024)
    args = p.parse_args()

    from jumpflow import api

    shape = data_lib.load(args.dataset).shape
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; mlp backbone, batch {args.batch_size}\n")
    installed = [name for name in methods.names() if not methods.METHODS[name].requires
                 or importlib.util.find_spec(methods.METHODS[name].requires.replace("-", "_"))]
    variants = [(name, name, {}) for name in installed]
    variants.append(("meanflow (finite-difference JVP)", "meanflow", {"jvp_mode": "finite_difference"}))
    ms = step_times_ms(variants, shape, args.batch_size)
    print("| training step | ms (median) | ratio to flow matching |\n|---|---|---|")
    for label, value in ms.items():
        print(f"| {label} | {value:.1f} | {value / ms['flow_matching']:.2f} |")

    runs = {name: Path(args.bench) / args.dataset / name / "run" for name in methods.names()}
    # Each method at its own default step count: one-step methods at 1, flow matching and its peer at 100.
    steps = {name: methods.METHODS[name].default_sample_steps for name in runs}
    models = {f"{name}, {steps[name]} step{'s' if steps[name] > 1 else ''}": (api.load(run), steps[name])
              for name, run in runs.items() if run.exists()}
    if not models:
        print(f"\nno runs under {args.bench}/{args.dataset}: run jumpflow bench first for sampling speed")
        return
    speed = sampling_throughput(models, shape)
    reference = speed.get(f"flow_matching, {steps['flow_matching']} steps")
    print("\n| sampler | samples/s | ratio to flow matching at 100 steps |\n|---|---|---|")
    for label, value in speed.items():
        print(f"| {label} | {value:.0f} | {value / reference:.0f} |" if reference else f"| {label} | {value:.0f} | - |")


if __name__ == "__main__":
    main()
