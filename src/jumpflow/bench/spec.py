"""What a benchmark runs: datasets x methods x sampling steps under one training budget, and the named presets.

Every method trains with the same backbone, optimizer, batch, seed and budget on a dataset (the dataset's `training`
entry); only the method and its paper-default options change. The exception is a method whose point is another
training setting, named in `method_training`: SlimFlow's student is smaller than its teacher (Zhu, Liu, Liu 2024,
"SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow"). Peers (other packages' implementations,
kind "peer") join when their package is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..config import validated
from ..errors import JumpflowError

TOY_TRAINING = {"batch_size": 1024, "lr": 2e-3, "warmup_steps": 50, "ema_decay": 0.999, "steps": 2000}
DIGITS_TRAINING = {"backbone": "unet", "backbone_options": {"channels": 32, "channel_mult": [1, 2]},
                   "batch_size": 128, "lr": 5e-4, "warmup_steps": 200, "ema_decay": 0.999, "steps": 2000}
# Settings set per cell by the grid itself, which `method_training` may not change.
GRID_FIELDS = ("method", "method_options", "data", "teacher", "seed", "progress", "sample_every", "checkpoint_every",
               "keep_checkpoints")


def small_student(per_dataset: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """`method_training` giving both SlimFlow stages the same smaller backbone (stage 2 starts from stage 1)."""
    return {"slimflow": per_dataset, "slimflow_distill": per_dataset}


def merge_training(values: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    """`changes` on top of `values`; option mappings (backbone_options, ...) merge key by key, except that a changed
    backbone starts from its own defaults rather than the other backbone's options."""
    out = dict(values)
    if "backbone" in changes and changes["backbone"] != values.get("backbone"):
        out.pop("backbone_options", None)
    for key, value in changes.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class BenchSpec:
    name: str = "custom"
    datasets: List[str] = field(default_factory=lambda: ["checkerboard"])
    training: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per dataset: TrainConfig values
    methods: List[str] = field(default_factory=lambda: ["all"])  # "all": every registered non-peer method
    peers: bool = True  # add peer rows whose package is importable
    method_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per method; default: the paper's
    # Per method, then per dataset ("*": every dataset): TrainConfig values merged over the dataset's `training`
    # (SlimFlow's smaller student). Methods not named here train exactly as before (their cells keep their keys).
    method_training: Dict[str, Dict[str, Dict[str, Any]]] = field(default_factory=dict)
    # Options for every distillation method whose config has them (the pair cache's size, the teacher's ODE).
    distill_options: Dict[str, Any] = field(default_factory=dict)
    steps: Optional[int] = None  # overrides every dataset's training steps
    time_limit_s: float = 0.0  # > 0: each cell also stops after this much training time (the wall-clock budget)
    max_sample_steps: int = 100  # caps each method's bench_steps (smoke keeps sampling cheap)
    n_eval: int = 2000  # samples per evaluation (image data: capped at the size of the held-out split)
    sample_batch: int = 1024  # samples generated per network call when scoring (memory, not results)
    curve_points: int = 4  # checkpoints evaluated along training for the quality-vs-time plot
    seed: int = 0
    inception_fid: bool = False  # image data: also the standard FID (needs jumpflow[fid] and the Inception weights)
    paper_numbers: List[Dict[str, Any]] = field(default_factory=list)  # published results shown beside ours

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "BenchSpec":
        return validated(cls, values, "bench")

    def validate(self) -> None:
        if not self.datasets:
            raise JumpflowError("a benchmark needs at least one dataset")
        for name, value in (("n_eval", self.n_eval), ("curve_points", self.curve_points),
                            ("sample_batch", self.sample_batch),
                            ("max_sample_steps", self.max_sample_steps)):
            if not isinstance(value, int) or value < 1:
                raise JumpflowError(f"{name} must be a positive integer, got {value!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise JumpflowError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.time_limit_s, (int, float)) or self.time_limit_s < 0:
            raise JumpflowError(f"time_limit_s must be >= 0, got {self.time_limit_s!r}")
        self.validate_method_training()

    def validate_method_training(self) -> None:
        from .. import methods
        from ..config import TrainConfig

        allowed = {f.name for f in dataclasses.fields(TrainConfig)} - set(GRID_FIELDS)
        if not isinstance(self.method_training, dict):
            raise JumpflowError(f"method_training must map methods to {{dataset: settings}}, "
                                f"got {self.method_training!r}")
        for method, per_dataset in self.method_training.items():
            methods.METHODS[method]  # unknown names fail here, listing the valid ones
            if not isinstance(per_dataset, dict) or not all(isinstance(v, dict) for v in per_dataset.values()):
                raise JumpflowError(f"method_training[{method!r}] must map datasets (or '*') to TrainConfig values, "
                                    f"got {per_dataset!r}")
            for dataset, values in per_dataset.items():
                wrong = sorted(set(values) - allowed)
                if wrong:
                    raise JumpflowError(f"method_training[{method!r}][{dataset!r}] sets {', '.join(wrong)}: not a "
                                        f"setting a method may change (valid: {', '.join(sorted(allowed))})")

    def training_for(self, dataset: str, method: Optional[str] = None) -> Dict[str, Any]:
        """The TrainConfig values of `dataset`'s cells; with `method`, its `method_training` merged on top."""
        values = dict(self.training.get(dataset, self.training.get("*", {})))
        if method is not None:
            per_dataset = self.method_training.get(method, {})
            values = merge_training(values, per_dataset.get(dataset, per_dataset.get("*", {})))
        if self.steps is not None:
            values["steps"] = self.steps
        if self.time_limit_s:
            values["time_limit_s"] = float(self.time_limit_s)
        return values


def teachers_first(chosen: List[str]) -> List[str]:
    """Order the grid so that every distillation method comes after the cell it distils (its `bench_teacher`,
    itself possibly a student: InstaFlow distils the reflow cell), keeping the given order otherwise."""
    from .. import methods

    ordered: List[str] = []

    def place(name: str, seen: tuple) -> None:
        if name in ordered or name not in chosen:
            return
        teacher = methods.METHODS[name].bench_teacher if methods.METHODS[name].needs_teacher else None
        if teacher and teacher not in seen:
            place(teacher, seen + (name,))
        ordered.append(name)

    for name in chosen:
        place(name, ())
    return ordered


def select_methods(spec: BenchSpec) -> Tuple[List[str], Dict[str, str]]:
    """(methods to run, {method: why it is skipped}). "all" expands to every registered method that is not a peer,
    so a new method joins the benchmark by registering; peers join when their package imports."""
    from .. import methods

    chosen: List[str] = []
    for name in spec.methods:
        if name == "all":
            chosen += [m for m in methods.names() if methods.METHODS[m].kind != "peer"]
        else:
            methods.METHODS[name]  # unknown names fail here, listing the valid ones
            chosen.append(name)
    if spec.peers:
        chosen += [m for m in methods.names() if methods.METHODS[m].kind == "peer"]
    chosen = teachers_first(list(dict.fromkeys(chosen)))
    skipped = {}
    for name in dict.fromkeys(chosen):
        package = methods.METHODS[name].requires
        if package and importlib.util.find_spec(package.replace("-", "_")) is None:
            skipped[name] = f"needs the {package} package (pip install 'jumpflow[peers]')"
    return [m for m in dict.fromkeys(chosen) if m not in skipped], skipped


# Published CIFAR-10 (unconditional, 32x32) numbers for the methods jumpflow has, FID-50k against the training set.
CIFAR10_PAPER_NUMBERS = [
    {"method": "flow_matching", "nfe": 142, "fid": 6.35, "source": "Lipman et al. 2023, Table 1 (adaptive solver)"},
    {"method": "meanflow", "nfe": 1, "fid": 2.92, "source": "Geng et al. 2025 (MeanFlow), CIFAR-10 U-Net"},
    {"method": "ict", "nfe": 1, "fid": 2.51, "source": "Song & Dhariwal 2024 (iCT), abstract"},
    {"method": "ict", "nfe": 2, "fid": 2.24, "source": "Song & Dhariwal 2024 (iCT), abstract"},
]

PRESETS: Dict[str, Dict[str, Any]] = {
    # Seconds: what CI runs. A Gaussian mixture (exact flow map) and the digits, a few steps each.
    "smoke": {"datasets": ["8gaussians", "digits"], "n_eval": 256, "curve_points": 2, "max_sample_steps": 4,
              "distill_options": {"pairs": 256, "teacher_steps": 4},
              "method_training": small_student({"8gaussians": {"backbone_options": {"width": 32}},
                                                "digits": {"backbone_options": {"channels": 4}}}),
              "training": {"8gaussians": dict(TOY_TRAINING, steps=30, batch_size=256,
                                              backbone_options={"width": 64, "depth": 2}),
                           "digits": dict(DIGITS_TRAINING, steps=6, batch_size=32, lr=2e-3, warmup_steps=1,
                                          backbone_options={"channels": 8, "channel_mult": [1, 2]})}},
    # Minutes on 2 CPU cores: the 2-D toys with the recipe of BENCHMARKS.md.
    # SlimFlow's student: width 144 (0.41M parameters, a third of the teacher's 1.25M).
    "toys": {"datasets": ["checkerboard", "8gaussians"], "training": {"*": TOY_TRAINING},
             "method_training": small_student({"*": {"backbone_options": {"width": 144}}})},
    # Tens of minutes on 2 CPU cores: 8x8 digits, a 1.2M-parameter UNet, FD on the digits feature net.
    # (Students: 10k teacher pairs of 100 Euler steps, about ten minutes of the 1.2M-parameter UNet on 2 cores.)
    # (SlimFlow's student: 16 channels, 0.31M parameters, 27% of the teacher's; the paper's 15.7M student is 28% of
    # its 55.7M EDM teacher.)
    "digits": {"datasets": ["digits"], "training": {"digits": DIGITS_TRAINING}, "n_eval": 450,
               "distill_options": {"pairs": 10_000},
               "method_training": small_student({"digits": {"backbone_options": {"channels": 16}}})},
    # GPU: CIFAR-10 from its files on disk (data_options.root), Inception FID when torch-fidelity has its weights.
    "cifar10": {"datasets": ["cifar10"], "n_eval": 50000, "curve_points": 4, "inception_fid": True,
                "training": {"cifar10": {"backbone": "unet", "backbone_options": {"channels": 128,
                                                                                  "channel_mult": [1, 2, 2, 2]},
                                         "batch_size": 128, "lr": 2e-4, "warmup_steps": 1000,
                                         "ema_decay": 0.9999, "steps": 400000, "precision": "bf16"}},
                "paper_numbers": CIFAR10_PAPER_NUMBERS},
}


def get_spec(preset: Optional[str] = None, **changes) -> BenchSpec:
    values: Dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise JumpflowError(f"unknown bench preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        values = {"name": preset, **PRESETS[preset]}
    values.update({k: v for k, v in changes.items() if v is not None})
    return BenchSpec.from_dict(values)
