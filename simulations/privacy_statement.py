"""What privacy covers an exported classifier or a generated data set, in plain words and numbers.

Read from the run folder through the privacy report's own figures (``common.privacy.report``), so
the statements never differ from ``privacy/report.md``. Epsilons are per hospital: each bounds what
one hospital's own patches reveal, and they are never added across hospitals. They are the run's
epsilons after its last recorded round, so they also bound an earlier checkpoint of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.privacy.scopes import NO_GUARANTEE, SCOPES


def _per_hospital(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: {"epsilon": site.get("epsilon"), "delta": site.get("delta"), "accountant": site.get("accountant"),
                   "epsilon_lifetime": (site.get("lifetime") or {}).get("epsilon")}
            for name, site in (report.get("sites") or {}).items()}


def _dp_report(run_dir: Path) -> dict[str, Any]:
    from common.privacy.report import build_report

    return build_report(run_dir)


def _base(report: dict[str, Any]) -> dict[str, Any]:
    enabled = bool(report.get("enabled"))
    return {"differential_privacy": enabled, "scope": report.get("scope") if enabled else None,
            "accountant": report.get("accountant") if enabled else None, "epsilon_per_hospital": _per_hospital(report),
            "epsilons_are_added_across_hospitals": False,
            "privacy_report": "privacy/report.md" if report.get("enabled") else None}


#: product -> what is said when differential privacy was off.
OFF: dict[str, str] = {
    "generator": f"{NO_GUARANTEE}: differential privacy was off in this run, and the generator was trained against a "
                 "discriminator that saw the hospitals' real patches",
    "classifier": f"{NO_GUARANTEE}: differential privacy was off in this run; the classifier was trained on the "
                  "hospitals' patches",
}


def privacy_statement(run_dir: Path, product: str) -> dict[str, Any]:
    """The privacy of the run's ``generator`` (anything it generates) or ``classifier`` (trunk + head)."""
    report = _dp_report(run_dir)
    out = _base(report)
    if not report.get("enabled"):
        return {**out, "guarantee": False, "statement": OFF[product]}
    scope = SCOPES[str(report.get("scope"))]
    if scope.end_to_end_guarantee and not report.get("end_to_end_guarantee"):  # e.g. a fixed noise seed (tests only)
        return {**out, "guarantee": False, "statement": f"{NO_GUARANTEE}: {report.get('statement', '')}"}
    return {**out, "guarantee": scope.end_to_end_guarantee, "statement": scope.products[product]}
