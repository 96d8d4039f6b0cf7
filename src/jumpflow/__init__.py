"""jumpflow: train, distil, evaluate and serve one-step (and few-step) generative models."""

__version__ = "0.1.0"

from .api import LoadedModel, evaluate, from_pretrained, load, sample, train  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .errors import JumpflowError, TrainingDiverged  # noqa: E402

__all__ = ["train", "load", "from_pretrained", "sample", "evaluate", "LoadedModel", "TrainConfig", "JumpflowError",
           "TrainingDiverged", "__version__"]
