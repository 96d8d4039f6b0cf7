"""Tiny trained models for the server tests: quality is irrelevant, only shapes, seeds and plumbing matter."""

import pytest

import jumpflow

QUIET = {"progress": False, "sample_every": 0, "checkpoint_every": 0}


@pytest.fixture(scope="session")
def vector_run(tmp_path_factory):
    """MeanFlow on 8 gaussians, 6 steps: an unconditional 2-D one-step model."""
    out = tmp_path_factory.mktemp("serve") / "meanflow"
    jumpflow.api.train({"method": "meanflow", "data": "8gaussians", "steps": 6, "batch_size": 32, "lr": 2e-3,
                        "backbone_options": {"width": 32, "depth": 1}, **QUIET}, out)
    return out


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """Flow matching on the same data: the 100-step teacher the page compares with."""
    out = tmp_path_factory.mktemp("serve") / "flow_matching"
    jumpflow.api.train({"method": "flow_matching", "data": "8gaussians", "steps": 4, "batch_size": 32,
                        "backbone_options": {"width": 32, "depth": 1}, **QUIET}, out)
    return out


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """Class-conditional flow matching on 8x8 digits with a tiny UNet: classes and classifier-free guidance."""
    out = tmp_path_factory.mktemp("serve") / "digits"
    jumpflow.api.train({"method": "flow_matching", "data": "digits", "class_conditional": True, "steps": 2,
                        "batch_size": 8, "backbone": "unet", "backbone_options": {"channels": 8, "channel_mult": [1]},
                        "sample_steps": [1], **QUIET}, out)
    return out


@pytest.fixture(scope="session")
def vector_model(vector_run):
    return jumpflow.load(vector_run, device="cpu")


@pytest.fixture(scope="session")
def teacher_model(teacher_run):
    return jumpflow.load(teacher_run, device="cpu")


@pytest.fixture(scope="session")
def digits_model(digits_run):
    return jumpflow.load(digits_run, device="cpu")
