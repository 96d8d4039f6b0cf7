"""Data-parallel training over 2 CPU processes (gloo) against 1 process with the same global batch.

Two processes hold one micro-batch slot each, so their reference is one process with grad_accum=2 (the same two slots,
the same random streams): losses, weights, EMA and optimizer state must agree, for flow matching and for MeanFlow
(whose JVP cannot run through a DDP wrapper, hence the all-reduce design of jumpflow.distributed).
"""

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import jumpflow
from jumpflow import TrainConfig
from jumpflow.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from jumpflow.errors import JumpflowError, TrainingDiverged
from jumpflow.methods.flow_matching import FlowMatching
from tests.multiprocess import assert_same_training, checkpoint, free_port, losses


def tiny(**overrides) -> TrainConfig:
    values = dict(method="flow_matching", data="8gaussians", steps=6, batch_size=32, lr=1e-3, warmup_steps=2,
                  backbone_options={"width": 32, "depth": 1}, log_every=1, sample_every=0, checkpoint_every=3,
                  keep_checkpoints=10, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


RUNS = {"fm": dict(sample_every=3), "mf": dict(method="meanflow")}


def _worker(rank: int, port: int, root: str) -> None:
    """One rank of a torchrun-like launch: the environment torchrun would set, then the public API."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    for name, options in RUNS.items():
        jumpflow.train(tiny(**options), os.path.join(root, f"{name}2"))
    from jumpflow.cli import main  # evaluation-scale sampling: each rank draws its share, rank 0 writes all
    for name in ("fm2", "mf2"):
        main(["sample", "--ckpt", os.path.join(root, name), "--n", "50", "--steps", "2", "--batch-size", "7",
              "--out", os.path.join(root, f"{name}-samples.npz")])
    cut = os.path.join(root, "mf2cut")
    jumpflow.train(tiny(**RUNS["mf"]), cut, stop_after=4)  # killed at step 4: last checkpoint is step 3
    jumpflow.train({}, cut, resume=True)
    try:
        jumpflow.train(tiny(batch_size=31), os.path.join(root, "odd"))
    except JumpflowError as e:
        with open(os.path.join(root, f"odd-error-rank{rank}.txt"), "w") as f:
            f.write(str(e))
    if rank == 1:  # a NaN loss on rank 1 only, from its third step on: both ranks must stop at that step
        real_loss, calls = FlowMatching.loss, []

        def poisoned(self, x, labels):
            calls.append(1)
            out = real_loss(self, x, labels)
            out.loss = out.loss * (float("nan") if len(calls) > 2 else 1.0)
            return out

        FlowMatching.loss = poisoned
    try:
        jumpflow.train(tiny(), os.path.join(root, "nan"))
    except TrainingDiverged as e:
        with open(os.path.join(root, f"nan-error-rank{rank}.txt"), "w") as f:
            f.write(str(e))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(root)), nprocs=2, join=True)
    for name, options in RUNS.items():  # the 1-process references: same global batch, same two slots
        jumpflow.train(tiny(grad_accum=2, **options), root / f"{name}1")
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one_process_with_the_same_global_batch(runs, name):
    assert_same_training(runs / f"{name}2", runs / f"{name}1", rtol=1e-5, atol=1e-6, log_atol=1e-7)
    a = checkpoint(runs / f"{name}2")
    assert {"rng.shard.0.torch", "rng.shard.1.torch"} <= a.keys()  # both ranks' random streams, gathered


@pytest.mark.parametrize("name", ["fm2", "mf2"])
def test_sampling_across_two_processes_equals_one_process(runs, name):
    from jumpflow.cli import main

    assert main(["sample", "--ckpt", str(runs / name), "--n", "50", "--steps", "2",
                 "--out", str(runs / f"{name}-one.npz")]) == 0
    two, one = np.load(runs / f"{name}-samples.npz"), np.load(runs / f"{name}-one.npz")
    assert two["samples"].shape == (50, 2)
    assert np.array_equal(two["noise"], one["noise"])
    assert np.allclose(two["samples"], one["samples"], atol=1e-6)
    assert not list(runs.glob(f"{name}-samples*.npz"))[1:]  # one file, written once


def test_only_rank_zero_writes_files(runs):
    def files(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())

    expected = ["checkpoints/step_0000003.safetensors", "checkpoints/step_0000006.safetensors", "config.yaml",
                "metrics.jsonl", "samples/step_0000003.png", "samples/step_0000006.png"]
    assert files(runs / "fm2") == files(runs / "fm1") == expected
    assert len(losses(runs / "fm2")) == 6  # one line per logged step, not one per rank


def test_two_process_resume_is_exact(runs):
    a, b = checkpoint(runs / "mf2"), checkpoint(runs / "mf2cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_process_checkpoint_resumes_exactly_in_one_process_with_grad_accum_2(runs, tmp_path):
    from jumpflow.train import Trainer

    run = tmp_path / "moved"
    shutil.copytree(runs / "fm2", run)
    list_checkpoints(run)[6].unlink()  # keep step 3
    Trainer(tiny(**RUNS["fm"], grad_accum=2), run, resume=True).fit()
    a, b = checkpoint(runs / "fm2"), checkpoint(run)
    for key in a:
        if key.startswith(("model.", "ema.", "optim.")):
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key


def test_global_batch_not_divisible_by_world_size_is_a_clear_error_on_every_rank(runs):
    for rank in (0, 1):
        message = (runs / f"odd-error-rank{rank}.txt").read_text()
        assert "batch_size 31" in message and "world size 2" in message
    assert not (runs / "odd" / "config.yaml").exists()


def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(runs):
    for rank in (0, 1):
        assert "diverged at step 3" in (runs / f"nan-error-rank{rank}.txt").read_text()
    assert not list_checkpoints(runs / "nan")


def test_grad_accum_that_does_not_divide_the_batch_is_a_clear_error(tmp_path):
    with pytest.raises(JumpflowError, match="batch_size 32 .* grad_accum 3"):
        jumpflow.train(tiny(grad_accum=3), tmp_path / "run")


def test_checkpoints_written_before_rng_shards_existed_still_resume_exactly(tmp_path):
    full = jumpflow.train(tiny(method="meanflow"), tmp_path / "full")
    jumpflow.train(tiny(method="meanflow"), tmp_path / "cut", stop_after=4)
    old = list_checkpoints(tmp_path / "cut")[3]
    tensors, metadata = load_checkpoint(old)  # rewrite it in the earlier layout: no rng_shards, all CUDA states
    del metadata["rng_shards"], metadata["format"]
    save_checkpoint(old, tensors, metadata)
    resumed = jumpflow.train({}, tmp_path / "cut", resume=True)
    a, b = load_file(str(full)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accum_advances_curricula_and_targets_once_per_step(tmp_path):
    """Micro-batches of one step share its curriculum position (iCT's discretisation counter); an EMA target net
    (TVM's) moves once per step, not once per micro-batch."""
    seen, updates = [], []
    ict, tvm = jumpflow.methods.METHODS["ict"], jumpflow.methods.METHODS["tvm"]
    real_loss, real_update = ict.loss, tvm.update_target

    def spy_loss(self, x, labels):
        seen.append(int(self.training_step))
        return real_loss(self, x, labels)

    def spy_update(self):
        updates.append(1)
        return real_update(self)

    ict.loss, tvm.update_target = spy_loss, spy_update
    try:
        last = jumpflow.train(tiny(method="ict", grad_accum=2, steps=3, checkpoint_every=0), tmp_path / "ict")
        jumpflow.train(tiny(method="tvm", grad_accum=2, steps=3, checkpoint_every=0), tmp_path / "tvm")
    finally:
        ict.loss, tvm.update_target = real_loss, real_update
    assert seen == [0, 0, 1, 1, 2, 2]
    assert int(load_file(str(last))["model.training_step"]) == 3
    assert len(updates) == 3
