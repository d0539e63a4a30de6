"""A hospital's privacy bookkeeping for one train message: plan, restored history, budget stop,
ledger entry and the DP metrics of its reply.

Histories: ``run`` is this run's accountant history (rounds of this run folder, retried rounds
included); ``previous`` is every other run's on the same data set (from the ledger); the lifetime
history is both. This run's history is restored from the trainer's local state (context.state or
the hospital's state folder) and from the ledger, and whichever counts more steps wins, so losing
either one never lowers epsilon.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common import protocol
from common.privacy.accounting import History, PrivacyPlan, compact, epsilon, total_steps
from common.privacy.config import PrivacyConfig
from common.privacy.ledger import PrivacyLedger
from common.train.config import TrainConfig

#: Train metrics computed from real patches without DP, or revealing the realised Poisson batch
#: sizes. Left out of the reply in scope=discriminator (in scope=classifier they are among the
#: declared, not covered channels).
REAL_DATA_METRICS = ("real_images", "images_per_second", "loss/cls_real", "loss/adv_discriminator",
                     "loss/real_loss")


def private_train_config(tcfg: TrainConfig, cfg: PrivacyConfig) -> TrainConfig:
    """The training config a hospital uses under ``cfg``: in scope=discriminator the learned loss
    weights (fitted to real-data losses, a channel outside the DP-SGD) are turned off."""
    if not cfg.enabled or cfg.scope != "discriminator":
        return tcfg
    return dataclasses.replace(tcfg, weighting=dataclasses.replace(tcfg.weighting, enabled=False))


def shared_train_metrics(flat: dict[str, float], cfg: PrivacyConfig) -> dict[str, float]:
    """The train metrics a hospital may put in its reply under ``cfg``."""
    if not cfg.enabled or cfg.scope != "discriminator":
        return flat
    return {k: v for k, v in flat.items() if k not in REAL_DATA_METRICS}


@dataclass
class BudgetCheck:
    exhausted: bool
    would_be_epsilon: float | None
    message: str = ""


@dataclass
class HospitalPrivacy:
    """Privacy state of one hospital and data set for one round of one run."""

    plan: PrivacyPlan
    ledger: PrivacyLedger
    dataset: str
    description: dict[str, Any]
    run_id: str
    server_round: int
    run: History = field(default_factory=list)
    previous: History = field(default_factory=list)
    restored_from: str = "none"

    @classmethod
    def open(cls, plan: PrivacyPlan, ledger: PrivacyLedger, dataset: str, description: dict[str, Any],
             run_id: str, server_round: int, state_history: History) -> HospitalPrivacy:
        ledger_run = ledger.history(dataset, run=run_id)
        state_history = compact(state_history)
        if total_steps(ledger_run) >= total_steps(state_history):
            run, source = ledger_run, "ledger"
        else:
            run, source = state_history, "local state"
        return cls(plan, ledger, dataset, description, run_id, server_round, run,
                   ledger.history(dataset, exclude_run=run_id), source)

    @property
    def lifetime(self) -> History:
        return compact([*self.previous, *self.run])

    def epsilon(self, history: History) -> float:
        return epsilon(history, self.plan.delta, self.plan.accountant)

    def check_budget(self) -> BudgetCheck:
        """Before training: would the coming round's planned steps push the lifetime epsilon above
        ``max_epsilon``? (A copy of the history plus the planned steps; nothing is trained.)"""
        plan = self.plan
        if plan.max_epsilon is None:
            return BudgetCheck(False, None)
        would_be = self.epsilon([*self.lifetime, plan.next_round()])
        if would_be <= plan.max_epsilon:
            return BudgetCheck(False, would_be)
        spent = self.epsilon(self.lifetime)
        return BudgetCheck(True, would_be, (
            f"privacy budget exhausted: lifetime epsilon {spent:.4g} would reach {would_be:.4g} after this "
            f"round's {plan.steps_per_round} DP steps, above privacy.max_epsilon={plan.max_epsilon:g} "
            f"(delta {plan.delta:.3g}, {plan.accountant} accountant); this hospital does not train"))

    def record_round(self, run_history: History, steps: int) -> None:
        """After training, before the reply: the round's steps go into the ledger."""
        self.ledger.append(self.dataset, self.description, {
            "run": self.run_id, "round": int(self.server_round), "noise_multiplier": self.plan.noise_multiplier,
            "sample_rate": self.plan.sample_rate, "steps": int(steps), "delta": self.plan.delta,
            "scope": self.plan.scope, "accountant": self.plan.accountant,
            "max_grad_norm": self.plan.max_grad_norm, "expected_batch": self.plan.expected_batch,
        })
        self.run = compact(run_history)

    def metrics(self, steps_round: int, check: BudgetCheck | None = None) -> dict[str, Any]:
        """The DP entries of a train reply (``protocol.DP_*``)."""
        plan, lifetime = self.plan, self.lifetime
        out: dict[str, Any] = {
            protocol.DP_EPSILON: self.epsilon(self.run),
            protocol.DP_EPSILON_LIFETIME: self.epsilon(lifetime),
            protocol.DP_DELTA: plan.delta,
            protocol.DP_NOISE_MULTIPLIER: plan.noise_multiplier,
            protocol.DP_SAMPLE_RATE: plan.sample_rate,
            protocol.DP_MAX_GRAD_NORM: plan.max_grad_norm,
            protocol.DP_EXPECTED_BATCH: float(plan.expected_batch),
            protocol.DP_STEPS_ROUND: float(steps_round),
            protocol.DP_STEPS_TOTAL: float(total_steps(self.run)),
            protocol.DP_STEPS_LIFETIME: float(total_steps(lifetime)),
            protocol.DP_BUDGET_EXHAUSTED: float(bool(check and check.exhausted)),
            # This run's accountant history, so a report can recompute epsilon by any accountant.
            protocol.DP_HISTORY_NOISE: [float(e[0]) for e in self.run],
            protocol.DP_HISTORY_RATE: [float(e[1]) for e in self.run],
            protocol.DP_HISTORY_STEPS: [float(e[2]) for e in self.run],
        }
        if plan.max_epsilon is not None:
            out[protocol.DP_MAX_EPSILON] = plan.max_epsilon
        if check is not None and check.would_be_epsilon is not None:
            out[protocol.DP_WOULD_BE_EPSILON] = check.would_be_epsilon
        return out
