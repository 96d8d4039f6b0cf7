"""A resumable on-disk cache of (noise, teacher sample) pairs, written once and reused by every student.

Distillation from a fixed set of ODE pairs is Knowledge Distillation for diffusion (Luhman & Luhman 2021,
"Knowledge Distillation in Iterative Generative Models for Improved Sampling Speed") and rectified flow's reflow
(Liu et al. 2023, "Flow Straight and Fast"): z_1 ~ N(0, I), z_0 = ODE_{1 -> 0}(z_1) under the teacher.

Layout of a cache directory:
  manifest.json             settings (teacher id, solver, steps, seed, chunk_size, shape, num_classes, ...) and the
                            number of pairs requested; written before any chunk, so an interrupted run can resume.
  chunk_00000.safetensors   `noise`, `sample` (model space, float32) and `labels` (int64, class-conditional only);
                            metadata: format, index, rows, sha256 of the tensors' bytes (checked on every read).
Chunk i's inputs come from a generator seeded by (seed, i) alone, drawn for a full chunk and cut to its rows, so a
chunk regenerated after a crash, or extended when more pairs are asked for, is the same pairs: resuming can neither
duplicate nor skip one. Files are written to a temporary name and renamed (os.replace), so a crash leaves no
half-written chunk; a leftover temporary file is never read and is overwritten or removed by the next run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import JumpflowError
from .teacher import Teacher, check_solver

FORMAT = "jumpflow-pairs-1"
MANIFEST = "manifest.json"
# Settings that make two caches different caches: a run that disagrees on one is refused, never mixed in.
SETTINGS = ("format", "teacher_id", "solver", "steps", "seed", "chunk_size", "shape", "num_classes")
_TMP = re.compile(r"^(chunk_\d+\.safetensors|manifest\.json)\.tmp$")


class Pairs(NamedTuple):
    noise: Tensor  # (N, *shape) float32, t = 1
    sample: Tensor  # (N, *shape) float32, the teacher's ODE solution at t = 0, model space
    labels: Optional[Tensor]  # (N,) int64, or None when unconditional


def chunk_name(index: int) -> str:
    return f"chunk_{index:05d}.safetensors"


def chunk_rows(total: int, chunk_size: int, index: int) -> int:
    return min(chunk_size, total - index * chunk_size)


def chunk_generator(seed: int, index: int) -> torch.Generator:
    """A generator seeded by (seed, index) alone: numpy's SeedSequence mixes the pair into one well-spread seed."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def chunk_inputs(seed: int, index: int, chunk_size: int, rows: int, shape: tuple,
                 num_classes: int) -> Tuple[Tensor, Optional[Tensor]]:
    """Noise and labels of chunk `index`: drawn for a whole chunk, then cut, so a short last chunk is a prefix of
    the full one (torch's randn does not give prefixes of each other for different lengths)."""
    gen = chunk_generator(seed, index)
    noise = torch.randn(chunk_size, *shape, generator=gen)[:rows]
    labels = torch.randint(0, num_classes, (chunk_size,), generator=gen)[:rows] if num_classes else None
    return noise, labels


def _digest(tensors: Dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class PairCache:
    """A directory of (noise, sample, labels) chunks described by manifest.json.

    `PairCache(directory)` reads the manifest; `PairCache.open(directory)` also checks every chunk file's header
    (missing, unreadable, wrong shape or length -> JumpflowError naming the file). Chunk bytes are checked against
    their recorded sha256 when read (`chunk`, `load_all`)."""

    def __init__(self, directory: Union[str, Path]):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        self.shape, self.num_classes = tuple(m["shape"]), int(m["num_classes"])
        self.chunk_size, self.pairs = int(m["chunk_size"]), int(m["pairs"])
        self._all: Optional[Pairs] = None

    @classmethod
    def open(cls, directory: Union[str, Path]) -> "PairCache":
        cache = cls(directory)
        cache.validate()
        return cache

    def __len__(self) -> int:
        return self.pairs

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.pairs / self.chunk_size)

    def chunk_path(self, index: int) -> Path:
        return self.directory / chunk_name(index)

    def validate(self) -> None:
        for i in range(self.num_chunks):
            path = self.chunk_path(i)
            if not path.is_file():
                later = [j for j in range(i + 1, self.num_chunks) if self.chunk_path(j).is_file()]
                why = ("chunks after it exist (was it deleted?); rerun generate_pairs to regenerate it" if later
                       else "the cache is incomplete (interrupted?); rerun generate_pairs with the same settings")
                raise JumpflowError(f"pair cache {self.directory}: {path.name} is missing: {why}")
            rows = self.chunk_header(i)
            expected = chunk_rows(self.pairs, self.chunk_size, i)
            if rows != expected:
                raise JumpflowError(f"pair cache {self.directory}: {path.name} holds {rows} pairs, expected "
                                    f"{expected} (an interrupted extension? rerun generate_pairs to finish it)")

    def chunk_header(self, index: int) -> int:
        """Check chunk `index`'s header (keys, dtypes, shapes, metadata) without reading its data; return its rows."""
        path = self.chunk_path(index)
        want = {"noise": "F32", "sample": "F32", **({"labels": "I64"} if self.num_classes else {})}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                found = {key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())) for key in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise JumpflowError(f"pair cache chunk {path} is corrupt or unreadable ({e}); delete it and rerun "
                                f"generate_pairs to regenerate it") from e
        noise_shape = found.get("noise", (None, ()))[1]
        rows = noise_shape[0] if noise_shape else -1
        problems = []
        if meta.get("format") != FORMAT or meta.get("index") != str(index):
            problems.append(f"metadata {meta} is not {FORMAT} chunk {index}")
        if set(found) != set(want):
            problems.append(f"tensors {sorted(found)}, expected {sorted(want)}")
        for key, dtype in want.items():
            if key in found:
                shape = (rows,) if key == "labels" else (rows, *self.shape)
                if found[key] != (dtype, shape):
                    problems.append(f"{key} is {found[key][0]} {found[key][1]}, expected {dtype} {shape}")
        if problems:
            raise JumpflowError(f"pair cache chunk {path} does not match the manifest: {'; '.join(problems)}")
        return rows

    def chunk(self, index: int) -> Pairs:
        """Chunk `index` as CPU tensors, its bytes checked against the sha256 written with it."""
        if not 0 <= index < self.num_chunks:
            raise JumpflowError(f"chunk index {index} out of range: the cache has {self.num_chunks} chunks")
        self.chunk_header(index)
        path = self.chunk_path(index)
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
                recorded = (f.metadata() or {}).get("sha256")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise JumpflowError(f"pair cache chunk {path} is corrupt or unreadable ({e})") from e
        if recorded != _digest(tensors):
            raise JumpflowError(f"pair cache chunk {path} is corrupt: its data does not match its sha256; delete it "
                                f"and rerun generate_pairs to regenerate it")
        return Pairs(tensors["noise"], tensors["sample"], tensors.get("labels"))

    def load_all(self, device: Union[str, torch.device, None] = None) -> Pairs:
        """Every pair in order, concatenated (digits and toy caches fit in memory)."""
        if self._all is None:
            chunks = [self.chunk(i) for i in range(self.num_chunks)]
            labels = torch.cat([c.labels for c in chunks]) if self.num_classes else None
            self._all = Pairs(torch.cat([c.noise for c in chunks]), torch.cat([c.sample for c in chunks]), labels)
        if device is None:
            return self._all
        return Pairs(*(None if x is None else x.to(device) for x in self._all))

    def sample_batch(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Pairs:
        """`batch_size` pairs drawn uniformly with replacement (like jumpflow's finite datasets), on the CPU."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise JumpflowError(f"batch_size must be a positive integer, got {batch_size!r}")
        everything = self.load_all()
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return Pairs(everything.noise[idx], everything.sample[idx],
                     None if everything.labels is None else everything.labels[idx])


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise JumpflowError(f"{directory} is not a pair cache: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise JumpflowError(f"pair cache manifest {path} is unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise JumpflowError(f"{path} is not a jumpflow pair cache manifest (format {found!r}, expected {FORMAT!r})")
    missing = [key for key in (*SETTINGS, "pairs") if key not in manifest]
    if missing:
        raise JumpflowError(f"pair cache manifest {path} lacks {', '.join(missing)}")
    return manifest


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise JumpflowError(f"{name} must be a positive integer, got {value!r}")
    return value


def generate_pairs(teacher: Teacher, directory: Union[str, Path], n: int, steps: int, solver: str = "euler",
                   seed: int = 0, chunk_size: int = 4096, batch_size: int = 1024, progress: bool = True,
                   teacher_id: Optional[str] = None) -> PairCache:
    """Create or resume the cache of `n` (noise, teacher.sample(noise, steps, labels, solver)) pairs in `directory`.

    Only missing chunks are written; a larger `n` with the same settings appends (a smaller one leaves the cache
    as it is). A directory whose manifest differs in a setting (teacher id, solver, steps, seed, chunk_size,
    shape, num_classes) is refused, its files untouched. `teacher_id` defaults to `teacher.id` (a checkpoint's
    sha256); an exact-velocity teacher has none and must be given one."""
    for name, value in (("n", n), ("steps", steps), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        _positive_int(name, value)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise JumpflowError(f"seed must be an integer >= 0, got {seed!r}")
    check_solver(solver)
    teacher_id = teacher_id or teacher.id
    if not teacher_id:
        raise JumpflowError("this teacher has no id (it is not a checkpoint): pass teacher_id=... to name it, so the "
                            "cache can tell it from another teacher")
    directory = Path(directory)
    wanted = {"format": FORMAT, "teacher_id": teacher_id, "solver": solver, "steps": steps, "seed": seed,
              "chunk_size": chunk_size, "shape": list(teacher.shape), "num_classes": teacher.num_classes}
    manifest = _reconciled_manifest(directory, wanted, teacher, n)
    cache = PairCache(directory)
    todo = _missing_chunks(cache)
    done = len(cache) - sum(chunk_rows(len(cache), chunk_size, i) for i in todo)
    bar = tqdm(total=len(cache), initial=done, disable=not progress, desc="teacher pairs", unit="pair",
               dynamic_ncols=True)
    started = time.perf_counter()
    with bar:
        for i in todo:
            _write_chunk(cache, teacher, i, manifest, batch_size, bar)
    if todo:  # what the pairs cost, summed over resumes: a student's benchmark cost includes it
        manifest["generation_seconds"] = manifest.get("generation_seconds", 0.0) + time.perf_counter() - started
        _write_atomic_json(directory / MANIFEST, manifest)
    for stale in directory.iterdir():  # temporary files of a crashed run: never read, safe to drop now
        if _TMP.match(stale.name):
            stale.unlink()
    return PairCache.open(directory)


def _reconciled_manifest(directory: Path, wanted: dict, teacher: Teacher, n: int) -> dict:
    """The manifest for this request: a new one, or the existing one (grown to n) when every setting agrees."""
    path = directory / MANIFEST
    if path.exists():
        manifest = read_manifest(directory)
        differing = [f"{key} (cache: {manifest[key]!r}, requested: {wanted[key]!r})" for key in SETTINGS
                     if manifest[key] != wanted[key]]
        if differing:
            raise JumpflowError(f"pair cache {directory} was made with other settings: {'; '.join(differing)}. "
                                f"Use another directory (existing chunks are never overwritten)")
        if n <= manifest["pairs"]:
            return manifest
        manifest["pairs"] = n
    else:
        if directory.exists() and any(directory.glob("chunk_*.safetensors")):
            raise JumpflowError(f"{directory} holds chunk files but no {MANIFEST}; refusing to mix pairs into it")
        directory.mkdir(parents=True, exist_ok=True)
        scaler, checkpoint = teacher.scaler, teacher.checkpoint
        manifest = {**wanted, "pairs": n, "nfe": teacher.nfe(wanted["steps"], wanted["solver"]), "space": "model",
                    "teacher": {"method": teacher.method, "checkpoint": None if checkpoint is None else str(checkpoint),
                                "step": teacher.step, "sha256": teacher.sha256},
                    "scaler": None if scaler.mean is None else {"mean": scaler.mean.flatten().tolist(),
                                                                "std": scaler.std.flatten().tolist()}}
    _write_atomic_json(path, manifest)  # before any chunk: a crash from here on resumes with these settings
    return manifest


def _missing_chunks(cache: PairCache) -> List[int]:
    """Chunks absent, or shorter than now wanted (the last chunk of a smaller earlier request); a chunk that is
    present but corrupt is an error, never silently replaced."""
    todo = []
    for i in range(cache.num_chunks):
        if not cache.chunk_path(i).is_file():
            todo.append(i)
            continue
        rows, expected = cache.chunk_header(i), chunk_rows(len(cache), cache.chunk_size, i)
        if rows < expected:
            todo.append(i)
        elif rows > expected:
            raise JumpflowError(f"pair cache chunk {cache.chunk_path(i)} holds {rows} pairs, more than the "
                                f"{expected} the manifest allows; the cache was edited by hand")
    return todo


def _write_chunk(cache: PairCache, teacher: Teacher, index: int, manifest: dict, batch_size: int, bar) -> None:
    rows = chunk_rows(len(cache), cache.chunk_size, index)
    noise, labels = chunk_inputs(manifest["seed"], index, cache.chunk_size, rows, cache.shape, cache.num_classes)
    samples = []
    for start in range(0, rows, batch_size):
        part = slice(start, start + batch_size)
        out = teacher.sample(noise[part], manifest["steps"], None if labels is None else labels[part],
                             manifest["solver"])
        samples.append(out.to("cpu", torch.float32))
        bar.update(out.shape[0])
    tensors = {"noise": noise.contiguous(), "sample": torch.cat(samples).contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    path = cache.chunk_path(index)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "index": str(index), "rows": str(rows),
                                            "sha256": _digest(tensors)})
    os.replace(tmp, path)  # atomic: the chunk is either absent or whole
