import json

import pytest
import torch

from jumpflow import methods
from jumpflow.bench import get_spec, run_bench, select_methods
from jumpflow.bench import run as bench_run
from jumpflow.cli import main
from jumpflow.errors import JumpflowError
from jumpflow.methods.flow_matching import FlowMatching


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    assert main(["bench", "--preset", "smoke", "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_smoke_bench_writes_table_plots_and_json_for_every_registered_method(smoke):
    out, results = smoke
    for name in ("table.md", "quality_vs_nfe.png", "quality_vs_time.png", "samples_8gaussians.png",
                 "samples_digits.png"):
        assert (out / name).stat().st_size > 0, name
    expected, _ = select_methods(get_spec("smoke"))
    assert set(expected) >= {m for m in methods.names() if methods.METHODS[m].kind != "peer"}
    for dataset in ("8gaussians", "digits"):
        final = [r for r in results["rows"] if r["dataset"] == dataset and r["final"]]
        assert {r["method"] for r in final} == set(expected)
        assert {(r["method"], r["steps"]) for r in final} >= {("meanflow", 1), ("meanflow", 2), ("flow_matching", 2)}
    table = (out / "table.md").read_text()
    assert "real data (floor)" in table and "### digits" in table and "| meanflow | 1 | 1 |" in table


def test_smoke_bench_scores_ground_truth_and_image_metrics_with_floors(smoke):
    _, results = smoke
    toy = results["datasets"]["8gaussians"]
    assert {"sliced_wasserstein", "log_likelihood"} <= set(toy["floors"])
    toy_rows = [r for r in results["rows"] if r["dataset"] == "8gaussians"]
    assert all("flow_map_error" in r["metrics"] for r in toy_rows)  # the mixture's exact map is the ground truth
    digits = results["datasets"]["digits"]
    assert digits["n_eval"] == 256 and digits["floors"]["fd"] < 5.0  # real vs real on the digits feature net
    rows = [r for r in results["rows"] if r["dataset"] == "digits" and r["final"]]
    for r in rows:
        wanted = {"fd", "precision", "recall", "density", "coverage", "class_entropy", "nearest_train"}
        assert wanted <= set(r["metrics"])
        assert r["metrics"]["fd"] > digits["floors"]["fd"]  # six training steps are far from real digits
    # Different methods give different samples (the grid does not reuse one cell's samples for another).
    assert len({round(r["metrics"]["fd"], 6) for r in rows if r["steps"] == 1}) > 1
    # Curve points: every cell was scored at more than one checkpoint, with the training time growing.
    meanflow = sorted((r["train_step"], r["train_seconds"]) for r in results["rows"]
                      if r["dataset"] == "digits" and r["method"] == "meanflow" and r["steps"] == 1)
    assert len(meanflow) == 2 and meanflow[0][1] < meanflow[1][1]


def test_rerun_skips_finished_cells_and_refuses_other_settings(smoke, monkeypatch):
    out, results = smoke
    monkeypatch.setattr(bench_run, "train_cell", lambda *a, **k: pytest.fail("a finished cell was trained again"))
    monkeypatch.setattr(bench_run, "evaluate_cell", lambda *a, **k: pytest.fail("a finished cell was scored again"))
    again = run_bench(get_spec("smoke"), out, progress=False, log=lambda _: None)
    assert again["rows"] == results["rows"]
    monkeypatch.undo()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    with pytest.raises(JumpflowError, match="trained with other settings"):
        run_bench(get_spec("smoke", steps=7), out, progress=False, log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before  # nothing trained was touched


def test_changed_scoring_settings_rescore_without_retraining(smoke, monkeypatch, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(smoke[0], out)
    monkeypatch.setattr(bench_run.api, "train", lambda cfg, run_dir, resume=False, **k: resume
                        or pytest.fail("started a new training run"))
    again = run_bench(get_spec("smoke", n_eval=128), out, progress=False, log=lambda _: None)
    assert again["datasets"]["digits"]["n_eval"] == 128
    assert all(r["metrics"]["n"] == 128 for r in again["rows"] if r["dataset"] == "digits")


def test_a_cell_without_results_is_scored_from_its_checkpoints_without_retraining(smoke, monkeypatch, tmp_path):
    import shutil

    source, results = smoke
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    (out / "digits" / "meanflow" / "rows.json").unlink()  # as if killed after training, before scoring
    trained = []
    real_train = bench_run.api.train
    monkeypatch.setattr(bench_run.api, "train", lambda cfg, run_dir, resume=False, **k: trained.append(resume)
                        or real_train(cfg, run_dir, resume=resume, **k))
    again = run_bench(get_spec("smoke"), out, progress=False, log=lambda _: None)
    assert trained == [True]  # resumed (a no-op: it had finished), not started over
    before = [r for r in results["rows"] if r["dataset"] == "digits" and r["method"] == "meanflow"]
    after = [r for r in again["rows"] if r["dataset"] == "digits" and r["method"] == "meanflow"]
    assert [r["metrics"]["fd"] for r in after] == pytest.approx([r["metrics"]["fd"] for r in before])


def test_a_newly_registered_method_joins_the_benchmark(monkeypatch):
    class Newcomer(FlowMatching):
        name = "newcomer"

    monkeypatch.setitem(methods.METHODS._entries, "newcomer", Newcomer)
    chosen, _ = select_methods(get_spec("toys"))
    assert "newcomer" in chosen


def test_peers_without_their_package_are_listed_as_skipped(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    chosen, skipped = select_methods(get_spec("toys"))
    peers = [m for m in methods.names() if methods.METHODS[m].kind == "peer"]
    assert peers and set(peers) <= set(skipped) and not set(peers) & set(chosen)
    assert "jumpflow[peers]" in skipped[peers[0]]


def test_bad_bench_requests_are_clear_errors(tmp_path, capsys):
    assert main(["bench", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown bench preset 'nope'" in capsys.readouterr().err
    assert main(["bench", "--preset", "smoke", "--methods", "nomethod", "--out", str(tmp_path / "y")]) == 2
    assert "unknown method" in capsys.readouterr().err
    with pytest.raises(JumpflowError, match="n_eval"):
        get_spec("smoke", n_eval=0)


class StandInInception(torch.nn.Module):
    """Takes what Inception takes (uint8, 3 channels, any size) and returns 16 features: the same code path, no
    weights."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)

    def forward(self, x):
        return (torch.relu(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3)),)


def test_inception_fid_runs_through_the_bench_with_a_stand_in_network(monkeypatch, tmp_path):
    from jumpflow.eval import inception

    torch.manual_seed(0)
    monkeypatch.setattr(inception, "load_inception", lambda device="cpu", **k: StandInInception().eval())
    spec = get_spec("smoke", datasets=["digits"], methods=["meanflow"], peers=False, inception_fid=True)
    results = run_bench(spec, tmp_path / "fid", progress=False, log=lambda _: None)
    rows = [r for r in results["rows"] if r["final"]]
    assert rows and all(r["metrics"]["fid"] > 0 for r in rows)
    assert "| FID (↓) |" in (tmp_path / "fid" / "table.md").read_text()
    assert list((tmp_path / "fid").glob("*.png"))


def test_without_torch_fidelity_inception_fid_fails_before_any_training(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setattr(bench_run, "train_cell", lambda *a, **k: pytest.fail("trained before checking FID tooling"))
    spec = get_spec("smoke", datasets=["digits"], methods=["meanflow"], peers=False, inception_fid=True)
    with pytest.raises(JumpflowError, match=r"jumpflow\[fid\]"):
        run_bench(spec, tmp_path / "nofid", progress=False, log=lambda _: None)


@pytest.mark.parametrize("preset", ["smoke", "toys", "digits", "cifar10"])
def test_every_preset_builds_valid_run_configs_for_every_method(preset):
    from jumpflow.bench.spec import PRESETS
    from jumpflow.config import TrainConfig

    spec = get_spec(preset)
    for dataset in spec.datasets:
        for method in methods.names():
            cfg = TrainConfig.from_dict(bench_run.cell_config(spec, dataset, method, progress=False))
            assert cfg.method == method and cfg.data == dataset and cfg.seed == spec.seed
            assert cfg.checkpoint_every * spec.curve_points <= cfg.steps  # every curve point is a checkpoint
    assert PRESETS[preset]["datasets"] == spec.datasets


def test_cifar10_preset_backbone_takes_cifar_images():
    from jumpflow import nets

    training = get_spec("cifar10").training_for("cifar10")
    net = nets.build(training["backbone"], (3, 32, 32), **training["backbone_options"])
    x = torch.randn(2, 3, 32, 32)
    t = torch.rand(2)
    assert net(x, t, t, None).shape == x.shape
