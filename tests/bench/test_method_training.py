"""Per-method training settings in the bench (SlimFlow's smaller student) leave every other cell as it was.

A cell's key decides whether its finished results (hours of training in runs/bench-*) are reused; a changed key
for an unchanged method would retrain it."""

import pytest

from jumpflow import methods, nets
from jumpflow.bench import get_spec
from jumpflow.bench import run as bench_run
from jumpflow.bench.spec import merge_training
from jumpflow.errors import JumpflowError

# Keys of cells finished before per-method training settings existed (the rows.json of runs/bench-toys and
# runs/bench-digits, and the smoke preset's at the same time).
KEYS_BEFORE = {
    ("toys", "checkerboard", "flow_matching"): "eb09466449c08f7c",
    ("toys", "checkerboard", "meanflow"): "a2ab8105df050edd",
    ("toys", "8gaussians", "flow_matching"): "a4e9c35fa5e358d1",
    ("toys", "8gaussians", "meanflow"): "294cb05d096b308a",
    ("digits", "digits", "flow_matching"): "ea220359c1b2f468",
    ("digits", "digits", "meanflow"): "febd461724b01f39",
    ("smoke", "8gaussians", "flow_matching"): "229a434b25d32fb3",
    ("smoke", "digits", "flow_matching"): "9097bf8fd13d09fa",
}
SLIMFLOW = ("slimflow", "slimflow_distill")


def key(spec, dataset, method):
    config = bench_run.cell_config(spec, dataset, method, progress=False)
    return bench_run.cell_key(config, spec, bench_run.sample_steps_for(spec, method))


@pytest.mark.parametrize("preset, dataset, method", sorted(KEYS_BEFORE))
def test_unchanged_methods_keep_their_cell_keys(preset, dataset, method):
    assert key(get_spec(preset), dataset, method) == KEYS_BEFORE[preset, dataset, method]


@pytest.mark.parametrize("preset", ["smoke", "toys", "digits"])
def test_only_the_named_methods_train_differently(preset):
    spec, plain = get_spec(preset), get_spec(preset, method_training={})
    assert set(spec.method_training) == set(SLIMFLOW)
    for dataset in spec.datasets:
        for method in methods.names():
            config = bench_run.cell_config(spec, dataset, method, progress=False)
            same = config == bench_run.cell_config(plain, dataset, method, progress=False)
            assert same == (method not in SLIMFLOW), (dataset, method)
            if method not in SLIMFLOW:
                assert key(spec, dataset, method) == key(plain, dataset, method)


@pytest.mark.parametrize("preset", ["smoke", "toys", "digits"])
def test_slimflow_students_are_about_a_third_of_their_teacher(preset):
    spec = get_spec(preset)
    for dataset in spec.datasets:
        shape = (1, 8, 8) if dataset == "digits" else (2,)

        def size(method):
            config = bench_run.cell_config(spec, dataset, method, progress=False)
            backbone = config["backbone"] or ("unet" if len(shape) > 1 else "mlp")
            return sum(p.numel() for p in nets.build(backbone, shape, **config["backbone_options"]).parameters())

        teacher, student = size("flow_matching"), size("slimflow")
        assert size("slimflow_distill") == student  # stage 2 starts from stage 1: the same backbone
        assert 0.2 < student / teacher < 0.4, (dataset, student, teacher)


def test_merging_keeps_the_datasets_other_options_unless_the_backbone_changes():
    base = {"backbone": "unet", "backbone_options": {"channels": 32, "channel_mult": [1, 2]}, "lr": 5e-4}
    assert merge_training(base, {"backbone_options": {"channels": 16}})["backbone_options"] == {
        "channels": 16, "channel_mult": [1, 2]}
    assert "backbone_options" not in merge_training(base, {"backbone": "dit"})
    assert merge_training(base, {"lr": 1e-3})["lr"] == 1e-3 and base["lr"] == 5e-4  # the preset is not changed


@pytest.mark.parametrize("method_training, match", [
    ({"no_such_method": {"*": {"lr": 1.0}}}, "unknown method|valid"),
    ({"slimflow": {"*": {"method": "meanflow"}}}, "not a setting"),
    ({"slimflow": {"*": {"widht": 3}}}, "not a setting"),
    ({"slimflow": {"lr": 1.0}}, "must map datasets")])
def test_bad_method_training_is_a_clear_error(method_training, match):
    with pytest.raises(JumpflowError, match=match):
        get_spec("toys", method_training=method_training)
