"""The privacy-budget report of a run: ``privacy/report.md``, ``report.json`` and ``epsilon.png``.

Everything comes from the run folder: ``summary.json`` (each hospital's DP metrics per round,
including its accountant history, and the budget stops), and, where the hospitals' state folders
are reachable (a simulation), their privacy ledgers for the lifetime figures. Epsilons are per
hospital: they are never added up across hospitals (each bounds what one hospital's own patches
reveal; the hospitals' data sets are disjoint).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common import protocol
from common.config import dataclass_from_mapping
from common.durable import atomic_write, atomic_write_with
from common.model.config import ModelConfig
from common.privacy.accounting import (
    CENTRE_MECHANISM,
    COUNTS_MECHANISM,
    MECHANISM,
    NEIGHBOURING,
    PRV_NOT_COMPUTED,
    SAMPLING,
    compact,
    counts_noise_multiplier,
    epsilon,
    epsilons,
)
from common.privacy.centre import centre_radius
from common.privacy.config import PrivacyConfig, privacy_config
from common.privacy.ledger import LedgerError, PrivacyLedger, history_of
from common.privacy.reference_cost import Recipe, cost_statement, load_reference
from common.privacy.scopes import SCOPES
from common.train.methods import training_method
from common.train.whitening import WhiteningConfig

RANDOMNESS = ("Poisson sampling, noise and real-patch augmentation draw from torch generators seeded afresh from the "
              "OS's CSPRNG for every training attempt, never stored nor sent, so a repeated round never repeats a draw; "
              "this is not Opacus' secure_mode, so floating-point and generator-state attacks on the noise are not "
              "mitigated")
SEEDED = ("privacy.seed is set (reproducible simulation mode): each attempt's noise is derived from the seed, the data "
          "set and the attempt number in the hospital's ledger, so no draw repeats, but anyone who knows the seed (it "
          "is in the run configuration) can reproduce and subtract the noise: this run has NO privacy guarantee")


def _count_release(metrics: dict[str, Any]) -> dict[str, Any] | None:
    std = _finite(metrics.get(protocol.DP_COUNT_NOISE_STD))
    if std is None:
        return None
    return {"mechanism": COUNTS_MECHANISM, "noise_std": std, "noise_multiplier": counts_noise_multiplier(std),
            "released_examples": _finite(metrics.get(protocol.REAL_EXAMPLES)),
            "released_labelled": _finite(metrics.get(protocol.LABELLED_EXAMPLES))}


def _centre_release(metrics: dict[str, Any], cfg: PrivacyConfig, config: dict[str, Any]) -> dict[str, Any] | None:
    """The head centre's release at this hospital in this run (None: model.classifier_centre is off)."""
    model = config.get("model") or {}
    if not model.get("classifier_centre"):
        return None
    sigma = _finite(metrics.get(protocol.DP_CENTRE_NOISE))
    radius = centre_radius(cfg, dataclass_from_mapping(ModelConfig, model, "model").classifier_features)
    return {"mechanism": CENTRE_MECHANISM, "released": sigma is not None, "noise_multiplier": sigma,
            "radius": radius, "noise_std": None if sigma is None else sigma * radius}


def _head_whitening(config: dict[str, Any]) -> WhiteningConfig | None:
    """The run's ``train.whitening`` (None: model.classifier_whitening is off)."""
    if not (config.get("model") or {}).get("classifier_whitening"):
        return None
    return dataclass_from_mapping(WhiteningConfig, (config.get("train") or {}).get("whitening") or {},
                                  "train.whitening")


def head_whitening_text(config: dict[str, Any]) -> str | None:
    """Where the head's whitening came from (None: model.classifier_whitening is off): no budget is spent on it."""
    whitening = _head_whitening(config)
    if whitening is None:
        return None
    train = config.get("train") or {}
    try:
        sources = whitening.sources(training_method(str(train.get("method", "unified"))).trains_generator)
    except ValueError as refused:  # the hospitals refused such a run before training: nothing was whitened
        return f"none: {refused}"
    each = whitening.images_each(sources)
    if "generator" not in sources:
        return (f"from {whitening.images} random-process images (public, no patient data) each round: no patient data, "
                "no budget spent")
    also = f" and {each} random-process images" if "random_process" in sources else ""
    drawn = f"from {each} images of the received global generator{also}, drawn at the hospital with a public seed each round"
    if (config.get("privacy") or {}).get("scope") != "discriminator":
        return (f"{drawn}: in this scope the generator learns from real patches WITHOUT DP (through the "
                "discriminator trunk, not covered), so the matrix is no more private than the generator")
    return (f"{drawn}: the generator learns from real patches only through the private discriminator, so this "
            "is post-processing of DP outputs and spends no budget")


def head_whitening_floor(config: dict[str, Any], noise_multiplier: float | None) -> dict[str, Any] | None:
    """The eigenvalue floor of the head's whitening at this hospital (None: model.classifier_whitening is
    off): its own, from the noise multiplier its DP steps used, which its training steps read, and the
    shared one every hospital writes its head in before it leaves. Not a privacy quantity (the matrix
    is made of free images either way); it tells how to reproduce the run."""
    whitening = _head_whitening(config)
    if whitening is None:
        return None
    return {"rule": whitening.floor_rule(), "noise_multiplier": noise_multiplier,
            "floor": whitening.floor(noise_multiplier), "shared_floor": float(whitening.shrinkage)}


def _floor_text(floor: dict[str, Any]) -> str:
    """The report's line for ``head_whitening_floor``."""
    at = ("without DP-SGD noise" if floor["noise_multiplier"] is None
          else f"at this hospital's noise multiplier {_fmt(floor['noise_multiplier'])}")
    own = (f"{floor['floor']:.3g} of the largest eigenvalue in its training steps ({at}; train.whitening: "
           f"{floor['rule']})")
    if floor["floor"] == floor["shared_floor"]:
        return own + "; the head leaves in the same matrix"
    return own + f"; the head leaves written in the shared matrix, floor {floor['shared_floor']:.3g}"


def clipping_text(cfg: PrivacyConfig, config: dict[str, Any], max_grad_norm: float | None) -> str:
    """How each real patch's gradient was clipped (``privacy.discriminator_clip_share``): the bound the
    noise is calibrated to is C either way."""
    share = cfg.discriminator_clip_share
    method = str((config.get("train") or {}).get("method", "unified"))
    if share is None or cfg.scope != "discriminator" or not training_method(method).trains_generator:
        return "each real patch's gradient clipped to C as one vector (Opacus' flat clipping)"
    c = f"C = {_fmt(max_grad_norm)}" if max_grad_norm is not None else "C"
    return (f"part by part: each real patch's gradient on the discriminator's parameters clipped to sqrt({share:g}) C "
            f"and on the head's to sqrt({1 - share:g}) C ({c}); the parts are disjoint, so the whole has norm <= C, "
            "the bound the noise is calibrated to")


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _history(metrics: dict[str, Any]) -> list[tuple[float, float, int]]:
    noise = metrics.get(protocol.DP_HISTORY_NOISE) or []
    rate = metrics.get(protocol.DP_HISTORY_RATE) or []
    steps = metrics.get(protocol.DP_HISTORY_STEPS) or []
    return compact(zip(noise, rate, (round(float(s)) for s in steps)))


def _ledger_folder(config: dict[str, Any], run_dir: Path, site: str) -> Path:
    """Where a simulated hospital kept its ledger (as ``client.site`` resolves its state folder)."""
    ledger_dir = (config.get("privacy") or {}).get("ledger_dir")
    if ledger_dir:
        return Path(str(ledger_dir)).expanduser() / site
    state_root = (config.get("federation") or {}).get("state_dir")
    return (Path(str(state_root)).expanduser() if state_root else run_dir / "sites") / site


def _lifetime_from_ledger(folder: Path, run_id: str, delta: float, kind: str) -> dict[str, Any] | None:
    ledger = PrivacyLedger.in_folder(folder)
    if not ledger.exists():
        return None
    try:
        content = ledger.load()
    except LedgerError:
        return None
    for key, own in content.attempts.items():
        if any(a.run == run_id for a in own):
            attempts = content.attempts_on(key)  # the data's releases under any key it had
            history = history_of(attempts)
            mine = [a for a in attempts if a.run == run_id]
            return {"steps_total": sum(a.dp_steps for a in attempts), "epsilon": epsilon(history, delta, kind),
                    "source": str(ledger.path), "dataset": key, "description": content.descriptions.get(key, {}),
                    "runs": len({a.run for a in attempts}),
                    "this_run": {"steps_total": sum(a.dp_steps for a in mine),
                                 "attempts": sum(a.kind == "sgd" for a in mine),
                                 "interrupted_attempts": sum(a.kind == "sgd" and not a.finished for a in mine)}}
    return None


def site_report(name: str, trained: list[tuple[int, dict[str, Any]]], stopped: list[tuple[int, dict[str, Any]]],
                cfg: PrivacyConfig, config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One hospital's entry of report.json."""
    replies = [*trained, *stopped]
    latest = max(replies, key=lambda item: item[0])[1]
    # 1. This run's epsilon by both accountants from the last reported history, at the reported delta;
    #    the configured accountant's figure is never below what the hospital itself reported.
    history = _history(latest)
    delta = _finite(latest.get(protocol.DP_DELTA)) or 0.0
    both = epsilons(history, delta) if history else {"rdp": 0.0, "prv": 0.0}
    reported = max([_finite(m.get(protocol.DP_EPSILON)) or 0.0 for _, m in replies], default=0.0)
    # 2. The lifetime figure: the hospital's ledger where it is reachable (a simulation), else its replies.
    lifetime = _lifetime(name, latest, replies, cfg, config, run_dir, delta)
    # 3. The entry: mechanism, this run's figures, what the scope covers, the budget stop, per round.
    return {
        **_mechanism(latest, cfg, config, delta),
        "steps_total": max(int(_finite(m.get(protocol.DP_STEPS_TOTAL)) or 0) for _, m in replies),
        "epsilon": max(epsilon(history, delta, cfg.accountant) if history else 0.0, reported),
        "epsilon_rdp": both["rdp"],
        "epsilon_prv": both["prv"],  # None: not computed, its grid would exceed PRV_MAX_MIB
        "prv_note": None if both["prv"] is not None else PRV_NOT_COMPUTED,
        "history": [list(e) for e in history],
        "neighbouring_relation": NEIGHBOURING,
        "sampling": SAMPLING,
        "count_release": _count_release(latest),
        "centre_release": _centre_release(latest, cfg, config),
        "head_whitening": head_whitening_text(config),
        "head_whitening_floor": head_whitening_floor(config, _finite(latest.get(protocol.DP_NOISE_MULTIPLIER))),
        "clipping": clipping_text(cfg, config, _finite(latest.get(protocol.DP_MAX_GRAD_NORM))),
        **_coverage(cfg),
        **_budget(latest, trained, stopped),
        "lifetime": lifetime,
    }


def _mechanism(latest: dict[str, Any], cfg: PrivacyConfig, config: dict[str, Any], delta: float) -> dict[str, Any]:
    """The mechanism and its parameters, as the hospital last reported them."""
    return {
        "mechanism": MECHANISM,
        "scope": cfg.scope,
        "noise_multiplier": _finite(latest.get(protocol.DP_NOISE_MULTIPLIER)),
        "max_grad_norm": _finite(latest.get(protocol.DP_MAX_GRAD_NORM)),
        "sample_rate": _finite(latest.get(protocol.DP_SAMPLE_RATE)),
        "expected_batch": _finite(latest.get(protocol.DP_EXPECTED_BATCH)),
        "delta": delta,
        "accountant": cfg.accountant,
        "steps_per_round": int((config.get("train") or {}).get("local_steps", 0)),
    }


def _lifetime(name: str, latest: dict[str, Any], replies: list[tuple[int, dict[str, Any]]], cfg: PrivacyConfig,
              config: dict[str, Any], run_dir: Path, delta: float) -> dict[str, Any]:
    """Lifetime steps and epsilon: the larger of the ledger's (where readable) and the replies' figures."""
    reported = {
        "steps_total": int(_finite(latest.get(protocol.DP_STEPS_LIFETIME)) or 0),
        "epsilon": max(_finite(m.get(protocol.DP_EPSILON_LIFETIME)) or 0.0 for _, m in replies),
        "source": "the hospital's replies",
    }
    ledger = _lifetime_from_ledger(_ledger_folder(config, run_dir, name), str(config.get("output_dir")),
                                   delta, cfg.accountant) if delta > 0 else None
    if ledger is None:
        return reported
    return {**ledger, "epsilon": max(ledger["epsilon"], reported["epsilon"]),
            "steps_total": max(ledger["steps_total"], reported["steps_total"])}


#: What covers the discriminator under privacy.freeze_trunk (scope=discriminator).
FROZEN_TRUNK = ("the trunk is frozen at its initial weights (a seeded random initialisation, or model.trunk_prior's, "
                "learnt from random-process images without any patient data): no real patch's gradient reaches it, "
                "so it reveals nothing about them; DP-SGD on the adversarial head and class projection for the real "
                "patches' gradients")


def _coverage(cfg: PrivacyConfig) -> dict[str, Any]:
    """What the scope covers and leaves out, in plain words (``common.privacy.scopes``)."""
    scope = SCOPES[cfg.scope]
    covered = dict(scope.covered)
    if cfg.freeze_trunk:
        covered["discriminator"] = FROZEN_TRUNK
    return {
        "covered_groups": list(scope.covered),
        "covered": covered,
        "not_covered_groups": list(scope.not_covered),
        "not_covered": dict(scope.not_covered),
        "side_channels": {**scope.side_channels, "randomness": SEEDED if cfg.seed is not None else RANDOMNESS},
        "end_to_end_guarantee": scope.end_to_end_guarantee and cfg.seed is None,
    }


def _budget(latest: dict[str, Any], trained: list[tuple[int, dict[str, Any]]],
            stopped: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The lifetime budget, whether and when the budget stop triggered, and each trained round's epsilons."""
    return {
        "max_epsilon": _finite(latest.get(protocol.DP_MAX_EPSILON)),
        "budget_exhausted": bool(stopped),
        "budget_exhausted_rounds": [r for r, _ in stopped],
        "budget_message": str(stopped[0][1].get("message", "")) if stopped else "",
        "rounds": [{"round": r, "steps": int(_finite(m.get(protocol.DP_STEPS_ROUND)) or 0),
                    "epsilon": _finite(m.get(protocol.DP_EPSILON)),
                    "epsilon_lifetime": _finite(m.get(protocol.DP_EPSILON_LIFETIME))} for r, m in trained],
    }


#: The report of a DP run in which no hospital replied to a training round (each refused, failed or
#: was left out): the coordinator has no DP figure to show.
NO_DP_STEPS = ("**No hospital reported a DP step in this run**: no training reply reached the coordinator (each "
               "hospital refused, failed or was left out; summary.json and the hospitals' logs say why), so this "
               "report has no per-hospital figure. It does not say that nothing was spent: a hospital that "
               "released its noisy counts, or trained, before failing has that in its own privacy ledger.")


def build_report(run_dir: Path | str) -> dict[str, Any]:
    """report.json's content for the run in ``run_dir``."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: is {run_dir} a fedvitgan run folder?")
    summary = json.loads(summary_path.read_text())
    config = summary.get("config", {})
    cfg = privacy_config(config.get("privacy"))
    report: dict[str, Any] = {"run": str(run_dir), "enabled": cfg.enabled, "scope": cfg.scope,
                              "accountant": cfg.accountant, "max_epsilon": cfg.max_epsilon,
                              "rounds": len(summary.get("rounds", [])), "sites": {}}
    if not cfg.enabled:
        return report
    scope = SCOPES[cfg.scope]
    statement = scope.statement if cfg.seed is None else f"{SEEDED}. {scope.statement}"
    report.update({"end_to_end_guarantee": scope.end_to_end_guarantee and cfg.seed is None,
                   "statement": statement,
                   "composition_across_hospitals": "none: epsilons are per hospital and are never summed"})
    trained: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    stopped: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for entry in summary.get("rounds", []):
        rnd = int(entry["round"])
        for name, site in (entry.get("sites") or {}).items():
            metrics = (site or {}).get("train") or {}
            if protocol.DP_EPSILON in metrics:
                trained.setdefault(name, []).append((rnd, metrics))
        for stop in entry.get("budget_exhausted") or []:
            stopped.setdefault(str(stop.get("site")), []).append((rnd, stop))
    for name in sorted(set(trained) | set(stopped)):
        report["sites"][name] = site_report(name, trained.get(name, []), stopped.get(name, []), cfg, config, run_dir)
    epsilons = [s["epsilon"] for s in report["sites"].values() if s.get("epsilon") is not None]
    if epsilons:
        report["accuracy_cost"] = cost_statement(load_reference(), Recipe.of_run(config), max(epsilons))
    return report


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Privacy-budget report: {report['run']}", ""]
    if not report["enabled"]:
        lines += [("Differential privacy was **off** in this run (privacy.enabled=false): no epsilon is defined, "
                   "and nothing about the hospitals' data is bounded."), ""]
        return "\n".join(lines)
    lines += [f"**Scope: `{report['scope']}`.** {report['statement']}", "",
              ("Epsilons are per hospital and are **never added up across hospitals**: each concerns one "
               "hospital's own training patches (the scope above says which of its updates it covers). \"This "
               "run\" counts every DP step of this run folder (resumed sessions included); \"lifetime\" adds every "
               "earlier run on the same data set recorded in the hospital's privacy ledger, at this run's delta."),
              ""]
    if report["max_epsilon"] is not None:
        lines += [f"Lifetime budget per hospital and data set: privacy.max_epsilon = {report['max_epsilon']:g}.", ""]
    if not report["sites"]:
        lines += [NO_DP_STEPS, ""]
    if report.get("accuracy_cost"):
        lines += ["**What this epsilon costs in accuracy.** " + report["accuracy_cost"], ""]
    for name, site in report["sites"].items():
        lines += [f"## {name}", "",
                  "| | |", "|---|---|",
                  f"| mechanism | {site['mechanism']} |",
                  f"| noise multiplier sigma | {_fmt(site['noise_multiplier'])} |",
                  f"| clipping norm C | {_fmt(site['max_grad_norm'])} |",
                  *([f"| clipping | {site['clipping']} |"] if site.get("clipping") else []),
                  f"| sampling rate q | {_fmt(site['sample_rate'])} (expected batch {_fmt(site['expected_batch'], '.0f')}) |",
                  f"| DP steps per round | {site['steps_per_round']} |",
                  f"| DP steps, this run | {site['steps_total']} |",
                  f"| delta | {_fmt(site['delta'], '.3g')} |",
                  f"| epsilon, this run ({site['accountant']}, configured) | {_fmt(site['epsilon'])} |",
                  (f"| epsilon, this run: rdp / prv | {_fmt(site['epsilon_rdp'])} / "
                   f"{_fmt(site['epsilon_prv']) if site.get('epsilon_prv') is not None else 'not computed'} |"),
                  *([f"| prv | {site['prv_note']} |"] if site.get("prv_note") else []),
                  (f"| lifetime (all runs on this data set) | epsilon {_fmt(site['lifetime']['epsilon'])} after "
                   f"{site['lifetime']['steps_total']} DP steps ({site['lifetime']['source']}) |"),
                  f"| neighbouring relation | {site['neighbouring_relation']} |",
                  f"| count release | {_count_text(site['count_release'])} |",
                  *([f"| head centre release | {_centre_text(site['centre_release'])} |"] if site.get("centre_release") else []),
                  *([f"| head input whitening | {site['head_whitening']} |"] if site.get("head_whitening") else []),
                  *([f"| head whitening's eigenvalue floor | {_floor_text(site['head_whitening_floor'])} |"]
                    if site.get("head_whitening_floor") else []),
                  f"| sampling | {site['sampling']} |",
                  f"| budget stop triggered | {_budget_stop_text(site)} |",
                  ""]
        lines += ["Covered by the guarantee:", ""]
        lines += [f"- **{g}**: {site['covered'][g]}" for g in site["covered_groups"]]
        lines += ["", "Not covered:" if site["not_covered_groups"] else "Not covered: no shared parameter group.", ""]
        lines += [f"- **{g}**: {site['not_covered'][g]}" for g in site["not_covered_groups"]]
        lines += ["", "Other channels:", ""]
        lines += [f"- {k}: {v}" for k, v in site["side_channels"].items()]
        if site["budget_exhausted"]:
            lines += ["", f"Budget stop: {site['budget_message']}"]
        lines += ["", "| round | DP steps | epsilon (this run) | epsilon (lifetime) |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['round']} | {r['steps']} | {_fmt(r['epsilon'])} | {_fmt(r['epsilon_lifetime'])} |"
                  for r in site["rounds"]]
        lines.append("")
    lines += ["![epsilon per round per hospital](epsilon.png)", ""]
    return "\n".join(lines)


def plot_epsilon(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, site in report["sites"].items():
        rounds = [r["round"] for r in site["rounds"]]
        line = ax.plot(rounds, [r["epsilon"] for r in site["rounds"]], marker="o", label=f"{name} (this run)")
        lifetime = [r["epsilon_lifetime"] for r in site["rounds"]]
        if any(a is not None and b is not None and abs(a - b) > 1e-9
               for a, b in zip(lifetime, (r["epsilon"] for r in site["rounds"]))):
            ax.plot(rounds, lifetime, linestyle="--", color=line[0].get_color(), label=f"{name} (lifetime)")
        for stop in site["budget_exhausted_rounds"]:
            ax.axvline(stop, color=line[0].get_color(), linestyle=":", alpha=0.6)
    if report.get("max_epsilon") is not None:
        ax.axhline(report["max_epsilon"], color="black", linestyle="-.", linewidth=1, label="max_epsilon")
    if not report["enabled"]:
        ax.text(0.5, 0.5, "differential privacy off: epsilon undefined", ha="center", transform=ax.transAxes)
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon ({report.get('accountant')}, per hospital)")
    ax.set_title("cumulative epsilon per hospital (never summed across hospitals)", fontsize=10)
    ax.grid(alpha=0.3)
    if report["sites"] or report.get("max_epsilon") is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_privacy_report(run_dir: Path | str) -> dict[str, Path]:
    """Write privacy/report.md, report.json and epsilon.png into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    folder = run_dir / "privacy"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / "report.md", "json": folder / "report.json", "png": folder / "epsilon.png"}
    atomic_write(paths["json"], json.dumps(report, indent=2))
    atomic_write(paths["md"], render_markdown(report))
    atomic_write_with(paths["png"], lambda tmp: plot_epsilon(report, tmp))
    return paths


def _count_text(release: dict[str, Any] | None) -> str:
    if release is None:
        return "made in an earlier run on this data set (reused: no new cost)"
    return (f"{release['mechanism']}: noise std {release['noise_std']:g} (noise multiplier "
            f"{release['noise_multiplier']:.4g}); released size {_fmt(release['released_examples'], '.0f')}, "
            f"labelled {_fmt(release['released_labelled'], '.0f')}")


def _centre_text(release: dict[str, Any]) -> str:
    if not release["released"]:
        return ("none by this hospital in this run: the head centre it trained with came from the other hospitals' "
                "releases (no cost here)")
    return (f"{release['mechanism']}: R = {release['radius']:.4g}, noise multiplier {release['noise_multiplier']:.4g} "
            f"(std {release['noise_std']:.4g} on the sum); in the history above as one step at sample rate 1")


def _budget_stop_text(site: dict[str, Any]) -> str:
    """'no', or the rounds in which the hospital stopped at its budget."""
    if not site["budget_exhausted"]:
        return "no"
    return "yes, rounds " + ", ".join(map(str, site["budget_exhausted_rounds"]))
