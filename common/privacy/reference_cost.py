"""What DP cost in accuracy in the reference experiment (``experiment=privacy_utility``), for the
privacy report: the row of the same training method and scope whose epsilon is nearest this run's.

The rows ship in ``reference_costs.json`` beside this module; ``python -m
simulations.experiments.reference_costs RESULTS_JSON`` writes them from an experiment's results.
They describe the reference experiment's data and budget, not the hospital's: the report says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError, dataclass_from_mapping
from common.train.methods import training_method
from common.train.whitening import WhiteningConfig

REFERENCE_FILE = Path(__file__).with_name("reference_costs.json")

#: A reference row is quoted only for a run whose epsilon is within this factor of the row's (either
#: way). DP's cost changes steeply with epsilon, so the cost measured at epsilon 8 says little about
#: a run at epsilon 50 or at 10^5 (clipping with almost no noise): such a run is told that no row
#: near its epsilon was measured, and which one is nearest.
MAX_EPSILON_RATIO = 3.0


@dataclass(frozen=True)
class Recipe:
    """What a DP run's cost depends on besides epsilon: its method, scope, starting trunk, what its
    classification head reads, where the head's whitening comes from and whether the classifier
    trains on generated images."""

    method: str
    scope: str
    trunk_prior: bool = False
    freeze_trunk: bool = False
    classifier_grid: int = 0
    classifier_centre: bool = False
    classifier_whitening: bool = False
    whitening_images: str = ""  # the whitening's image sources joined by "+" ("" without whitening)
    generated_images: bool = False  # the classifier trained on generated images (train.selection.mode != none)
    whitening_floor: str = ""  # the whitening's eigenvalue floor rule (WhiteningConfig.floor_rule; "" without whitening)

    def describe(self) -> str:
        text = f"train.method={self.method} with privacy.scope={self.scope}"
        if self.trunk_prior:
            text += ", a model.trunk_prior"
        if self.freeze_trunk:
            text += " and privacy.freeze_trunk"
        if self.classifier_grid:
            text += f" (model.classifier_grid={self.classifier_grid})"
        if self.classifier_centre:
            text += ", the head's input centred by the hospitals' released mean (model.classifier_centre)"
        if self.classifier_whitening:
            images = f": {self.whitening_images.replace('+', ' and ')} images" if self.whitening_images else ""
            text += f", whitened by free images (model.classifier_whitening{images})"
            if self.whitening_floor:
                text += f" at the eigenvalue floor {self.whitening_floor} (train.whitening)"
        if self.generated_images:
            text += ", the classifier trained on generated images too"
        elif training_method(self.method).trains_generator:
            text += ", no generated image trained on (train.selection.mode=none)"
        return text

    @classmethod
    def of_run(cls, run: Mapping[str, Any]) -> Recipe:
        """The recipe of a run config (a run folder's, or an experiment variant's); keys a config
        recorded before them lacks take their defaults."""
        privacy, model, train = run.get("privacy") or {}, run.get("model") or {}, run.get("train") or {}
        method = str(train.get("method", "unified"))
        trains_generator = training_method(method).trains_generator
        whitening = bool(model.get("classifier_whitening", False))
        sources = floor = ""
        if whitening:
            try:
                config = dataclass_from_mapping(WhiteningConfig, train.get("whitening") or {}, "train.whitening")
                sources = "+".join(config.sources(trains_generator))
                floor = config.floor_rule()
            except (ConfigError, ValueError):  # a config the hospitals refuse: no row can match it
                sources = floor = "refused"
        selection = str((train.get("selection") or {}).get("mode", "rule"))
        return cls(method=method, scope=str(privacy["scope"]),
                   trunk_prior=bool(model.get("trunk_prior")), freeze_trunk=bool(privacy.get("freeze_trunk", False)),
                   classifier_grid=int(model.get("classifier_grid") or 0),
                   classifier_centre=bool(model.get("classifier_centre", False)),
                   classifier_whitening=whitening, whitening_images=sources,
                   generated_images=trains_generator and selection != "none", whitening_floor=floor)


@dataclass(frozen=True)
class ReferenceCost:
    """One DP variant of the reference experiment against the same variant without DP (means over seeds)."""

    method: str  # train.method
    scope: str  # privacy.scope
    epsilon: float  # the largest any hospital reported, mean over seeds
    accuracy: float  # test balanced accuracy with DP
    accuracy_without_dp: float  # the same variant without DP, on the same seeds
    seeds: int
    trunk_prior: bool = False  # started from a model.trunk_prior (both with and without DP)
    freeze_trunk: bool = False  # privacy.freeze_trunk: the trunk stayed at its initial weights under DP
    classifier_grid: int = 0  # model.classifier_grid (rows recorded before it: 0)
    classifier_centre: bool = False  # model.classifier_centre (rows recorded before it: false)
    classifier_whitening: bool = False  # model.classifier_whitening (rows recorded before it: false)
    whitening_images: str = ""  # train.whitening's sources, "+"-joined (rows recorded before it: "")
    generated_images: bool = False  # the classifier trained on generated images (see Recipe)
    whitening_floor: str = ""  # train.whitening's floor rule (rows recorded before it: "", quoted to no whitened run)

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.method, self.scope, self.trunk_prior, self.freeze_trunk, self.classifier_grid,
                      self.classifier_centre, self.classifier_whitening, self.whitening_images, self.generated_images,
                      self.whitening_floor)

    @property
    def cost_points(self) -> float:
        """Balanced-accuracy points lost to DP (positive: DP is worse)."""
        return 100.0 * (self.accuracy_without_dp - self.accuracy)


def load_reference(path: Path | str = REFERENCE_FILE) -> dict[str, Any] | None:
    """The reference file's content (``source``: how it was measured; ``rows``), None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["rows"] = [ReferenceCost(**row) for row in data.get("rows", [])]
    return data


def nearest_cost(rows: list[ReferenceCost], recipe: Recipe, epsilon: float | None) -> ReferenceCost | None:
    """The row of ``recipe`` whose epsilon is nearest ``epsilon`` on a log scale, however far; None
    without such a row or without a finite positive epsilon."""
    if epsilon is None or not math.isfinite(epsilon) or epsilon <= 0:
        return None
    candidates = [r for r in rows if r.recipe == recipe and r.epsilon > 0]
    if not candidates:
        return None
    return min(candidates, key=lambda r: abs(math.log(r.epsilon) - math.log(epsilon)))


def cost_statement(reference: dict[str, Any] | None, recipe: Recipe, epsilon: float | None) -> str:
    """One paragraph for the privacy report: what the nearest reference epsilon cost, or why none is given."""
    if reference is None:
        return "No reference measurement of DP's cost in accuracy ships with this installation."
    row = nearest_cost(reference["rows"], recipe, epsilon)
    if row is None:
        return (f"The reference experiment has no row for {recipe.describe()}"
                + ("" if epsilon is not None and math.isfinite(epsilon) and epsilon > 0 else
                   " (or this run reports no finite epsilon)") + ": its cost in accuracy is not measured.")
    ratio = max(row.epsilon / epsilon, epsilon / row.epsilon)
    if ratio > MAX_EPSILON_RATIO:
        return (f"The reference experiment ({reference['source']}) measured {recipe.describe()} at no epsilon "
                f"within a factor {MAX_EPSILON_RATIO:g} of this run's "
                f"{epsilon:.3g} (the nearest: epsilon {row.epsilon:.3g}), so its cost in accuracy at this "
                "epsilon is not measured; DP's cost changes steeply with epsilon.")
    cost = (f"{row.cost_points:.1f} points lost to DP" if row.cost_points >= 0
            else f"{-row.cost_points:.1f} points gained under DP")
    return (f"In the reference experiment ({reference['source']}), {recipe.describe()} "
            f"at epsilon {row.epsilon:.3g} (the nearest to this run's {epsilon:.3g}) reached balanced accuracy "
            f"{row.accuracy:.3f} against {row.accuracy_without_dp:.3f} without DP, mean of {row.seeds} seeds: "
            f"**{cost}**. That is what DP cost there; on another data set, "
            "hospital size or budget it differs, and only the hospital's own validation split can tell.")
