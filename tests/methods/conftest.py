import pytest
import torch

from tests.methods.toy_training import train_toy, train_with_trainer


@pytest.fixture(scope="session")
def toy_flow_matching():
    """steps -> `train_toy("flow_matching", steps)`: the flow-matching baseline of the toy trainings, trained once per
    step count and shared by every test module. Each call leaves the global RNG where that training left it, as if
    it had just run (the tests train their method first, then this baseline)."""
    runs = {}

    def trained(steps: int):
        if steps not in runs:
            runs[steps] = train_toy("flow_matching", steps), torch.get_rng_state()
        run, rng_state = runs[steps]
        torch.set_rng_state(rng_state)
        return run

    return trained


@pytest.fixture(scope="session")
def trainer_flow_matching(tmp_path_factory):
    """`train_with_trainer("flow_matching", ...)` with its defaults (8 gaussians, 250 steps), run once per session:
    the loaded model and its logged losses."""
    return train_with_trainer("flow_matching", tmp_path_factory.mktemp("flow_matching"))
