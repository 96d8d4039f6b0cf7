"""parallel=fsdp over 2 CPU processes (gloo): the student, its EMA and an EMA target net sharded over the ranks must
train exactly like the replicated layout, i.e. like 1 process with the same micro-batch slots (grad_accum = slots);
checkpoints hold whole tensors under the usual names, resume exactly, and load in one plain process."""

import os

import pytest
import torch

import jumpflow
from jumpflow import TrainConfig
from jumpflow.checkpoint import list_checkpoints
from jumpflow.errors import JumpflowError
from tests.multiprocess import assert_same_training, checkpoint, free_port

# flow matching; MeanFlow (a JVP through the sharded net); TVM (backward through the JVP, an EMA target net that
# must follow the student shard by shard); flow matching with 2 micro-batches per rank (reduce-scatter once per step)
RUNS = {"fm": dict(sample_every=3), "mf": dict(method="meanflow"), "tvm": dict(method="tvm"),
        "fm_accum": dict(grad_accum=2)}


def tiny(**overrides) -> TrainConfig:
    values = dict(method="flow_matching", data="8gaussians", steps=6, batch_size=32, lr=1e-3, warmup_steps=2,
                  backbone_options={"width": 32, "depth": 2}, log_every=1, sample_every=0, checkpoint_every=3,
                  keep_checkpoints=10, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


# DMD2: a sharded generator beside a whole fake-score net, two optimizers, steps without a generator update
DMD2 = {"steps": 6, "batch_size": 32, "progress": False, "sample_every": 0, "checkpoint_every": 3,
        "keep_checkpoints": 10, "log_every": 1, "method_options": {"fake_updates": 2}}


def _worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    for name, options in RUNS.items():
        jumpflow.train(tiny(parallel="fsdp", **options), os.path.join(root, f"{name}-fsdp"))
    jumpflow.api.distill(os.path.join(root, "fm-fsdp"), "dmd2", os.path.join(root, "dmd2-fsdp"),
                         dict(DMD2, parallel="fsdp"))
    try:
        jumpflow.train(tiny(parallel="fsdp", data="digits", backbone="unet", channels_last=True, batch_size=8,
                            backbone_options={"channels": 8, "channel_mult": [1]}), os.path.join(root, "cl"))
    except JumpflowError as e:
        with open(os.path.join(root, f"cl-error-rank{rank}.txt"), "w") as f:
            f.write(str(e))
    cut = os.path.join(root, "mf-cut")
    jumpflow.train(tiny(parallel="fsdp", **RUNS["mf"]), cut, stop_after=4)  # killed at 4: last checkpoint is 3
    jumpflow.train({}, cut, resume=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(root)), nprocs=2, join=True)
    for name, options in RUNS.items():  # 1 process, the same slots: 2 ranks x grad_accum
        options = dict(options, grad_accum=2 * options.get("grad_accum", 1))
        jumpflow.train(tiny(**options), root / f"{name}-one")
    jumpflow.api.distill(root / "fm-fsdp", "dmd2", root / "dmd2-one", dict(DMD2, grad_accum=2))
    return root


@pytest.mark.parametrize("name", [*RUNS, "dmd2"])
def test_sharded_training_matches_one_process(runs, name):
    # whole tensors under the unsharded names: the checkpoint is the same file a single process writes
    assert_same_training(runs / f"{name}-fsdp", runs / f"{name}-one", rtol=1e-4, atol=1e-6, log_atol=1e-6)


def test_the_target_net_follows_the_sharded_student(runs):
    a = checkpoint(runs / "tvm-fsdp")
    start = checkpoint(runs / "tvm-fsdp", 3)
    targets = [k for k in a if k.startswith("model.target_net.")]
    assert targets and any(not torch.equal(a[k], start[k]) for k in targets)


def test_sharded_resume_is_exact(runs):
    a, b = checkpoint(runs / "mf-fsdp"), checkpoint(runs / "mf-cut")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_sharded_checkpoint_samples_in_one_plain_process(runs):
    model = jumpflow.load(runs / "fm-fsdp")
    x = model.generate(64, steps=2, seed=0)
    reference = jumpflow.load(runs / "fm-one").generate(64, steps=2, seed=0)
    assert x.shape == (64, 2) and torch.isfinite(x).all()
    assert torch.allclose(x, reference, atol=1e-4)
    assert sorted(p.name for p in (runs / "fm-fsdp" / "samples").iterdir()) == ["step_0000003.png",
                                                                                "step_0000006.png"]


def test_channels_last_with_fsdp_is_a_clear_error_on_every_rank(runs):
    for rank in (0, 1):  # FSDP2 shards contiguous parameters only; channels-last conv weights are not
        message = (runs / f"cl-error-rank{rank}.txt").read_text()
        assert "channels_last=true cannot be combined with parallel=fsdp" in message
    assert not list_checkpoints(runs / "cl")
