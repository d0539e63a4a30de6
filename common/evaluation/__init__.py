"""Classifier metrics and generator sample grids."""

from common.evaluation.grids import class_grid, save_generator_grid
from common.evaluation.metrics import (
    METRIC_NAMES,
    EvaluationSummary,
    classification_metrics,
    evaluate_classifier,
    pooled_metrics,
    predict_probabilities,
    summarise_predictions,
    summary_metrics,
)

__all__ = ["METRIC_NAMES", "EvaluationSummary", "class_grid", "classification_metrics", "evaluate_classifier",
           "pooled_metrics", "predict_probabilities", "save_generator_grid", "summarise_predictions",
           "summary_metrics"]
