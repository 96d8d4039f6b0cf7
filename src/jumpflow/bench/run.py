"""Run a benchmark grid: for each dataset, train every method under the same budget (one cell each), score its EMA
weights at each sampling step count on the same noise, at several checkpoints along training, and write the report.

Resumable: a cell whose `rows.json` matches its settings is skipped; a cell whose training was interrupted resumes
from its last checkpoint; a cell holding results of other settings is refused rather than overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Union

import torch
from safetensors.torch import load_file, save_file

from .. import api, methods
from ..checkpoint import list_checkpoints
from ..config import TrainConfig
from ..errors import JumpflowError
from .quality import DatasetJudge
from .report import write_report
from .spec import BenchSpec, select_methods

PICTURE_SAMPLES = 2000


def cell_config(spec: BenchSpec, dataset: str, method: str, progress: bool) -> Dict[str, Any]:
    values = TrainConfig().to_dict()
    values.update(spec.training_for(dataset, method))  # the dataset's recipe, with the method's own changes if any
    options = dict(spec.method_options.get(method, {}))
    if methods.METHODS[method].needs_teacher:
        fields = {f.name for f in dataclasses.fields(methods.METHODS[method].Config)}
        options = {**{k: v for k, v in spec.distill_options.items() if k in fields}, **options}
    values.update(method=method, data=dataset, method_options=options, seed=spec.seed, progress=progress,
                  sample_every=0)
    # Evenly spaced checkpoints, all kept: they are the points of the quality-vs-training-time curve.
    values["checkpoint_every"] = max(1, values["steps"] // spec.curve_points)
    values["keep_checkpoints"] = spec.curve_points + 1
    return values


def sample_steps_for(spec: BenchSpec, method: str) -> List[int]:
    wanted = [k for k in methods.METHODS[method].bench_steps if k <= spec.max_sample_steps]
    return wanted or [min(methods.METHODS[method].bench_steps)]


# TrainConfig fields added after bench folders held finished cells: at these values a field leaves the key, so
# those cells keep their keys (a from-scratch cell has no teacher; the speed switches are off by default).
KEY_DEFAULTS = {"teacher": None, "grad_accum": 1, "compile": False, "channels_last": False,
                "parallel": "replicate"}


def cell_key(config: Dict[str, Any], spec: BenchSpec, steps: List[int]) -> str:
    """What a cell's results depend on (not how it was displayed): a changed setting means a different cell."""
    relevant = {k: v for k, v in within_grid(config).items() if k not in ("progress", "log_every")}
    for name, default in KEY_DEFAULTS.items():
        if name in relevant and relevant[name] == default:
            del relevant[name]
    relevant.update(n_eval=spec.n_eval, sample_steps=steps)
    if spec.inception_fid:
        relevant["inception_fid"] = True
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def within_grid(config: Dict[str, Any]) -> Dict[str, Any]:
    """The config with a student's teacher and pair cache written from its dataset's folder on (the same cell of a
    bench folder that was copied or moved is the same cell)."""
    def tail(path: str) -> str:
        parts = Path(path).parts
        return "/".join(parts[len(parts) - parts[::-1].index(config["data"]):]) if config["data"] in parts else path

    config = dict(config, method_options=dict(config["method_options"]))
    if config.get("teacher"):
        config["teacher"] = tail(config["teacher"])
    if config["method_options"].get("pair_cache"):
        config["method_options"]["pair_cache"] = tail(config["method_options"]["pair_cache"])
    return config


def train_cell(config: Dict[str, Any], run_dir: Path) -> None:
    if list_checkpoints(run_dir):
        saved = within_grid(TrainConfig.load(run_dir / "config.yaml").to_dict())
        wanted = within_grid(config)
        differs = sorted(k for k in wanted if k not in ("progress",) and saved.get(k) != wanted[k])
        if differs:
            raise JumpflowError(f"{run_dir} was trained with other settings ({', '.join(differs)}); "
                                f"use another --out or delete that folder")
        api.train({"progress": config["progress"]}, run_dir, resume=True)  # no-op when it had finished
        return
    if run_dir.exists():  # killed before its first checkpoint: nothing in it is worth keeping
        shutil.rmtree(run_dir)
    api.train(TrainConfig.from_dict(config), run_dir)


def generate(model: api.LoadedModel, noise: torch.Tensor, steps: int, batch: int) -> torch.Tensor:
    return torch.cat([model.generate(noise=chunk, steps=steps) for chunk in noise.split(batch)])


def evaluate_cell(run_dir: Path, judge: DatasetJudge, steps: List[int], cell_dir: Path,
                  sample_batch: int) -> List[Dict[str, Any]]:
    """One row per (checkpoint, sampling steps); the final checkpoint's samples are kept for the pictures."""
    rows, final_samples = [], {}
    checkpoints = list_checkpoints(run_dir)
    last = max(checkpoints)
    for train_step, path in sorted(checkpoints.items()):
        model = api.load(path)
        for k in steps:
            started = time.perf_counter()
            samples = generate(model, judge.noise, k, sample_batch)
            sample_seconds = time.perf_counter() - started
            metrics = judge.score(samples)
            rows.append({"method": model.config.method, "kind": type(model.method).kind, "steps": k,
                         "nfe": model.method.nfe(k), "train_step": train_step, "final": train_step == last,
                         "train_seconds": model.train_seconds, "sample_seconds": round(sample_seconds, 4),
                         "metrics": metrics})
            if train_step == last:  # kept for the side-by-side picture, which shows at most a few thousand
                final_samples[f"steps_{k}"] = samples[:PICTURE_SAMPLES].contiguous()
    save_file(final_samples, str(cell_dir / "final_samples.safetensors"))
    return rows


def distillation_setup(config: Dict[str, Any], dataset: str, method: str, out: Path,
                       done: Dict[str, List[Dict[str, Any]]]) -> Dict[str, float]:
    """Point a distillation cell at its teacher, the final checkpoint of the `bench_teacher` cell of the same
    dataset (trained earlier in this grid), with its pair cache inside the bench folder. Returns the costs its rows
    add to the student's own training time: the teacher's whole cost, and the pair cache's generation time."""
    teacher = methods.METHODS[method].bench_teacher
    if teacher not in done:
        raise JumpflowError(f"{method} distils the {teacher} cell of {dataset}: add {teacher} to --methods")
    final = [row for row in done[teacher] if row["final"]]
    config["teacher"] = str(list_checkpoints(out / dataset / teacher / "run")[final[0]["train_step"]])
    options = methods.METHODS[method].Config(**config["method_options"])
    if hasattr(options, "pair_cache"):
        guidance = f"-cfg{options.teacher_guidance:g}" if options.teacher_guidance not in (None, 1) else ""
        name = f"{teacher}{guidance}-{options.teacher_solver}{options.teacher_steps}-seed{options.pair_seed}"
        config["method_options"]["pair_cache"] = str(out / dataset / "pairs" / name)
    return {"teacher_seconds": final[0]["train_seconds"]}


def pair_seconds(config: Dict[str, Any]) -> float:
    from ..distill import PairCache

    folder = Path(config["method_options"].get("pair_cache", ""))
    return float(PairCache(folder).manifest.get("generation_seconds", 0.0)) if folder.name else 0.0


def run_cell(spec: BenchSpec, judge: DatasetJudge, dataset: str, method: str, out: Path,
             progress: bool, log: Callable[[str], None],
             done: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    cell_dir = out / dataset / method
    config = cell_config(spec, dataset, method, progress)
    costs = distillation_setup(config, dataset, method, out, done) if methods.METHODS[method].needs_teacher else {}
    steps = sample_steps_for(spec, method)
    key = cell_key(config, spec, steps)
    rows_file = cell_dir / "rows.json"
    if rows_file.exists() and json.loads(rows_file.read_text()).get("key") == key:
        log(f"{dataset} / {method}: done before, skipped")
        return json.loads(rows_file.read_text())["rows"]
    # Scores of other settings are derived data and get replaced; training of other settings is refused in
    # train_cell, so nothing that took long to make is overwritten.
    cell_dir.mkdir(parents=True, exist_ok=True)
    log(f"{dataset} / {method}: training ({config['steps']} steps"
        + (f", at most {config['time_limit_s']:.0f} s)" if config.get("time_limit_s") else ")"))
    train_cell(config, cell_dir / "run")
    count = len(list_checkpoints(cell_dir / "run"))
    log(f"{dataset} / {method}: scoring {count} checkpoint{'s' if count > 1 else ''} at steps {steps}")
    rows = evaluate_cell(cell_dir / "run", judge, steps, cell_dir, spec.sample_batch)
    if costs:  # a student's cost includes its teacher's (with the teacher's own upstream) and its pair cache's
        costs["pair_seconds"] = pair_seconds(config)
        rows = [dict(row, student_seconds=row["train_seconds"], **costs,
                     train_seconds=row["train_seconds"] + sum(costs.values())) for row in rows]
    rows = [dict(row, dataset=dataset) for row in rows]
    _write_json_atomic(rows_file, {"key": key, "rows": rows})
    return rows


def machine() -> Dict[str, str]:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device}


def run_bench(spec: BenchSpec, out: Union[str, Path], progress: bool = True,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or finish) the grid into `out` and return the results (also written to out/results.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen, skipped = select_methods(spec)
    for name, why in skipped.items():
        log(f"{name}: skipped, {why}")
    results: Dict[str, Any] = {"spec": asdict(spec), "machine": machine(), "skipped": skipped, "datasets": {},
                               "rows": []}
    for dataset in spec.datasets:
        judge = DatasetJudge(dataset, spec.training_for(dataset).get("data_options", {}), spec.n_eval, spec.seed,
                             spec.inception_fid)
        dataset_rows, done = [], {}
        for method in chosen:
            done[method] = run_cell(spec, judge, dataset, method, out, progress, log, done)
            dataset_rows += done[method]
        floors = {k[: -len("_floor")]: v for k, v in dataset_rows[0]["metrics"].items() if k.endswith("_floor")}
        results["datasets"][dataset] = {"kind": judge.kind, "n_eval": judge.n_eval, "floors": floors,
                                        "columns": judge.columns, "headline": judge.headline}
        results["rows"] += dataset_rows
        panels = [("data", judge.reference())]
        for method in chosen:
            saved = load_file(str(out / dataset / method / "final_samples.safetensors"))
            for k in sample_steps_for(spec, method):
                panels.append((f"{method}, {k} step{'s' if k > 1 else ''}", saved[f"steps_{k}"]))
        results["datasets"][dataset]["panels"] = panels
    write_report(results, out)
    for info in results["datasets"].values():
        info.pop("panels")
    _write_json_atomic(out / "results.json", results)
    return results
