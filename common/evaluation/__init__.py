"""Classifier metrics and generator sample grids."""

from common.evaluation.grids import class_grid, save_generator_grid
from common.evaluation.metrics import METRIC_NAMES, classification_metrics, evaluate_classifier

__all__ = ["METRIC_NAMES", "class_grid", "classification_metrics", "evaluate_classifier", "save_generator_grid"]
