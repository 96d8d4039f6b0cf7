"""Train several methods on one dataset with the same budget, then measure them side by side on the same noise.

Used by `jumpflow demo` and `benchmarks/toys.py`. Every number comes from EMA weights, at equal sample counts,
next to the real-vs-real floor of each metric; Gaussian mixtures add the error against the exact flow map.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from . import api
from . import data as data_lib
from .config import TrainConfig
from .eval import evaluate_samples
from .plots import save_panels

# Columns of the printed table: (metric key, header, better).
COLUMNS = [("sliced_wasserstein", "SW2", "lower"), ("energy_distance", "energy", "lower"),
           ("log_likelihood", "log-lik", "higher"), ("support_fraction", "in support", "higher"),
           ("mode_coverage", "modes", "higher"), ("flow_map_error", "map error", "lower")]


@dataclass
class Entry:
    method: str
    steps: List[int]  # sampling step counts to measure
    options: Dict = field(default_factory=dict)  # method options


@dataclass
class Result:
    method: str
    steps: int
    nfe: int
    metrics: Dict[str, float]
    train_step_ms: float
    sample_s: float


def train_entry(entry: Entry, data: str, out: Path, base: Dict, progress: bool) -> Path:
    values = dict(base, method=entry.method, data=data, method_options=dict(entry.options), progress=progress)
    return api.train(TrainConfig.from_dict(values), out)


def train_step_ms(run_dir: Path) -> float:
    """Mean wall time of a training step, from the run's own log. compare() trains with sample_every and
    checkpoint_every at 0, so pictures and checkpoints come after the last logged time and are not counted."""
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return 1000.0 * last["elapsed_s"] / last["step"]


def compare(entries: Sequence[Entry], data: str, out: Path, base: Dict, n_eval: int = 2000, seed: int = 0,
            progress: bool = True) -> List[Result]:
    out = Path(out)
    dataset = data_lib.load(data)
    noise = torch.randn(n_eval, *dataset.shape, generator=torch.Generator().manual_seed(seed + 12345))
    results, panels = [], [("data", dataset.reference(n_eval))]
    for entry in entries:
        run_dir = out / entry.method
        train_entry(entry, data, run_dir, base, progress)
        model = api.load(run_dir)
        step_ms = train_step_ms(run_dir)
        for k in entry.steps:
            started = time.perf_counter()
            samples = model.generate(noise=noise, steps=k)
            elapsed = time.perf_counter() - started
            metrics = evaluate_samples(samples, dataset, seed=seed, noise=noise if dataset.has_flow_map else None)
            results.append(Result(entry.method, k, model.method.nfe(k), metrics, step_ms, elapsed))
            panels.append((f"{entry.method}, {k} step{'s' if k > 1 else ''}", samples))
    save_panels(out / "comparison.png", panels,
                title=f"{dataset.name}: same noise, same training budget ({base.get('steps')} steps), EMA weights")
    (out / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return results


def table(results: Sequence[Result]) -> str:
    """Markdown table; the last row is the real-vs-real floor of each metric (what a perfect model scores)."""
    present = [c for c in COLUMNS if c[0] in results[0].metrics]
    arrows = [f"{h} ({'↓' if b == 'lower' else '↑'})" for _, h, b in present]
    head = "| method | steps | NFE | " + " | ".join(arrows) + " |"
    lines = [head, "|" + "---|" * (3 + len(present))]
    for r in results:
        values = " | ".join(f"{r.metrics[k]:.3f}" for k, _, _ in present)
        lines.append(f"| {r.method} | {r.steps} | {r.nfe} | {values} |")
    first = results[0].metrics
    floors = [f"{first[k + '_floor']:.3f}" if k + "_floor" in first else "0" for k, _, _ in present]
    lines.append("| real data (floor) | | | " + " | ".join(floors) + " |")
    return "\n".join(lines)
