"""Write the privacy report's reference costs (``common/privacy/reference_costs.json``) from the
results of ``fedvitgan experiment experiment=privacy_utility``.

Every DP variant of the federated setting whose twin without DP (the name before ``_dp``) ran on the
same seeds becomes one row: its training method and scope (from the variant's own config), its
epsilon (the largest any hospital reported, mean over seeds) and the two mean balanced accuracies.

    python -m simulations.experiments.reference_costs runs/privacy_utility/results.json

With ``--keep-other-recipes`` the rows already in ``--out`` whose recipe (method, scope, prior,
frozen trunk, head) these results do not measure are kept beside the new ones: an experiment that
runs one recipe again replaces that recipe's rows and leaves the others' as they were measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, astuple
from pathlib import Path
from typing import Any

from common.privacy.reference_cost import REFERENCE_FILE, Recipe, ReferenceCost, load_reference
from simulations.experiments.config import experiment_config
from simulations.experiments.report import DP_VARIANT, group_runs
from simulations.experiments.runner import variant_run
from simulations.experiments.variants import load_variant


def reference_rows(results: dict[str, Any]) -> list[ReferenceCost]:
    """One row per DP variant of the federated setting that has its twin on the same seeds."""
    config = results["config"]
    exp = experiment_config(config["experiment"])
    base = {k: v for k, v in config.items() if k != "experiment"}
    variants = group_runs(results.get("runs", [])).get("federated", {})
    rows = []
    for name, runs in variants.items():
        match = DP_VARIANT.match(name)
        if match is None or match["twin"] not in variants or not all(r.get("epsilon") is not None for r in runs):
            continue
        twin = {r["seed"]: r["balanced_accuracy"] for r in variants[match["twin"]]}
        paired = [r for r in runs if r["seed"] in twin]
        if not paired:
            continue
        run = variant_run(base, exp, load_variant(name), paired[0]["seed"])
        n = len(paired)
        rows.append(ReferenceCost(
            **asdict(Recipe.of_run(run)), epsilon=sum(r["epsilon"] for r in paired) / n,
            accuracy=sum(r["balanced_accuracy"] for r in paired) / n,
            accuracy_without_dp=sum(twin[r["seed"]] for r in paired) / n, seeds=n))
    return sorted(rows, key=lambda r: (astuple(r.recipe), r.epsilon))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results.json of an experiment=privacy_utility run")
    parser.add_argument("--source", required=True,
                        help="how it was measured, in one phrase (data, hospitals, budget, seeds, commit); "
                             "the privacy report quotes it")
    parser.add_argument("--out", type=Path, default=REFERENCE_FILE, help=f"where to write (default {REFERENCE_FILE})")
    parser.add_argument("--keep-other-recipes", action="store_true",
                        help="keep the rows of --out whose recipe these results do not measure (the source "
                             "should then say how both were measured)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"{args.results} not found")
    rows = reference_rows(json.loads(args.results.read_text()))
    if not rows:
        print(f"{args.results}: no federated DP variant with its twin without DP", file=sys.stderr)
        return 1
    kept: list[ReferenceCost] = []
    if args.keep_other_recipes:
        existing = load_reference(args.out)
        if existing is None:
            parser.error(f"--keep-other-recipes: {args.out} not found")
        measured = {r.recipe for r in rows}
        kept = [r for r in existing["rows"] if r.recipe not in measured]
    rows = sorted([*kept, *rows], key=lambda r: (astuple(r.recipe), r.epsilon))
    args.out.write_text(json.dumps({"source": args.source, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"{len(rows)} rows written to {args.out} ({len(kept)} kept from it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
