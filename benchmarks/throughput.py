"""Training and sampling throughput of every from-scratch method on the image backbones, as ratios to flow matching on
the same backbone measured in one run (issue 7).

    python benchmarks/throughput.py [--backbones unet,dit] [--methods all] [--batch 64] [--rounds 5]
        [--steps-per-round 10] [--device cpu|cuda] [--size cpu|gpu] [--num-classes 0] [--out results.json]

- Training: one step is what the Trainer does (jumpflow.train): each of the method's optimizer updates (its own loss,
  backward, gradient clipping, a finite check, AdamW step), then the EMA update the method may read its targets from.
  Images/s per round; rounds interleave the methods (as benchmarks/speed.py does) so machine load hits all alike;
  warm-up steps are excluded; the median round is reported, with its ratio to flow matching.
- Peak training memory per (backbone, method), from building the method (parameters, EMA copy, AdamW state) through a
  few steps: on CUDA torch.cuda.max_memory_allocated (peak reset per cell); on CPU the growth of the peak resident set
  (VmHWM, reset through /proc/self/clear_refs) over the resident set before building, in a fresh subprocess per cell
  so memory freed by earlier cells and kept by the C allocator cannot hide it.
- Sampling: samples/s of every method at 1 step (1 NFE for all of them) and of flow matching at 100 steps, same
  backbone, batch and noise, interleaved rounds, median.

Distillation methods are left out (they need a trained teacher); so are peers (other libraries' implementations).
Sizes: "cpu" = the digits-sized nets on 8x8x1 images (UNet 32 channels, mult (1, 2); DiT "cpu/2"); "gpu" = 32x32x3
with the CIFAR-10 UNet preset (DDPM's 36M net) and DiT-B/2; "tiny" is for tests. Prints markdown tables and the
machine; speed is a ratio (DESIGN.md: never a bare absolute time), absolute numbers are for reading only.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from jumpflow import methods
from jumpflow.build import DataInfo, build_method, resolve_device
from jumpflow.config import TrainConfig
from jumpflow.ema import EMA
from jumpflow.errors import JumpflowError

REFERENCE = "flow_matching"
REFERENCE_STEPS = 100  # the multi-step baseline one-step methods are compared with
WARMUP_STEPS = 2  # per cell before the first round: optimizer state, allocator, kernel selection
ROUND_WARMUP_STEPS = 1  # per cell and round: caches refilled after the other cells ran
MEMORY_STEPS = 3  # steps of the memory measurement (the first allocates AdamW state)

# size -> (image shape, backbone -> options). Options left out come from jumpflow.nets.preset (32x32: the CIFAR UNet).
SIZES: dict[str, tuple] = {
    "cpu": ((1, 8, 8), {"unet": {"channels": 32, "channel_mult": (1, 2)}, "dit": {"size": "cpu/2"}}),
    "gpu": ((3, 32, 32), {"unet": {}, "dit": {"size": "B/2"}}),
    "tiny": ((1, 8, 8), {"unet": {"channels": 8, "channel_mult": (1,)}, "dit": {"size": "tiny/2"}}),
}


def from_scratch_methods() -> list[str]:
    return [n for n in methods.names() if methods.METHODS[n].kind == "from_scratch"]


def select_methods(spec: str) -> list[str]:
    """"all" or a comma list; flow matching, the reference, always runs (first)."""
    valid = from_scratch_methods()
    chosen = valid if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    for name in chosen:
        if methods.METHODS[name].kind != "from_scratch":  # unknown names raise JumpflowError listing the valid ones
            raise JumpflowError(f"{name!r} is a {methods.METHODS[name].kind} method: this benchmark trains from "
                                f"data only (distillation needs a trained teacher); from-scratch methods: "
                                f"{', '.join(valid)}")
    return [REFERENCE] + [n for n in dict.fromkeys(chosen) if n != REFERENCE]


def select_backbones(spec: str) -> list[str]:
    chosen = [b.strip() for b in spec.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in SIZES["cpu"][1]]
    if unknown or not chosen:
        raise JumpflowError(f"unknown backbone(s) {', '.join(unknown) or '(none)'}; image backbones: unet, dit")
    return chosen


class Cell:
    """One (backbone, method) built as the Trainer builds it: method, EMA copy handed to the method, AdamW per
    optimizer the method declares, gradient clipping at the TrainConfig default."""

    def __init__(self, backbone: str, method: str, size: str, num_classes: int, device: torch.device):
        shape, options = SIZES[size]
        self.cfg = TrainConfig(method=method, backbone=backbone, backbone_options=dict(options[backbone]))
        self.method = build_method(self.cfg, DataInfo("throughput", "image", shape, num_classes)).to(device)
        self.ema = EMA(self.method.net, self.cfg.ema_decay)
        self.method.use_ema(self.ema.shadow)
        self.method.plan(10_000)  # curricula (iCT, ECT) need a run length; the value changes no step's cost
        self.optimizers = {name: (list(params), torch.optim.AdamW(params, lr=self.cfg.lr * scale))
                           for name, (params, scale) in self.method.optimizers().items()}
        self.parameters = sum(p.numel() for p in self.method.net.parameters())
        self.step_index = 0

    def train_step(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        for name in self.method.updates(self.step_index):
            params, optimizer = self.optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            loss = self.method.update_loss(name, x, labels).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            if not torch.isfinite(loss.detach() + grad_norm):  # the Trainer's one host sync per update
                raise JumpflowError(f"{self.method.name}: non-finite loss or gradient in the throughput benchmark")
            optimizer.step()
        self.ema.update(self.method.net, self.step_index)
        self.step_index += 1


def batch(size: str, n: int, num_classes: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SIZES[size][0], generator=generator).to(device)
    labels = torch.randint(0, num_classes, (n,), generator=generator).to(device) if num_classes else None
    return x, labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(cells: dict[str, Cell], x, labels, rounds: int, steps: int, device) -> dict[str, list[float]]:
    """Images/s of each cell per round, rounds interleaved across cells, warm-up steps excluded."""
    for cell in cells.values():
        for _ in range(WARMUP_STEPS):
            cell.train_step(x, labels)
    out = {name: [] for name in cells}
    for _ in range(rounds):
        for name, cell in cells.items():
            for _ in range(ROUND_WARMUP_STEPS):
                cell.train_step(x, labels)
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                cell.train_step(x, labels)
            sync(device)
            out[name].append(x.shape[0] * steps / (time.perf_counter() - started))
    return out


def sample_throughput(samplers: dict[str, tuple], noise, labels, rounds: int, device) -> dict[str, list[float]]:
    """Samples/s of each (label -> (cell, steps)) per round, interleaved, one warm-up call each first."""
    for cell, steps in samplers.values():
        cell.method.sample(noise, steps, labels=labels, net=cell.ema.shadow)
    out = {label: [] for label in samplers}
    for _ in range(rounds):
        for label, (cell, steps) in samplers.items():
            sync(device)
            started = time.perf_counter()
            cell.method.sample(noise, steps, labels=labels, net=cell.ema.shadow)
            sync(device)
            out[label].append(noise.shape[0] / (time.perf_counter() - started))
    return out


# --- peak memory -------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise JumpflowError(f"/proc/self/status has no {field}")


def memory_cell(backbone: str, method: str, size: str, n: int, num_classes: int, device: torch.device) -> dict:
    """Peak memory (MiB) of building and training one cell, in this process (the CPU path runs it in a fresh one)."""
    x, labels = batch(size, n, num_classes, device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        cell = Cell(backbone, method, size, num_classes, device)
        for _ in range(MEMORY_STEPS):
            cell.train_step(x, labels)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del cell
        return {"peak_mib": peak / 2**20, "measure": "torch.cuda.max_memory_allocated growth"}
    # Load the kernels and libraries the method's step touches (torch.func for JVPs...) on a tiny net first, so their
    # code pages and one-off buffers are not counted.
    warm = Cell(backbone, method, "tiny", num_classes, device)
    warm.train_step(*batch("tiny", n, num_classes, device))  # batch n: IMM needs a multiple of its group size
    del warm
    gc.collect()
    base = _proc_status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)
        measure = "peak RSS growth (VmHWM reset), fresh process per cell"
    except OSError:
        measure = "peak RSS growth (VmHWM not resettable: includes the start-up peak), fresh process per cell"
    cell = Cell(backbone, method, size, num_classes, device)
    for _ in range(MEMORY_STEPS):
        cell.train_step(x, labels)
    peak = _proc_status_kib("VmHWM") - base
    return {"peak_mib": max(peak, 0) / 1024, "measure": measure}


def memory_in_subprocess(backbone: str, method: str, size: str, n: int, num_classes: int) -> dict:
    """memory_cell on CPU in a fresh interpreter (this script, --memory-cell), which inherits the thread settings."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-cell", backbone, method, "--size", size,
           "--batch", str(n), "--num-classes", str(num_classes), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # its stderr goes in our error
    if done.returncode != 0:
        raise JumpflowError(f"memory measurement of {backbone}/{method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- report ------------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


def tables(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    device = f"{m['device']} ({m['device_name']})" if "device_name" in m else m["device"]
    lines = [f"machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}, device {device}",
             (f"size {s['size']}, batch {s['batch']}, {s['rounds']} interleaved rounds of {s['steps_per_round']} "
              f"steps (median), num_classes {s['num_classes']}; peak memory: {results['memory_measure']}"),
             f"left out ({results['left_out']['reason']}): {', '.join(results['left_out']['methods'])}", ""]
    for backbone, info in results["backbones"].items():
        lines += [(f"### {backbone} {info['options']} on {'x'.join(map(str, info['shape']))}, "
                   f"{info['parameters'] / 1e6:.2f}M parameters"), "",
                  ("| method | train images/s | images/s ratio to flow matching | peak memory (MiB) "
                   "| memory ratio to flow matching |"),
                  "|---|---|---|---|---|"]
        for row in (r for r in results["train"] if r["backbone"] == backbone):
            lines.append(f"| {row['method']} | {row['images_per_s']:.1f} | {row['ratio_to_flow_matching']:.2f} | "
                         f"{row['peak_memory_mib']:.1f} | {row['memory_ratio_to_flow_matching']:.2f} |")
        lines += ["", f"| sampler | NFE | samples/s | ratio to flow matching at {REFERENCE_STEPS} steps |",
                  "|---|---|---|---|"]
        for row in (r for r in results["sampling"] if r["backbone"] == backbone):
            lines.append(f"| {row['method']}, {row['steps']} step{'s' if row['steps'] > 1 else ''} | {row['nfe']} | "
                         f"{row['samples_per_s']:.0f} | {row['ratio_to_flow_matching_100']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def run(backbones: Sequence[str], names: Sequence[str], size: str, n: int, rounds: int, steps: int,
        device: torch.device, num_classes: int = 0, memory: bool = True) -> dict:
    """The whole benchmark; returns the results dict (also what --out writes)."""
    x, labels = batch(size, n, num_classes, device)
    noise = torch.randn(n, *SIZES[size][0], generator=torch.Generator().manual_seed(1)).to(device)
    left = [m for m in methods.names() if methods.METHODS[m].kind != "from_scratch"]
    results = {"machine": machine(device),
               "settings": {"size": size, "batch": n, "rounds": rounds, "steps_per_round": steps,
                            "warmup_steps": WARMUP_STEPS, "round_warmup_steps": ROUND_WARMUP_STEPS,
                            "num_classes": num_classes, "methods": list(names), "backbones": list(backbones)},
               "left_out": {"reason": "distillation methods need a trained teacher; peers are other libraries' "
                                      "implementations", "methods": left},
               "memory_measure": "not measured", "backbones": {}, "train": [], "sampling": []}
    for backbone in backbones:
        torch.manual_seed(0)
        cells = {name: Cell(backbone, name, size, num_classes, device) for name in names}
        results["backbones"][backbone] = {"shape": list(SIZES[size][0]), "options": SIZES[size][1][backbone],
                                          "parameters": cells[REFERENCE].parameters}
        train = {k: statistics.median(v) for k, v in train_throughput(cells, x, labels, rounds, steps, device).items()}
        samplers = {f"{name}@1": (cell, 1) for name, cell in cells.items()}
        samplers[f"{REFERENCE}@{REFERENCE_STEPS}"] = (cells[REFERENCE], REFERENCE_STEPS)
        sampled = {k: statistics.median(v)
                   for k, v in sample_throughput(samplers, noise, labels, max(rounds, 1), device).items()}
        nfe = {label: cell.method.nfe(k) for label, (cell, k) in samplers.items()}
        del cells, samplers
        gc.collect()
        peaks = {}
        for name in names:
            if not memory:
                peaks[name] = {"peak_mib": float("nan"), "measure": "not measured"}
            elif device.type == "cuda":
                peaks[name] = memory_cell(backbone, name, size, n, num_classes, device)
            else:
                peaks[name] = memory_in_subprocess(backbone, name, size, n, num_classes)
            results["memory_measure"] = peaks[name]["measure"]
        for name in names:
            results["train"].append({
                "backbone": backbone, "method": name, "images_per_s": train[name],
                "ratio_to_flow_matching": train[name] / train[REFERENCE], "peak_memory_mib": peaks[name]["peak_mib"],
                "memory_ratio_to_flow_matching": peaks[name]["peak_mib"] / peaks[REFERENCE]["peak_mib"]
                if peaks[REFERENCE]["peak_mib"] > 0 else float("nan")})
        reference = sampled[f"{REFERENCE}@{REFERENCE_STEPS}"]
        for label, value in sampled.items():
            name, k = label.split("@")
            results["sampling"].append({
                "backbone": backbone, "method": name, "steps": int(k), "samples_per_s": value,
                "nfe": nfe[label], "ratio_to_flow_matching_100": value / reference})
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="unet,dit", help="comma list of image backbones")
    p.add_argument("--methods", default="all", help="'all' (every from-scratch method) or a comma list")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:1, ...)")
    p.add_argument("--size", default="cpu", choices=sorted(SIZES))
    p.add_argument("--num-classes", type=int, default=0, help="> 0: class-conditional nets and random labels")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--memory-cell", nargs=2, metavar=("BACKBONE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for name in ("batch", "rounds", "steps_per_round"):
        if getattr(args, name) < 1:
            raise JumpflowError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    device = resolve_device(args.device)
    if args.memory_cell:  # the CPU memory subprocess: one JSON line on stdout
        print(json.dumps(memory_cell(*args.memory_cell, args.size, args.batch, args.num_classes, device)))
        return {}
    results = run(select_backbones(args.backbones), select_methods(args.methods), args.size, args.batch, args.rounds,
                  args.steps_per_round, device, args.num_classes, memory=not args.no_memory)
    print(tables(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
