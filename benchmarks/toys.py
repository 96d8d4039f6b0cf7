"""Flow matching vs MeanFlow on 2-D toys with the same budget: quality at 1, 2, 4 and 100 steps, training step time
as a ratio to flow matching, and 1-step sampling throughput as a ratio to 100-step flow matching.

    python benchmarks/toys.py [--steps 5000] [--datasets checkerboard 8gaussians] [--out runs/bench-toys]

Prints markdown tables (copy them to BENCHMARKS.md with the command and the machine).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from jumpflow import data as data_lib
from jumpflow import methods, nets
from jumpflow.compare import Entry, compare, table


def step_times_ms(variants, shape, batch_size: int, rounds: int = 5, steps: int = 20) -> dict:
    """Median ms per training step of each (label, method, options), interleaved so machine load hits all alike."""
    built = {}
    for label, name, options in variants:
        torch.manual_seed(0)
        method = methods.get(name, nets.build("mlp", shape), shape, **options)
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
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--datasets", nargs="+", default=["checkerboard", "8gaussians"])
    p.add_argument("--out", default="runs/bench-toys")
    p.add_argument("--n-eval", type=int, default=4000)
    args = p.parse_args()

    from jumpflow import api
    from jumpflow.demo import DEMO_TRAINING

    training = dict(DEMO_TRAINING, steps=args.steps)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; budget: {args.steps} steps x batch {training['batch_size']}, mlp backbone\n")
    for name in args.datasets:
        out = Path(args.out) / name
        results = compare([Entry("meanflow", [1, 2, 4]), Entry("flow_matching", [1, 2, 4, 100])], name, out,
                          training, n_eval=args.n_eval, progress=False)
        print(f"### {name}\n\n{table(results)}\n")
        shape = data_lib.load(name).shape
        speed = sampling_throughput({"meanflow 1 step": (api.load(out / "meanflow"), 1),
                                     "flow_matching 100 steps": (api.load(out / "flow_matching"), 100)}, shape)
        ratio = speed["meanflow 1 step"] / speed["flow_matching 100 steps"]
        print(f"sampling: meanflow 1 step {speed['meanflow 1 step']:.0f} samples/s, flow matching 100 steps "
              f"{speed['flow_matching 100 steps']:.0f} samples/s: ratio {ratio:.0f}x\n")

    variants = [("flow_matching", "flow_matching", {}), ("meanflow (exact JVP)", "meanflow", {}),
                ("meanflow (finite-difference JVP)", "meanflow", {"jvp_mode": "finite_difference"})]
    ms = step_times_ms(variants, (2,), training["batch_size"])
    print("| training step | ms (median) | ratio to flow matching |\n|---|---|---|")
    for label, value in ms.items():
        print(f"| {label} | {value:.1f} | {value / ms['flow_matching']:.2f} |")


if __name__ == "__main__":
    main()
