"""benchmarks/throughput.py on a tiny setting: the JSON it writes has every (backbone, method) cell with positive
throughputs and memory, flow matching is its own reference (ratio exactly 1), and user errors are clear."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from jumpflow.errors import JumpflowError

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_positive_ratios_for_every_cell(throughput, tmp_path, capsys):
    out = tmp_path / "results.json"
    throughput.main(["--size", "tiny", "--backbones", "unet", "--methods", "meanflow", "--batch", "4",
                     "--rounds", "1", "--steps-per-round", "1", "--threads", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    assert {"machine", "settings", "left_out", "memory_measure", "backbones", "train", "sampling"} <= set(results)
    assert results["machine"]["torch"] and results["machine"]["device"] == "cpu"
    train = {r["method"]: r for r in results["train"]}
    assert set(train) == {"flow_matching", "meanflow"}  # the reference is added even when not asked for
    assert train["flow_matching"]["ratio_to_flow_matching"] == 1.0
    for row in train.values():
        assert row["images_per_s"] > 0 and row["ratio_to_flow_matching"] > 0
        assert row["peak_memory_mib"] > 0 and math.isfinite(row["memory_ratio_to_flow_matching"])
    sampling = {(r["method"], r["steps"]): r for r in results["sampling"]}
    assert set(sampling) == {("flow_matching", 1), ("meanflow", 1), ("flow_matching", 100)}
    assert sampling[("flow_matching", 100)]["nfe"] == 100 and sampling[("meanflow", 1)]["nfe"] == 1
    assert sampling[("flow_matching", 100)]["ratio_to_flow_matching_100"] == 1.0
    assert all(r["samples_per_s"] > 0 for r in sampling.values())
    assert "dmd2" in results["left_out"]["methods"] and "meanflow" not in results["left_out"]["methods"]
    printed = capsys.readouterr().out
    assert "| meanflow |" in printed and "flow_matching, 100 steps | 100 |" in printed


def test_distillation_methods_and_unknown_backbones_are_refused(throughput):
    with pytest.raises(JumpflowError, match="teacher"):
        throughput.select_methods("dmd2")
    with pytest.raises(JumpflowError, match="image backbones"):
        throughput.select_backbones("mlp")
    assert throughput.select_methods("all")[0] == "flow_matching"
