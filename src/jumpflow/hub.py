"""Share a trained model: a Hugging Face Hub-style directory, loadable offline and from a repo id.

Layout written by `save_pretrained(model, DIR)`:
  config.json        everything needed to rebuild the model: jumpflow version, method and its options (the run's
                     TrainConfig), backbone and its resolved options, data (name, kind, shape, classes), scaler,
                     training step and time, sampling facts (steps, NFE, guidance) and the run's measurements
  model.safetensors  the EMA weights of the student (`ema.*`), the method's own buffers needed to sample
                     (`method.*`, e.g. sCT's measured sigma_data) and the data scaler (`scaler.mean/std`); no
                     optimizer or RNG state; metadata {"format": "jumpflow-hub-1", ...}
  README.md          a model card: method and paper, data, NFE options, measured metrics, usage
Nothing is read or written with pickle. Directories are written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .build import DataInfo, Standardizer, backbone_options
from .checkpoint import split_prefix
from .config import TrainConfig
from .errors import JumpflowError

FORMAT = "jumpflow-hub-1"
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
DIFFUSERS_PIPELINE = "JumpflowPipeline"  # model_index.json's _class_name of a jumpflow diffusers export
HUB_EXTRA = "pip install 'jumpflow[hub]'  (or: pip install huggingface_hub)"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# --- what an export records ---------------------------------------------------------------------------------------
def run_directory(source: Optional[Path]) -> Optional[Path]:
    """The run directory of a checkpoint at RUN/checkpoints/step_N.safetensors, else None."""
    if source is not None and source.is_file() and source.parent.name == "checkpoints":
        return source.parent.parent
    return None


def run_measurements(run_dir: Optional[Path], step: int) -> Dict[str, Any]:
    """What the run measured up to `step`: its last training log line (metrics.jsonl), its last evaluation record
    there (a line with an "eval" mapping), and, for a benchmark cell (RUN/../rows.json), the scored rows of this
    checkpoint (quality at each NFE against the dataset, with real-vs-real floors)."""
    found: Dict[str, Any] = {"training": None, "evaluation": None, "benchmark": []}
    if run_dir is None:
        return found
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run
            if not isinstance(record, dict) or record.get("step", 0) > step:
                continue
            if isinstance(record.get("eval"), dict):
                found["evaluation"] = record
            elif "loss" in record:
                found["training"] = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    rows_file = run_dir.parent / "rows.json"
    if rows_file.is_file():
        try:
            rows = json.loads(rows_file.read_text()).get("rows", [])
        except (ValueError, AttributeError):
            rows = []
        for row in rows:
            if isinstance(row, dict) and row.get("train_step") == step and isinstance(row.get("metrics"), dict):
                found["benchmark"].append({k: row.get(k) for k in ("steps", "nfe", "dataset", "metrics")})
    return found


def export_config(model) -> Dict[str, Any]:
    """config.json: everything `load_export` needs to rebuild the model, and what the model card shows."""
    from . import __version__

    cfg = model.config
    description = model.describe()
    measurements = model.measurements
    if measurements is None:
        measurements = run_measurements(run_directory(model.source), model.step)
    return {
        "format": FORMAT,
        "jumpflow_version": __version__,
        "method": cfg.method,
        "paper": description["paper"],
        "config": cfg.to_dict(),  # the run's TrainConfig: method options, data, backbone options, recipe
        "backbone": description["backbone"],
        "backbone_options": backbone_options(cfg),  # with the options the method requires, as built
        "data": model.info.to_dict(),
        "scaler": {"kind": "none" if model.scaler.mean is None else "standard",
                   "tensors": sorted(model.scaler.tensors())},
        "step": model.step,
        "train_seconds": round(model.train_seconds, 3),
        "sampling": {k: description[k] for k in ("steps", "nfe", "default_steps", "max_steps", "power_of_two_steps",
                                                 "guidance")},
        "measurements": measurements,
    }


def export_tensors(model) -> Dict[str, Tensor]:
    """EMA student weights, the method's non-student buffers (sampling state) and the scaler; nothing else."""
    tensors = {f"ema.{k}": v for k, v in model.net.state_dict().items()}
    tensors.update({f"method.{k}": v for k, v in model.method.named_buffers() if not k.startswith("net.")})
    tensors.update(model.scaler.tensors())
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


# --- the model card -----------------------------------------------------------------------------------------------
def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metric_cells(metrics: Dict[str, Any], limit: int = 8) -> Dict[str, str]:
    """Up to `limit` numeric metrics, each with its real-vs-real floor beside it where one was measured."""
    cells = {}
    for key, value in metrics.items():
        if key.endswith("_floor") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        floor = metrics.get(f"{key}_floor")
        cells[key] = _number(value) + (f" (floor {_number(floor)})" if isinstance(floor, (int, float)) else "")
        if len(cells) == limit:
            break
    return cells


def measurements_section(measurements: Optional[Dict[str, Any]]) -> List[str]:
    m = measurements or {}
    lines = ["## Measured", ""]
    rows = m.get("benchmark") or []
    if rows:
        cells = [_metric_cells(r["metrics"]) for r in rows]
        keys = list(dict.fromkeys(k for c in cells for k in c))
        lines += [f"Benchmark scores of these weights (`jumpflow bench`, dataset `{rows[0].get('dataset')}`; "
                  f"floor = real data scored against real data):", "",
                  "| steps | NFE | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        lines += [f"| {r.get('steps')} | {r.get('nfe')} | " + " | ".join(c.get(k, "") for k in keys) + " |"
                  for r, c in zip(rows, cells)]
        lines.append("")
    evaluation = m.get("evaluation")
    if evaluation:
        cells = _metric_cells(evaluation["eval"], limit=12)
        lines += [f"Last evaluation recorded by the run (step {evaluation.get('step')}): "
                  + ", ".join(f"{k} {v}" for k, v in cells.items()), ""]
    if not rows and not evaluation:
        lines += ["No evaluation was recorded for this run (its metrics.jsonl holds training losses only). Measure "
                  "one with `jumpflow sample --ckpt DIR --n 2000 --out s.npz` then `jumpflow eval --samples s.npz "
                  "--data DATA`.", ""]
    training = m.get("training")
    if training:
        extra = ", ".join(f"{k} {_number(v)}" for k, v in training.items() if k not in ("step", "loss", "lr"))
        lines += [f"Training log at step {training.get('step')}: loss {_number(training.get('loss'))}"
                  + (f" ({extra})" if extra else "") + ".", ""]
    return lines


def model_card(config: Dict[str, Any], fmt: str = "hub") -> str:
    """README.md of an export: what it is, where it comes from, how many steps it samples in, what was measured."""
    data, sampling, train = config["data"], config["sampling"], config["config"]
    image = data["kind"] == "image"
    shape = "x".join(map(str, data["shape"]))
    tags = ["jumpflow", "one-step-generation", "flow-map", config["method"]] + (["diffusers"] if fmt == "diffusers"
                                                                              else [])
    front = ["---", f"library_name: {'diffusers' if fmt == 'diffusers' else 'jumpflow'}", "tags:"]
    front += [f"- {t}" for t in tags] + (["pipeline_tag: unconditional-image-generation"] if image else []) + ["---"]
    classes = (f"class-conditional, {data['num_classes']} classes (pass a class)" if data["num_classes"]
               else "unconditional")
    limit = sampling["max_steps"]
    rule = ("powers of two " if sampling["power_of_two_steps"] else "") + (
        f"up to {limit} steps" if limit is not None else "any number of steps")
    options = ", ".join(f"{k}={v}" for k, v in sorted(config["backbone_options"].items())) or "defaults"
    method_options = ", ".join(f"{k}={v}" for k, v in sorted(train["method_options"].items())) or "the paper's defaults"
    lines = front + [
        "", f"# {config['method']} on {data['name']}", "",
        f"A {'image' if image else 'vector'} generator trained with jumpflow "
        f"{config['jumpflow_version']}: noise to data in {sampling['default_steps']} network "
        f"evaluation{'s' if sampling['default_steps'] > 1 else ''} by default.", "",
        f"- **Method**: `{config['method']}` ({method_options}); paper: {config['paper'] or 'n/a'}",
        f"- **Data**: `{data['name']}`, {data['kind']} samples of shape {shape}, {classes}"
        + ("; images in [-1, 1]" if image else "") + ("; standardised per dimension for training, samples come back "
                                                       "in data units" if config["scaler"]["kind"] == "standard"
                                                       else ""),
        f"- **Backbone**: `{config['backbone']}` ({options}); EMA weights",
        f"- **Training**: {config['step']} steps ({_number(config['train_seconds'])} s of training), batch "
        f"{train['batch_size']}, lr {train['lr']}, EMA decay {train['ema_decay']}, seed {train['seed']}", "",
        "## Sampling steps", "",
        "| steps | NFE |", "|---|---|", *[f"| {k} | {n} |" for k, n in zip(sampling["steps"], sampling["nfe"])], "",
        f"Trained for {rule}; default {sampling['default_steps']}. Classifier-free guidance: "
        f"{'yes (`guidance=`)' if sampling['guidance'] else 'no'}.", "",
        *measurements_section(config.get("measurements")),
        "## Use", "", "```python",
    ]
    cls = ", cls=0" if data["num_classes"] else ""
    if fmt == "diffusers":
        lines += ["import torch",
                  "from jumpflow.diffusers_export import JumpflowPipeline  # pip install 'jumpflow[diffusers]'",
                  "", 'pipe = JumpflowPipeline.from_pretrained("THIS_DIRECTORY_OR_REPO")',
                  f"out = pipe(batch_size=16, num_inference_steps=1, generator=torch.Generator().manual_seed(0)"
                  f"{', class_labels=0' if data['num_classes'] else ''})",
                  "samples = out.samples  # " + ("(16, C, H, W) in [-1, 1]" if image else "(16, D)")]
    else:
        lines += ["import jumpflow  # pip install 'jumpflow[hub]'", "",
                  'model = jumpflow.from_pretrained("THIS_DIRECTORY_OR_REPO")',
                  f"x = model.generate(16, steps=1, seed=0{cls})",
                  'model.save_png(x, "samples.png")']
    lines += ["```", "", "## Citation", "", config["paper"] or "n/a", ""]
    return "\n".join(lines)


# --- writing ------------------------------------------------------------------------------------------------------
def is_export(path: Union[str, Path]) -> bool:
    """A directory written by save_pretrained (config.json of our format) or by the diffusers export."""
    p = Path(path)
    if not p.is_dir():
        return False
    for name, key, value in ((CONFIG_FILE, "format", FORMAT), ("model_index.json", "_class_name", DIFFUSERS_PIPELINE)):
        try:
            if json.loads((p / name).read_text()).get(key) == value:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def looks_like_export(path: Union[str, Path]) -> bool:
    """A folder with an export's files and no run checkpoints: load reads it as an export (and says what is wrong
    with it, rather than calling it a run without checkpoints)."""
    p = Path(path)
    names = (CONFIG_FILE, WEIGHTS_FILE, "model_index.json")
    return p.is_dir() and not (p / "checkpoints").is_dir() and any((p / n).exists() for n in names)


def write_directory(out: Union[str, Path], write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run `write(tmp)` into a fresh sibling folder, then rename it to `out`: readers never see half an export.
    A previous jumpflow export in `out` is replaced; any other non-empty folder only with overwrite=True."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise JumpflowError(f"{out} exists and is a file; give a directory for the export")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not is_export(out):
        if not overwrite:
            raise JumpflowError(f"{out} is not empty and holds no jumpflow export; choose a new or empty directory, "
                                f"or pass overwrite=True (--overwrite) to replace everything in it")
        here = Path.cwd().resolve()
        if out.resolve() in (here, *here.parents, Path.home().resolve()):
            raise JumpflowError(f"refusing to replace {out}: it is the current directory, one of its parents or the "
                                f"home directory; export into a subdirectory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        if out.exists():
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)  # put the previous export back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_pretrained(model, directory: Union[str, Path], overwrite: bool = False) -> Path:
    config = export_config(model)
    tensors = export_tensors(model)
    metadata = {"format": FORMAT, "jumpflow_version": config["jumpflow_version"], "method": config["method"],
                "step": str(config["step"])}

    def write(folder: Path) -> None:
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
        (folder / CARD_FILE).write_text(model_card(config, fmt="hub"))

    return write_directory(directory, write, overwrite)


# --- reading ------------------------------------------------------------------------------------------------------
def read_json(path: Path, what: str) -> Dict[str, Any]:
    if not path.is_file():
        raise JumpflowError(f"{path} is missing: {what}")
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise JumpflowError(f"{path} is corrupt (not JSON: {e})") from e
    if not isinstance(value, dict):
        raise JumpflowError(f"{path} is corrupt (expected a JSON object)")
    return value


def read_safetensors(path: Path, fmt: Optional[str]) -> Dict[str, Tensor]:
    if not path.is_file():
        raise JumpflowError(f"{path} is missing: an export needs its weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise JumpflowError(f"{path} is corrupt or not a safetensors file ({e})") from e
    if fmt is not None and metadata.get("format") != fmt:
        raise JumpflowError(f"{path} is a safetensors file but not a jumpflow export (format: "
                            f"{metadata.get('format')!r}, expected {fmt!r})")
    return tensors


def load_export(directory: Union[str, Path], device: str = "auto"):
    """A save_pretrained directory, or a diffusers export (its flow_map component carries the same config)."""
    from .api import assemble

    d = Path(directory)
    if (d / "model_index.json").is_file() and not (d / CONFIG_FILE).is_file():
        config = read_json(d / "flow_map" / "config.json", "the flow_map component of a diffusers export")
        config = config.get("jumpflow") if isinstance(config.get("jumpflow"), dict) else {}
        raw = read_safetensors(d / "flow_map" / "diffusion_pytorch_model.safetensors", None)
        tensors = {f"ema.{k}": v for k, v in split_prefix(raw, "net").items()}  # flow-map samplers need no buffers
        if "data_mean" in raw:
            tensors.update({"scaler.mean": raw["data_mean"], "scaler.std": raw["data_std"]})
    else:
        config = read_json(d / CONFIG_FILE, "the config of a jumpflow export")
        tensors = read_safetensors(d / WEIGHTS_FILE, FORMAT)
    if config.get("format") != FORMAT:
        raise JumpflowError(f"{d} is not a jumpflow export (config format {config.get('format')!r}, expected "
                            f"{FORMAT!r})")
    try:
        cfg = TrainConfig.from_dict(dict(config["config"]))
        info = DataInfo.from_dict(config["data"])
        step, seconds = int(config["step"]), float(config.get("train_seconds", 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise JumpflowError(f"{d}/{CONFIG_FILE} is missing or has unreadable fields: {e}") from e

    def restore(method) -> None:
        method.net.load_state_dict(split_prefix(tensors, "ema"))
        buffers = dict(method.named_buffers())
        for key, value in split_prefix(tensors, "method").items():
            if key not in buffers:
                raise KeyError(f"unexpected method buffer {key!r}")
            buffers[key].copy_(value)

    model = assemble(cfg, info, Standardizer.from_tensors(tensors), step, seconds, device, d, restore)
    model.measurements = config.get("measurements")
    return model


def from_pretrained(name_or_path: Union[str, Path], device: str = "auto", revision: Optional[str] = None,
                    token: Optional[str] = None, cache_dir: Optional[Union[str, Path]] = None):
    """A local path (offline: an export, a run directory or a checkpoint) or a Hugging Face repo id."""
    from .api import load

    path = Path(name_or_path).expanduser()
    if path.exists():
        return load(path, device)
    text = str(name_or_path)
    if not _REPO_ID.match(text) or text.startswith((".", "~")):
        raise JumpflowError(f"{text} does not exist (and is not a Hugging Face repo id like 'owner/name')")
    folder = download(text, revision=revision, token=token, cache_dir=cache_dir)
    return load(folder, device)


# --- the Hugging Face Hub -----------------------------------------------------------------------------------------
def _hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise JumpflowError(f"the Hugging Face Hub needs the huggingface_hub package: {HUB_EXTRA}") from e
    return huggingface_hub


def hub_offline() -> bool:
    """Offline mode as set now: HF_HUB_OFFLINE in the environment (huggingface_hub reads it only at import)."""
    value = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants  # a submodule: the package's lazy __getattr__ does not list it
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def download(repo_id: str, revision: Optional[str] = None, token: Optional[str] = None,
             cache_dir: Optional[Union[str, Path]] = None) -> Path:
    hub = _hub()
    offline = hub_offline()
    try:
        folder = hub.snapshot_download(repo_id=repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                       allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE],
                                       local_files_only=offline)
    except JumpflowError:
        raise
    except Exception as e:  # noqa: BLE001  # the hub client raises many types (HTTP, offline, validation, cache)
        if offline:
            raise JumpflowError(f"cannot load {repo_id!r}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE) and "
                                f"the repo is not in the local cache; download it once online, or pass a local "
                                f"directory") from e
        raise JumpflowError(f"cannot download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no message'}); check the repo id, your "
                            f"network and, for a private repo, your token") from e
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise JumpflowError(f"Hugging Face repo {repo_id!r} holds no {CONFIG_FILE}: it is not a jumpflow export")
    return folder


def push_to_hub(model, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None,
                commit_message: Optional[str] = None, revision: Optional[str] = None) -> str:
    """save_pretrained into a temporary folder, create the model repo if needed and upload the folder."""
    hub = _hub()
    if hub_offline():
        raise JumpflowError(f"cannot push to {repo_id!r}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE); "
                            f"unset it, or save locally with save_pretrained / `jumpflow export`")
    with tempfile.TemporaryDirectory(prefix="jumpflow-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / "export")
        try:
            api = hub.HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                       commit_message=commit_message or f"jumpflow {model.config.method} export, "
                                                                        f"step {model.step}")
        except Exception as e:  # noqa: BLE001  # network, auth and validation errors of the hub client
            raise JumpflowError(f"cannot push to {repo_id!r} on the Hugging Face Hub ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'no message'})") from e
    return str(getattr(commit, "repo_url", None) or commit)


__all__: List[str] = ["FORMAT", "save_pretrained", "load_export", "from_pretrained", "push_to_hub", "is_export",
                      "write_directory", "run_measurements"]
