"""Micro-batching: concurrent requests that ask the same thing of the model share one forward pass.

A one-step generator costs about the same for 1 sample as for 64 on most hardware, so merging requests that differ
only in their seed and size (same model, steps, class and guidance: the batch *key*) multiplies throughput. Requests
wait at most `window_s` for company; the queue of waiting requests is bounded (a full queue refuses at once instead of
letting latency grow without limit); inference runs on one worker thread, off the event loop, so the server keeps
answering while the model computes. The batcher knows nothing of tensors: `run_batch(key, payloads)` does the work.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Sequence

RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]  # (key, payloads) -> one result per payload


class QueueFull(Exception):
    """More requests are waiting than the queue holds; the client should retry later (HTTP 503)."""


@dataclass
class BatchResult:
    value: Any  # what run_batch returned for this request
    generation_s: float  # wall time of the forward pass that produced it
    queue_s: float  # time between submission and the start of that forward pass
    batch_requests: int  # requests merged into that forward pass (1 = ran alone)
    batch_size: int  # their total size (samples)


@dataclass
class _Job:
    key: Hashable
    payload: Any
    size: int
    future: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Merge concurrent `submit`s with equal keys into one `run_batch` call on a worker thread.

    window_s: how long the oldest waiting request waits for others; max_batch: the most samples (sum of sizes) in one
    forward pass; max_queue: the most requests waiting (not yet running) before `submit` raises QueueFull;
    enabled=False runs every request alone (the baseline the load benchmark compares against).
    """

    def __init__(self, run_batch: RunBatch, window_s: float = 0.005, max_batch: int = 4096, max_queue: int = 64,
                 enabled: bool = True):
        if window_s < 0 or max_batch < 1 or max_queue < 1:
            raise ValueError(f"need window_s >= 0, max_batch >= 1 and max_queue >= 1, got {window_s}, {max_batch}, "
                             f"{max_queue}")
        self.run_batch = run_batch
        self.window_s, self.max_batch, self.max_queue, self.enabled = window_s, max_batch, max_queue, enabled
        self.forward_passes = 0  # run_batch calls made (each is one forward pass of the model)
        self.requests_served = 0
        # One worker: the model is not shared between threads, and on a GPU one stream of work is what we want.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="jumpflow-inference")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._pending: Deque[_Job] = collections.deque()
        self._arrived: Optional[asyncio.Event] = None
        self._collector: Optional[asyncio.Task] = None

    @property
    def waiting(self) -> int:
        """Requests queued and not yet running."""
        return len(self._pending)

    async def submit(self, key: Hashable, payload: Any, size: int = 1) -> BatchResult:
        """Queue one request and wait for its result (run_batch's exception is raised here, to every request of the
        forward pass that failed)."""
        if size > self.max_batch:
            raise ValueError(f"a request of size {size} can never fit a batch of at most {self.max_batch}")
        self._ensure_started()
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"server busy: {len(self._pending)} requests are already waiting (queue limit "
                            f"{self.max_queue}); retry shortly")
        job = _Job(key, payload, size, self._loop.create_future())
        self._pending.append(job)
        self._arrived.set()
        return await job.future  # a cancelled caller cancels the future; the collector then skips the job

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._collector is not None and not self._collector.done():
            return
        # First use, or a new event loop (test clients may start one per session): jobs of a dead loop are dropped.
        self._loop, self._pending, self._arrived = loop, collections.deque(), asyncio.Event()
        self._collector = loop.create_task(self._collect())

    async def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _collect(self) -> None:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            if self.enabled:
                # Wait out the window of the oldest request; under load it is already over (requests piled up while
                # the previous forward pass ran), so a busy server never sleeps here.
                delay = self._pending[0].submitted + self.window_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            for key, jobs in self._take().items():
                await self._run(key, jobs)

    def _take(self) -> Dict[Hashable, List[_Job]]:
        """Waiting jobs (oldest first, at most max_batch samples; one job when batching is off), grouped by key."""
        groups: Dict[Hashable, List[_Job]] = {}
        total = 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # its client went away while it waited
                self._pending.popleft()
                continue
            if total and (total + job.size > self.max_batch or not self.enabled):
                break
            self._pending.popleft()
            groups.setdefault(job.key, []).append(job)
            total += job.size
        return groups

    async def _run(self, key: Hashable, jobs: List[_Job]) -> None:
        jobs = [j for j in jobs if not j.future.done()]
        if not jobs:
            return
        started = time.perf_counter()
        try:
            values = await self._loop.run_in_executor(self._executor, self.run_batch, key, [j.payload for j in jobs])
            if len(values) != len(jobs):
                raise RuntimeError(f"run_batch returned {len(values)} results for {len(jobs)} requests")
        except Exception as e:  # every request of the failed pass gets the error; the server goes on
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        finally:
            self.forward_passes += 1
        elapsed = time.perf_counter() - started
        size = sum(j.size for j in jobs)
        for j, value in zip(jobs, values):
            if not j.future.done():
                j.future.set_result(BatchResult(value, elapsed, started - j.submitted, len(jobs), size))
        self.requests_served += len(jobs)
