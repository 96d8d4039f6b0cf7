"""Evaluation: sample-quality metrics against real data and, where the dataset knows it, the ground truth."""

from jumpflow.eval.toy_metrics import (
    LOG_PROB_FLOOR,
    energy_distance,
    evaluate_samples,
    flow_map_error,
    mean_log_likelihood,
    mmd,
    mode_balance,
    mode_coverage,
    sliced_wasserstein,
    support_fraction,
)

__all__ = [
    "LOG_PROB_FLOOR",
    "energy_distance",
    "evaluate_samples",
    "flow_map_error",
    "mean_log_likelihood",
    "mmd",
    "mode_balance",
    "mode_coverage",
    "sliced_wasserstein",
    "support_fraction",
]
