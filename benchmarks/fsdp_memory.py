"""Per-process memory of data-parallel training with the model replicated vs sharded (`parallel=fsdp`), issue 7.

    python benchmarks/fsdp_memory.py [--procs 2] [--size B/2] [--method flow_matching] [--batch 4] [--steps 2]

Launches `--procs` CPU processes (gloo) that train the DiT of `--size` on the built-in 32x32 `shapes` data through
jumpflow's Trainer, once with parallel=replicate and once with parallel=fsdp, and reports per process:
- state: bytes this process holds in parameters, gradients, AdamW moments and the EMA copy after the last step (a
  sharded tensor counts its local shard), the part of memory that sharding divides;
- resident set (RSS) once the Trainer is built, and its peak during the training steps (VmHWM reset through
  /proc/self/clear_refs after building): the peak adds gradients, the AdamW moments made at the first step,
  activations, the gathered block being computed and communication buffers. Both include the process's runtime
  (Python, torch: ~0.4 GB) and the dataset. The children run with a fixed glibc mmap threshold, so large tensors go
  back to the system when freed (the whole model that FSDP builds once before sharding it does) and RSS follows what
  is allocated.
The run stops before its last step (like a killed job), so no checkpoint gathering or picture enters the numbers.
CPU only (no GPU was lent here); on CUDA the same split applies to device memory. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def _local_bytes(t) -> int:
    from jumpflow.fsdp import is_sharded

    t = t.to_local() if is_sharded(t) else t
    return t.numel() * t.element_size()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": the peak resident set restarts from the current one
        f.write("5")


def _worker(rank: int, procs: int, port: int, args, parallel: str, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(procs), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from jumpflow import TrainConfig
    from jumpflow.train import Trainer

    cfg = TrainConfig(method=args.method, data="shapes", backbone="dit", backbone_options={"size": args.size},
                      steps=args.steps + 1, batch_size=args.batch, warmup_steps=1, sample_every=0, checkpoint_every=0,
                      log_every=1, progress=False, parallel=parallel, device="cpu")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, os.path.join(out, "run"))
        gc.collect()
        _reset_peak()
        before = _status_mb("VmRSS")
        trainer.fit(stop_after=args.steps)  # before the last step, like a killed job: no checkpoint, no picture
        peak = _status_mb("VmHWM")
        params = list(trainer.method.net.parameters())
        state = {
            "parameters": sum(_local_bytes(p) for p in params),
            "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            "adamw": sum(_local_bytes(v) for opt in trainer.optimizers.values() for s in opt.state.values()
                         for v in s.values() if torch.is_tensor(v)),
            "ema": sum(_local_bytes(p) for p in trainer.ema.shadow.parameters()),
        }
        count = sum(p.numel() for p in params)  # a DTensor's numel is the whole tensor's
    queue.put((parallel, rank, count, state, before, peak))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--size", default="B/2")
    parser.add_argument("--method", default="flow_matching")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    # glibc raises its mmap threshold after freeing a large block, after which freed tensors stay in the heap and
    # the resident set no longer falls when memory is freed (the whole model FSDP shards away would still count).
    # A fixed threshold keeps large tensors mmap'd, so RSS follows what is allocated. The children inherit it.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    rows = []
    for parallel in ("replicate", "fsdp"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(args.procs, port, args, parallel, queue), nprocs=args.procs,
                           join=True, start_method="spawn")
        rows.extend(queue.get() for _ in range(args.procs))
    mb = 1024 ** 2
    print(f"DiT-{args.size}, {args.method}, {args.procs} CPU processes (gloo), global batch {args.batch}, "
          f"{args.steps} steps; {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| parallel | rank | parameters | state MB (params + grads + AdamW + EMA) | RSS built MB | RSS peak MB |")
    print("|---|---|---|---|---|---|")
    for parallel, rank, count, state, before, peak in sorted(rows, key=lambda r: (r[0] != "replicate", r[1])):
        parts = " + ".join(f"{state[k] / mb:.0f}" for k in ("parameters", "gradients", "adamw", "ema"))
        print(f"| {parallel} | {rank} | {count / 1e6:.1f}M | {sum(state.values()) / mb:.0f} ({parts}) | {before:.0f} "
              f"| {peak:.0f} |")


if __name__ == "__main__":
    main()
