"""Load test of `jumpflow serve` on loopback: a fixed number of concurrent clients for a fixed time against one model
at 1 NFE and at 100 steps, with and without micro-batching. Prints a markdown table (requests/s, p50/p99 latency,
samples/s, requests merged per forward pass) and the machine.

    python benchmarks/serve_load.py [--ckpt RUN] [--clients 8] [--seconds 10] [--n 16] [--steps 1 100]

Without --ckpt it trains a throwaway model first (`--data digits`: the digits preset's 1.2M-parameter UNet, one
training step; `--data 8gaussians`: a 256-wide MLP): load depends on the network's size, not on its quality. The
server runs in its own process with --threads torch threads; clients send only to 127.0.0.1 and stop after
--seconds. Throughput ratios (batching on vs off, 1 vs 100 steps) are the result; absolute numbers depend on the
machine and on whatever else runs on it (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def throwaway_model(data: str, out: Path) -> Path:
    import jumpflow

    options = ({"data": "digits", "backbone": "unet", "backbone_options": {"channels": 32, "channel_mult": [1, 2]}}
               if data == "digits" else {"data": data, "backbone_options": {"width": 256, "depth": 3}})
    jumpflow.api.train({"method": "meanflow", "steps": 1, "batch_size": 16, "progress": False, "sample_every": 0,
                        "checkpoint_every": 0, **options}, out)
    return out


class Server:
    """`jumpflow serve --port 0` in a subprocess; the URL comes from its banner."""

    def __init__(self, ckpt: Path, batching: bool, window_ms: float, threads: int, max_queue: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        argv = [sys.executable, "-m", "jumpflow", "serve", "--ckpt", str(ckpt), "--port", "0", "--batch-window-ms",
                str(window_ms), "--max-queue", str(max_queue)] + ([] if batching else ["--no-batching"])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            banner = lines.get(timeout=300)
        except queue.Empty:
            banner = ""
        if "http://" not in banner:
            self.stop()
            raise SystemExit(f"the server did not start (exit code {self.proc.poll()})")
        self.url = banner.split("at ", 1)[1].split()[0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def load(url: str, clients: int, seconds: float, body: dict) -> dict:
    """`clients` loops, each posting `body` (its own seeds) back to back until `seconds` have passed."""
    latencies, merged, errors = [], [], 0
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for _ in range(60):  # the socket is bound before the app is ready
            try:
                if (await client.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.5)
        await client.post("/generate", json={**body, "seed": 0})  # warm-up: first-call allocations

        deadline = time.perf_counter() + seconds

        async def one_client(k: int) -> None:
            nonlocal errors
            seed = k * 1_000_000
            while time.perf_counter() < deadline:
                seed += 1
                started = time.perf_counter()
                r = await client.post("/generate", json={**body, "seed": seed})
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                merged.append(int(r.headers["X-Batch-Requests"]))

        started = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    ok = len(latencies)
    pick = lambda q: latencies[min(ok - 1, int(q * ok))] * 1000 if ok else float("nan")  # noqa: E731
    return {"requests_s": ok / elapsed, "p50_ms": pick(0.50), "p99_ms": pick(0.99),
            "samples_s": ok * body["n"] / elapsed, "merged": statistics.fmean(merged) if merged else 0.0,
            "errors": errors, "requests": ok}


def machine(threads: int) -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load_avg = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"model on {device} with {threads} torch thread(s); load average before the run {load_avg}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="run directory or checkpoint to serve (default: a throwaway model)")
    p.add_argument("--data", default="digits", choices=["digits", "8gaussians"], help="the throwaway model's data")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=10.0, help="load duration per cell")
    p.add_argument("--n", type=int, default=16, help="samples per request")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 100], help="sampling steps to measure")
    p.add_argument("--format", default="png", choices=["png", "json"], help="what the clients ask for (the page: png)")
    p.add_argument("--window-ms", type=float, default=5.0, help="batching window of the batched server")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else throwaway_model(args.data, Path(tmp) / "model")
        rows = []
        for batching in (True, False):
            server = Server(ckpt, batching, args.window_ms, args.threads, max_queue=4 * args.clients)
            try:
                for steps in args.steps:
                    body = {"n": args.n, "steps": steps, "format": args.format}
                    rows.append((steps, batching, asyncio.run(load(server.url, args.clients, args.seconds, body))))
            finally:
                server.stop()
    print(f"\n`jumpflow serve` load test: {args.clients} clients x {args.seconds:g} s per row, n={args.n} samples per "
          f"request, {args.format} responses, "
          f"model {ckpt if args.ckpt else 'meanflow on ' + args.data + ' (throwaway)'}")
    print(f"machine: {machine(args.threads)}\n")
    print("| steps | micro-batching | requests/s | p50 ms | p99 ms | samples/s | requests per forward | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for steps, batching, r in rows:
        print(f"| {steps} | {'on, ' + format(args.window_ms, 'g') + ' ms' if batching else 'off'} | "
              f"{r['requests_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['samples_s']:.0f} | "
              f"{r['merged']:.2f} | {r['errors']} |")
    by = {(s, b): r for s, b, r in rows}
    for steps in args.steps:
        on, off = by[(steps, True)], by[(steps, False)]
        if off["requests_s"] > 0:
            print(f"\n{steps} step(s): micro-batching gives {on['requests_s'] / off['requests_s']:.2f}x the requests/s "
                  f"of one forward pass per request", end="")
    if len(args.steps) > 1 and by[(max(args.steps), True)]["samples_s"] > 0:
        lo, hi = min(args.steps), max(args.steps)
        print(f"\n{lo} vs {hi} steps (batched): {by[(lo, True)]['samples_s'] / by[(hi, True)]['samples_s']:.1f}x the "
              f"samples/s", end="")
    print()


if __name__ == "__main__":
    main()
