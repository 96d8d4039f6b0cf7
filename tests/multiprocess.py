"""What the 2-process tests (test_distributed.py, test_fsdp.py) share: a rendezvous port, a run's logged losses and
checkpoints, and the comparison of two runs that must have trained alike."""

import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from jumpflow.checkpoint import list_checkpoints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def checkpoint(run, step: int = 6):
    return load_file(str(list_checkpoints(run)[step]))


def assert_same_training(run, reference, rtol: float, atol: float, log_atol: float) -> None:
    """Logged losses and metrics of 6 steps, and the step-6 checkpoint's weights, EMA and optimizer state, agree; the
    checkpoints hold the same tensors (random streams aside), and the run did train (step 3 -> 6)."""
    a_log, b_log = losses(run), losses(reference)
    assert [r["step"] for r in a_log] == list(range(1, 7))
    for a, b in zip(a_log, b_log):
        for key in set(a) - {"elapsed_s"}:
            assert a[key] == pytest.approx(b[key], rel=rtol, abs=log_atol), (a["step"], key)
    a, b = checkpoint(run), checkpoint(reference)
    assert {k for k in a if not k.startswith("rng.")} == {k for k in b if not k.startswith("rng.")}
    for key in a:
        if key.startswith(("model.", "ema.", "optim.")):
            assert a[key].shape == b[key].shape, key
            assert torch.allclose(a[key], b[key], rtol=rtol, atol=atol), key
    assert not torch.equal(checkpoint(run, 3)["model.net.out.weight"], a["model.net.out.weight"])
