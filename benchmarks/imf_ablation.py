"""iMF's 1-step quality on the toys checkerboard cell's recipe with one option changed per run (BENCHMARKS.md).

    python benchmarks/imf_ablation.py [VARIANT ...] [--out runs/imf-ablation]

Each variant trains the bench's checkerboard iMF cell (same config, seed and budget, from
jumpflow.bench.run.cell_config) with its method options changed, then scores 2000 EMA samples from seed-0 noise at 1
and 2 steps with jumpflow.evaluate. "default" rescores the bench's own cell (runs/bench-toys) without training.
Finished variants are skipped on a rerun (their scores are kept in DIR/VARIANT/scores.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jumpflow
from jumpflow.bench.run import cell_config
from jumpflow.bench.spec import get_spec

VARIANTS = {
    "tangent_conditional": {"jvp_tangent": "conditional"},
    "vhead_instantaneous": {"velocity_head_time": "instantaneous"},
    "fm_share_0.75": {"flow_matching_share": 0.75},
    "fm_share_0.25": {"flow_matching_share": 0.25},
}
METRICS = ("sliced_wasserstein", "support_fraction", "mode_coverage")


def score(run: Path) -> dict:
    model = jumpflow.load(run)
    noise = model.noise(2000, 0)
    out = {}
    for steps in (1, 2):
        m = jumpflow.evaluate(model.generate(noise=noise, steps=steps, seed=0), "checkerboard")
        out[steps] = {k: round(m[k], 4) for k in METRICS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", help=f"default, {', '.join(VARIANTS)} (all when none given)")
    parser.add_argument("--out", default="runs/imf-ablation")
    parser.add_argument("--bench", default="runs/bench-toys", help="the toys bench folder holding the default cell")
    args = parser.parse_args()
    spec = get_spec("toys")
    for name in args.variants or ["default", *VARIANTS]:
        if name == "default":
            print(name, json.dumps(score(Path(args.bench) / "checkerboard" / "imf" / "run")), flush=True)
            continue
        run, done = Path(args.out) / name, Path(args.out) / name / "scores.json"
        if not done.exists():
            cfg = cell_config(spec, "checkerboard", "imf", progress=False)
            cfg["method_options"] = {**cfg["method_options"], **VARIANTS[name]}
            jumpflow.train({}, run, resume=True) if run.exists() else jumpflow.train(cfg, run)
            done.write_text(json.dumps(score(run)))
        print(name, done.read_text(), flush=True)


if __name__ == "__main__":
    main()
