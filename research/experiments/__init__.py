"""Experiment kit for re-measuring the RKSP paper: tasks, divergence labels, gradient baselines, statistics, runners.

Used by `research.scripts.sweep`, `research.scripts.fit_risk` and `research.scripts.reproduce`; results live in `results/`.
"""

from __future__ import annotations

from .divergence import (
    GRAD_NORM_THRESHOLD,
    LOSS_THRESHOLD,
    DivergenceLabel,
    count_loss_spikes,
    gradient_baselines,
    is_divergent_step,
    label_divergence,
)
from .runner import RunResult, evaluate_model, train_run, train_with_trainer
from .stats import auroc, bootstrap_auroc, expected_calibration_error, fisher_exact, reliability_bins
from .tasks import (
    associative_recall_dataset,
    mnist_datasets,
    read_idx,
    resolve_data_dir,
    synthetic_lm_dataset,
    wikitext2_datasets,
)

__all__ = [
    "LOSS_THRESHOLD",
    "GRAD_NORM_THRESHOLD",
    "DivergenceLabel",
    "is_divergent_step",
    "label_divergence",
    "count_loss_spikes",
    "gradient_baselines",
    "RunResult",
    "train_run",
    "train_with_trainer",
    "evaluate_model",
    "auroc",
    "bootstrap_auroc",
    "expected_calibration_error",
    "reliability_bins",
    "fisher_exact",
    "associative_recall_dataset",
    "synthetic_lm_dataset",
    "wikitext2_datasets",
    "mnist_datasets",
    "read_idx",
    "resolve_data_dir",
]
