"""What privacy covers an exported classifier or a generated data set, in plain words and numbers.

Read from the run folder through the privacy report's own figures (``common.privacy.report``), so
the statements never differ from ``privacy/report.md``. Epsilons are per hospital: each bounds what
one hospital's own patches reveal, and they are never added across hospitals. They are the run's
epsilons after its last recorded round, so they also bound an earlier checkpoint of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NO_GUARANTEE = "no formal privacy guarantee"


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


#: product -> case -> what is said after the guarantee's first words.
STATEMENTS: dict[str, dict[str, str]] = {
    "generator": {
        "off": f"{NO_GUARANTEE}: differential privacy was off in this run, and the generator was trained against a "
               "discriminator that saw the hospitals' real patches",
        "covered": "differentially private by post-processing only: the generator never reads a real patch; it "
                   "learns only through the discriminator, whose every real-patch gradient was trained with DP-SGD "
                   "(privacy.scope=discriminator). Each hospital's (epsilon, delta) below bounds what the generated "
                   "images reveal about one of its training patches; epsilons are per hospital, never added",
        "head_only": f"{NO_GUARANTEE}: with privacy.scope=classifier only the classifier head was trained with "
                     "DP-SGD; the discriminator trunk that trained the generator saw the real patches without "
                     "differential privacy, so the epsilons below do not cover the generator",
    },
    "classifier": {
        "off": f"{NO_GUARANTEE}: differential privacy was off in this run; the classifier was trained on the "
               "hospitals' patches",
        "covered": "(epsilon, delta)-differentially private per hospital: the trunk and the head were trained with "
                   "DP-SGD on every real-patch gradient (privacy.scope=discriminator); each hospital's epsilon below "
                   "bounds what the classifier reveals about one of its training patches; epsilons are never added",
        "head_only": f"{NO_GUARANTEE}: only the classifier head was trained with DP-SGD (privacy.scope=classifier); "
                     "the trunk it reads was trained on the same patches without differential privacy, so the "
                     "epsilons below hold only for the head given the trunk",
    },
}


def privacy_statement(run_dir: Path, product: str) -> dict[str, Any]:
    """The privacy of the run's ``generator`` (anything it generates) or ``classifier`` (trunk + head)."""
    report = _dp_report(run_dir)
    out = _base(report)
    texts = STATEMENTS[product]
    if not report.get("enabled"):
        out.update(guarantee=False, statement=texts["off"])
    elif report.get("scope") == "discriminator" and report.get("end_to_end_guarantee"):
        out.update(guarantee=True, statement=texts["covered"])
    elif report.get("scope") == "discriminator":  # e.g. a fixed noise seed (tests only): the noise is known
        out.update(guarantee=False, statement=f"{NO_GUARANTEE}: {report.get('statement', '')}")
    else:
        out.update(guarantee=False, statement=texts["head_only"])
    return out
