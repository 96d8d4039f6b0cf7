"""Score every checkpoint of a run exactly as a bench cell is scored, so a run made outside the bench (a
`jumpflow distill` with one option changed) gets rows comparable with the bench table's (BENCHMARKS.md).

    python benchmarks/score_run.py RUN_DIR --preset digits [--steps 1 2]

Same judge as `jumpflow bench`: the preset's sample count, seed-0 eval noise shared by every row, EMA weights, the
dataset's metrics with their floors. Prints one JSON line per (checkpoint, steps), with the run's training seconds.
"""

from __future__ import annotations

import argparse
import json

import jumpflow
from jumpflow.bench.quality import DatasetJudge
from jumpflow.bench.run import generate
from jumpflow.bench.spec import get_spec
from jumpflow.checkpoint import list_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run directory (its checkpoints/ are scored in order)")
    parser.add_argument("--preset", default="toys", help="the bench preset whose judge to use (toys, digits, ...)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="sampling steps to score")
    args = parser.parse_args()
    checkpoints = sorted(list_checkpoints(args.run).items())
    if not checkpoints:
        raise SystemExit(f"{args.run} holds no checkpoints")
    spec = get_spec(args.preset)
    dataset = jumpflow.load(checkpoints[0][1]).config.data
    judge = DatasetJudge(dataset, spec.training_for(dataset).get("data_options", {}), spec.n_eval, spec.seed)
    for train_step, path in checkpoints:
        model = jumpflow.load(path)
        for steps in args.steps:
            metrics = judge.score(generate(model, judge.noise, steps, spec.sample_batch))
            row = {"train_step": train_step, "steps": steps, "train_seconds": round(model.train_seconds),
                   **{k: round(v, 4) for k, v in metrics.items() if not k.endswith("_floor")}}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
