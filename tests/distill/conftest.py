import pytest

import jumpflow


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """A small flow-matching run on 8 gaussians (40 steps), the teacher of the end-to-end distillation tests."""
    out = tmp_path_factory.mktemp("teacher") / "fm"
    jumpflow.api.train({"method": "flow_matching", "data": "8gaussians", "steps": 40, "batch_size": 128,
                        "backbone_options": {"width": 32, "depth": 2}, "progress": False, "sample_every": 0,
                        "checkpoint_every": 0}, out)
    return out
