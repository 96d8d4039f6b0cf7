"""CIFAR-10 from the files on local disk (nothing is downloaded): 50000 training and 10000 test images (3, 32, 32).

Get the binary or the python version from https://www.cs.toronto.edu/~kriz/cifar.html and point `root` at any of:
  * the folder holding `cifar-10-batches-bin/` or `cifar-10-batches-py/` (or the unextracted archive),
  * one of those batch folders itself,
  * the `.tar.gz` archive (members are read in memory, nothing is extracted).
The python version's batches are pickles: they are read with an unpickler that only rebuilds numpy arrays, so a
tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..errors import JumpflowError
from .base import TensorDataset

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
ENV_VAR = "JUMPFLOW_CIFAR10"
_PIXELS = 3 * 32 * 32  # per image: 1024 R, then 1024 G, then 1024 B, each 32x32 row-major
_RECORD = 1 + _PIXELS  # binary version: one label byte, then the pixels
_NUM_CLASSES = 10
_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]  # five training batches, then the test one
_FOLDERS = ("cifar-10-batches-bin", "cifar-10-batches-py")  # the binary version first: it needs no unpickling
_ARCHIVES = ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz")
_HOW_TO_GET = (f"download the binary or python version from {URL} and set data_options.root (or the {ENV_VAR} "
               f"environment variable) to the folder or the .tar.gz archive; nothing is downloaded automatically")

Records = Tuple[np.ndarray, np.ndarray]  # (pixels (n, 3072) uint8, labels (n,) int64)


def _reconstruct():
    try:  # NumPy 2 moved numpy.core to numpy._core; the official pickles name the old module
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - NumPy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text, encoding="utf-8"):
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); allow only that use
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


class _BatchUnpickler(pickle.Unpickler):
    """Rebuilds the dict of a CIFAR-10 batch and refuses every global that is not part of a numpy array."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def __init__(self, file, where: str):
        super().__init__(file, encoding="bytes")  # the official files are Python 2 pickles: keep str as bytes
        self.where = where

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise JumpflowError(f"{self.where}: not a CIFAR-10 batch: the pickle asks for {module}.{name}, which a "
                                f"CIFAR-10 batch never contains; refusing to load it; {_HOW_TO_GET}")
        if name == "_reconstruct":
            return _reconstruct()
        return {"ndarray": np.ndarray, "dtype": np.dtype, "encode": _latin1_encode}[name]


def _corrupt(where: str, why: str) -> JumpflowError:
    return JumpflowError(f"{where}: {why}; the file is truncated or corrupt: {_HOW_TO_GET}")


def _checked(pixels: np.ndarray, labels: np.ndarray, where: str) -> Records:
    if len(pixels) == 0:
        raise _corrupt(where, "no images in the file")
    if labels.min() < 0 or labels.max() >= _NUM_CLASSES:
        raise _corrupt(where, f"labels must be 0..9, found {int(labels.min())}..{int(labels.max())}")
    return pixels, labels.astype(np.int64)


def _parse_bin(raw: bytes, where: str) -> Records:
    if len(raw) == 0 or len(raw) % _RECORD:
        raise _corrupt(where, f"{len(raw)} bytes is not a whole number of {_RECORD}-byte records "
                              f"(1 label byte + {_PIXELS} pixel bytes)")
    records = np.frombuffer(raw, np.uint8).reshape(-1, _RECORD)  # a view: no copy of the file's bytes
    return _checked(records[:, 1:], records[:, 0], where)


def _parse_pickle(raw: bytes, where: str) -> Records:
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), where).load()
    except JumpflowError:
        raise
    except Exception as e:  # the restricted unpickler can run no code, so any failure here means a damaged file
        raise _corrupt(where, f"could not unpickle it ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise _corrupt(where, f"expected a pickled dict, found {type(batch).__name__}")
    pixels = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2
            and pixels.shape[1] == _PIXELS):
        found = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise _corrupt(where, f"expected 'data' to be a uint8 array (n, {_PIXELS}), found {found}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = np.empty(0)
    if labels.shape != (len(pixels),):
        raise _corrupt(where, f"expected {len(pixels)} integer 'labels', found {labels.shape}")
    return _checked(pixels, labels, where)


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Tuple[str, Dict[str, Callable[[], bytes]]]]:
    """(where, {file name: read it}) for a batch folder or a .tar archive; the archive stays open inside `with`."""
    if path.is_dir():
        yield str(path), {p.name: p.read_bytes for p in path.iterdir() if p.is_file()}
        return
    try:
        with tarfile.open(path, "r:*") as archive:
            members = [m for m in archive.getmembers() if m.isfile()]
            reads = {m.name.rsplit("/", 1)[-1]: (lambda m=m: archive.extractfile(m).read()) for m in members}
            yield str(path), reads
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise JumpflowError(f"{path}: could not read the archive ({type(e).__name__}: {e}); it is truncated or "
                            f"corrupt: {_HOW_TO_GET}") from None


def _locate(root: Path) -> Path:
    """The batch folder or archive under `root` (see the module docstring), or a JumpflowError naming what was tried."""
    if root.is_file():
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return root
        raise JumpflowError(f"{root}: expected a folder or the CIFAR-10 .tar.gz archive, found another file")
    if root.is_dir():
        names = {p.name for p in root.iterdir()}
        if any(b in names or b + ".bin" in names for b in _BATCHES):
            return root  # the batch folder itself
        for candidate in _FOLDERS + _ARCHIVES:
            if candidate in names:
                return root / candidate
    raise JumpflowError(f"CIFAR-10 not found at {root}: looked for {', '.join(_FOLDERS)} (holding "
                        f"{', '.join(b + '[.bin]' for b in _BATCHES)}) or {', '.join(_ARCHIVES)} inside it, or those "
                        f"batch files directly in it; {_HOW_TO_GET}")


def _read_batches(path: Path) -> List[Records]:
    with _open(path) as (where, files):
        binary = all(b + ".bin" in files for b in _BATCHES)
        if not binary and not all(b in files for b in _BATCHES):
            have = sorted(n for n in files if n.split(".")[0] in _BATCHES)
            raise JumpflowError(f"{where}: incomplete CIFAR-10: expected {', '.join(_BATCHES)} (python version) or "
                                f"the same names with .bin (binary version), found {have or 'none of them'}; "
                                f"{_HOW_TO_GET}")
        parse, suffix = (_parse_bin, ".bin") if binary else (_parse_pickle, "")
        return [parse(files[b + suffix](), f"{where}/{b}{suffix}") for b in _BATCHES]


def _images(batches: List[Records]) -> torch.Tensor:
    """Pixels uint8 -> float32 in [-1, 1] (x / 127.5 - 1), written once into one preallocated array."""
    x = np.empty((sum(len(p) for p, _ in batches), _PIXELS), np.float32)
    start = 0
    for pixels, _ in batches:
        np.divide(pixels, np.float32(127.5), out=x[start:start + len(pixels)], dtype=np.float32)
        start += len(pixels)
    x -= 1.0
    return torch.from_numpy(x).view(-1, 3, 32, 32)  # channel-major rows: R plane, G plane, B plane


def cifar10(root=None, n_test: Optional[int] = None) -> TensorDataset:
    """CIFAR-10 as a TensorDataset: train (50000, 3, 32, 32), test (10000, 3, 32, 32) in [-1, 1], labels 0..9.

    `root`: see the module docstring; default the JUMPFLOW_CIFAR10 environment variable, else ./data/cifar10.
    `n_test`: keep only the first n_test test images (default all), e.g. a smaller reference set for metrics.
    """
    root = Path(root if root is not None else os.environ.get(ENV_VAR) or "data/cifar10").expanduser()
    batches = _read_batches(_locate(root))
    train, test = batches[:-1], batches[-1]
    if n_test is not None:
        if not isinstance(n_test, (int, np.integer)) or isinstance(n_test, bool) or not 1 <= n_test <= len(test[0]):
            raise JumpflowError(f"cifar10: n_test must be an integer in [1, {len(test[0])}], got {n_test!r}")
        test = (test[0][: int(n_test)], test[1][: int(n_test)])
    train_labels = torch.from_numpy(np.concatenate([y for _, y in train]))
    test_labels = torch.from_numpy(test[1].copy())
    return TensorDataset("cifar10", _images(train), _images([test]), train_labels, test_labels,
                         num_classes=_NUM_CLASSES)
