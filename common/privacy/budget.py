"""A hospital's privacy bookkeeping for one train message: the releases already made, the count
release, the budget stop, the training attempt in the ledger and the DP metrics of its reply.

Releases (``ledger.Attempt``): ``run`` holds this run's (rounds of this run folder, repeated
rounds included), ``previous`` every other run's on the same data set; the lifetime is both. This
run's releases are the union, by attempt id, of the ledger's and those the hospital's local state
remembers, so losing records from either never lowers epsilon; a ledger older than the local state
(rolled back, replaced) stops training instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from common import protocol
from common.privacy.accounting import History, PrivacyPlan, counts_entry, epsilon, noisy_counts
from common.privacy.centre import centre_entry
from common.privacy.config import PrivacyConfig
from common.privacy.ledger import (
    CENTRE,
    COUNTS,
    SGD,
    Attempt,
    LedgerContent,
    LedgerError,
    PrivacyLedger,
    ReleasedCounts,
    history_of,
)
from common.privacy.scopes import SCOPES
from common.train.config import TrainConfig

T = TypeVar("T")

#: Train metrics computed from real patches without DP, or revealing the realised Poisson batch
#: sizes. Left out of the reply in scope=discriminator (in scope=classifier they are among the
#: declared, not covered channels).
REAL_DATA_METRICS = ("real_images", "images_per_second", "loss/cls_real", "loss/adv_discriminator",
                     "loss/real_loss")


#: The train.optim key of each DP-trained parameter group's learning rate.
_DP_GROUP_LEARNING_RATES = {"discriminator": "lr_discriminator", "classifier": "lr_classifier"}


def private_train_config(tcfg: TrainConfig, cfg: PrivacyConfig) -> TrainConfig:
    """The training config a hospital uses under ``cfg``: with DP on, pseudo-labels of unlabelled
    patches are off (the DP step has no pseudo-label loss, and the config says so), and so are the fit
    gate (it reads the real-label loss outside the DP-SGD) and the rules that count passes over the
    labelled patches, ``gan_signals`` and the ramp of D's gradient (a choice made from the exact labelled
    count; the private step weighs D's gradient by ``privacy.adversarial_weight`` instead); in
    scope=discriminator the learned loss weights (fitted to real-data losses, a channel outside the
    DP-SGD) are turned off too; ``privacy.learning_rate`` (when set) replaces train.optim's learning
    rate of each parameter group the scope's DP-SGD trains (``SCOPES[scope].dp_groups``)."""
    if not cfg.enabled:
        return tcfg
    tcfg = dataclasses.replace(tcfg, pseudo_label=dataclasses.replace(tcfg.pseudo_label, mode="none"),
                               fit_gate=dataclasses.replace(tcfg.fit_gate, threshold=0.0),
                               adversarial_trunk=dataclasses.replace(tcfg.adversarial_trunk, ramp_passes=0.0),
                               gan_signals=dataclasses.replace(tcfg.gan_signals, min_label_passes=0.0))
    if cfg.learning_rate is not None:
        tcfg = dataclasses.replace(tcfg, optim=dataclasses.replace(
            tcfg.optim, **{_DP_GROUP_LEARNING_RATES[group]: float(cfg.learning_rate)
                           for group in SCOPES[cfg.scope].dp_groups}))
    if cfg.scope != "discriminator":
        return tcfg
    return dataclasses.replace(tcfg, weighting=dataclasses.replace(tcfg.weighting, enabled=False))


def shared_train_metrics(flat: dict[str, float], cfg: PrivacyConfig) -> dict[str, float]:
    """The train metrics a hospital may put in its reply under ``cfg``."""
    if not cfg.enabled or cfg.scope != "discriminator":
        return flat
    return {k: v for k, v in flat.items() if k not in REAL_DATA_METRICS}


def releases_before_training(cfg: PrivacyConfig, centred: bool) -> History:
    """The releases a run makes besides its DP-SGD steps, which ``privacy.target_epsilon`` includes
    when it derives the noise: the count release and, with ``model.classifier_centre``, the head
    centre's. The count release counts even in a run that reuses counts released before: the plan
    is then the same in every run and round, and this run's epsilon can only fall short of the target."""
    return (counts_entry(cfg.count_noise_std), *((centre_entry(cfg),) if centred else ()))


@dataclass
class BudgetCheck:
    exhausted: bool
    would_be_epsilon: float | None
    message: str = ""


class _AlreadyReleased(Exception):
    """The counts were released by another process between this one's read and its lock."""


class BudgetExhausted(RuntimeError):
    """Raised under the ledger's lock when the budget check made there fails: nothing was recorded."""

    def __init__(self, check: BudgetCheck) -> None:
        super().__init__(check.message)
        self.check = check


def merge_attempts(ledger_attempts: list[Attempt], state_attempts: list[Attempt]) -> list[Attempt]:
    """The union by attempt id (a release both know counts once, with the larger step count)."""
    merged: dict[str, Attempt] = {a.id: a for a in ledger_attempts}
    for attempt in state_attempts:
        known = merged.get(attempt.id)
        if known is None or attempt.steps > known.steps:
            merged[attempt.id] = attempt
    return sorted(merged.values(), key=lambda a: a.number)


@dataclass
class SitePrivacy:
    """Privacy state of one hospital and data set for one train message of one run."""

    ledger: PrivacyLedger
    dataset: str
    description: dict[str, Any]
    run_id: str
    server_round: int
    run: list[Attempt] = field(default_factory=list)
    previous: list[Attempt] = field(default_factory=list)
    counts: ReleasedCounts | None = None
    plan: PrivacyPlan | None = None
    budget_source: str = "privacy.max_epsilon"
    from_state_only: int = 0  # releases the local state remembered and the ledger did not
    state_attempts: list[Attempt] = field(default_factory=list)  # what the hospital's local state remembers

    @classmethod
    def open(cls, ledger: PrivacyLedger, dataset: str, description: dict[str, Any], run_id: str, server_round: int,
             state_attempts: list[Attempt]) -> SitePrivacy:
        privacy = cls(ledger, dataset, description, run_id, server_round,
                      state_attempts=[a for a in state_attempts if a.dataset == dataset])
        privacy.refresh(ledger.load())
        return privacy

    def refresh(self, content: LedgerContent) -> None:
        """This run's and earlier runs' releases on the same data (any key the data had in the ledger),
        from ``content`` and the local state."""
        in_ledger = content.attempts_on(self.dataset, self.description)
        newest = max((a.number for a in self.state_attempts), default=0)
        if newest > content.last_attempt(self.dataset):
            raise LedgerError(
                f"the privacy ledger {self.ledger.path} knows {content.last_attempt(self.dataset)} releases of this data "
                f"set, but this hospital's local state remembers release {newest}: the ledger was rolled back or "
                f"replaced. Training stops rather than under-count; restore the newest ledger from a backup.")
        known = {a.id for a in in_ledger}
        merged = merge_attempts(in_ledger, self.state_attempts)
        self.run = [a for a in merged if a.run == self.run_id]
        self.previous = [a for a in merged if a.run != self.run_id]
        self.counts = content.counts.get(self.dataset)
        self.from_state_only = sum(a.id not in known for a in self.state_attempts)

    # ------------------------------------------------------------------ figures
    @property
    def lifetime(self) -> list[Attempt]:
        return [*self.previous, *self.run]

    def epsilon(self, history: History) -> float:
        assert self.plan is not None
        return epsilon(history, self.plan.delta, self.plan.accountant)

    @staticmethod
    def dp_steps(attempts: list[Attempt]) -> int:
        return sum(a.dp_steps for a in attempts)

    # ------------------------------------------------------------------ releases
    def release_counts(self, cfg: PrivacyConfig, examples: int, labelled: int,
                       seed_for: Callable[[int], int],
                       budget: tuple[float | None, float, str] | None = None) -> ReleasedCounts:
        """The data set's noisy counts: the ones released before, else released now (recorded in
        the ledger before they are used; ``seed_for(attempt number)`` seeds the noise).

        ``budget`` = (max epsilon, delta, its source): the release is checked against it under the
        ledger's lock, and ``BudgetExhausted`` raised, with nothing released, if it does not fit."""
        if self.counts is not None:
            return self.counts
        sigma, rate, steps = counts_entry(cfg.count_noise_std)  # the same entry the budget check adds

        def guard(content: LedgerContent) -> None:
            self.refresh(content)
            if self.counts is not None:  # another process released them while this one waited for the lock
                raise _AlreadyReleased
            if budget is not None:
                check = self.check_count_release(cfg, *budget)
                if check.exhausted:
                    raise BudgetExhausted(check)

        try:
            attempt = self.ledger.begin(self.dataset, self.description, COUNTS, self.run_id, self.server_round,
                                        sigma, rate, steps, guard=guard, noise_std=float(cfg.count_noise_std))
        except _AlreadyReleased:
            assert self.counts is not None
            return self.counts
        self.run.append(attempt)  # its cost counts from here, whatever happens next
        generator = torch.Generator().manual_seed(seed_for(attempt.number))
        noisy_n, noisy_labelled = noisy_counts(examples, labelled, cfg.count_noise_std, generator)
        self.ledger.record_counts(attempt, noisy_n, noisy_labelled)
        self.counts = ReleasedCounts(noisy_n, noisy_labelled, float(cfg.count_noise_std), attempt.number)
        return self.counts

    def check_count_release(self, cfg: PrivacyConfig, max_epsilon: float | None, delta: float,
                            source: str) -> BudgetCheck:
        """Before the count release: would it alone push the lifetime epsilon above ``max_epsilon``
        (at ``delta``)? Nothing is released when it would. (No check when the counts were released
        before, or no budget is set.)"""
        if self.counts is not None or max_epsilon is None:
            return BudgetCheck(False, None)
        entry = counts_entry(cfg.count_noise_std)
        lifetime = history_of(self.lifetime)
        would_be = epsilon([*lifetime, entry], delta, cfg.accountant)
        if would_be <= max_epsilon:
            return BudgetCheck(False, would_be)
        return BudgetCheck(True, would_be, (
            f"privacy budget exhausted before the count release: releasing the training-set size with "
            f"privacy.count_noise_std={cfg.count_noise_std:g} would take the lifetime epsilon from "
            f"{epsilon(lifetime, delta, cfg.accountant):.4g} to {would_be:.4g}, above {source} = {max_epsilon:g} "
            f"(delta {delta:.3g}, {cfg.accountant} accountant); nothing was released and this hospital does not train"))

    def check_budget(self, first: History = ()) -> BudgetCheck:
        """Before training: would the coming round's planned steps (after the releases ``first``)
        push the lifetime epsilon above the budget? (The history plus the planned steps; nothing is
        trained.)"""
        plan = self.plan
        assert plan is not None
        if plan.max_epsilon is None:
            return BudgetCheck(False, None)
        lifetime = history_of(self.lifetime)
        would_be = self.epsilon([*lifetime, *first, plan.next_round()])
        if would_be <= plan.max_epsilon:
            return BudgetCheck(False, would_be)
        spent = self.epsilon(lifetime)
        return BudgetCheck(True, would_be, (
            f"privacy budget exhausted: lifetime epsilon {spent:.4g} would reach {would_be:.4g} after this "
            f"round's {plan.steps_per_round} DP steps, above {self.budget_source} = {plan.max_epsilon:g} "
            f"(delta {plan.delta:.3g}, {plan.accountant} accountant); this hospital does not train"))

    def release_centre(self, entry: tuple[float, float, int], draw: Callable[[int], T]) -> T:
        """The head centre's release: recorded in the ledger (its cost counts from then) before
        ``draw(attempt number)`` draws its noise. Checked under the ledger's lock with the round's
        planned steps after it: ``BudgetExhausted``, with nothing released, if the two do not fit."""

        def guard(content: LedgerContent) -> None:
            self.refresh(content)
            check = self.check_budget((entry,))
            if check.exhausted:
                raise BudgetExhausted(check)

        noise, rate, steps = entry
        attempt = self.ledger.begin(self.dataset, self.description, CENTRE, self.run_id, self.server_round, noise,
                                    rate, steps, guard=guard)
        self.run.append(attempt)  # its cost counts from here, whatever happens next
        value = draw(attempt.number)
        self.run[-1] = self.ledger.end(attempt, steps)
        return value

    def begin_training(self) -> Attempt:
        """The round's training attempt, recorded in the ledger before any noise is drawn. The budget
        is checked again under the ledger's lock, on the ledger as it stands then (another process of
        this hospital may have trained since ``check_budget``): ``BudgetExhausted`` if it no longer fits."""
        plan = self.plan
        assert plan is not None

        def guard(content: LedgerContent) -> None:
            self.refresh(content)
            check = self.check_budget()
            if check.exhausted:
                raise BudgetExhausted(check)

        return self.ledger.begin(
            self.dataset, self.description, SGD, self.run_id, self.server_round, plan.noise_multiplier,
            plan.sample_rate, plan.steps_per_round, guard=guard, delta=plan.delta, scope=plan.scope,
            accountant=plan.accountant, max_grad_norm=plan.max_grad_norm, expected_batch=plan.expected_batch)

    def finish_training(self, attempt: Attempt, steps: int) -> None:
        """After training, before the reply: the attempt's steps are final in the ledger."""
        self.run.append(self.ledger.end(attempt, steps))

    def metrics(self, steps_round: int, check: BudgetCheck | None = None) -> dict[str, Any]:
        """The DP entries of a train reply (``protocol.DP_*``)."""
        plan = self.plan
        assert plan is not None
        run, lifetime = history_of(self.run), history_of(self.lifetime)
        out: dict[str, Any] = {
            protocol.DP_EPSILON: self.epsilon(run),
            protocol.DP_EPSILON_LIFETIME: self.epsilon(lifetime),
            protocol.DP_DELTA: plan.delta,
            protocol.DP_NOISE_MULTIPLIER: plan.noise_multiplier,
            protocol.DP_SAMPLE_RATE: plan.sample_rate,
            protocol.DP_MAX_GRAD_NORM: plan.max_grad_norm,
            protocol.DP_EXPECTED_BATCH: float(plan.expected_batch),
            protocol.DP_STEPS_ROUND: float(steps_round),
            protocol.DP_STEPS_TOTAL: float(self.dp_steps(self.run)),
            protocol.DP_STEPS_LIFETIME: float(self.dp_steps(self.lifetime)),
            protocol.DP_BUDGET_EXHAUSTED: float(bool(check and check.exhausted)),
            # This run's accountant history (the count release included, if this run made it), so a
            # report can recompute epsilon by any accountant.
            protocol.DP_HISTORY_NOISE: [float(e[0]) for e in run],
            protocol.DP_HISTORY_RATE: [float(e[1]) for e in run],
            protocol.DP_HISTORY_STEPS: [float(e[2]) for e in run],
        }
        if self.counts is not None and any(a.kind == COUNTS and a.number == self.counts.attempt for a in self.run):
            out[protocol.DP_COUNT_NOISE_STD] = self.counts.noise_std  # released in this run (its cost is in the history)
        centre = [a for a in self.run if a.kind == CENTRE]
        if centre:
            out[protocol.DP_CENTRE_NOISE] = centre[-1].noise_multiplier  # released in this run (its cost is in the history)
        if plan.max_epsilon is not None:
            out[protocol.DP_MAX_EPSILON] = plan.max_epsilon
        if check is not None and check.would_be_epsilon is not None:
            out[protocol.DP_WOULD_BE_EPSILON] = check.would_be_epsilon
        return out


def attempts_to_json(attempts: list[Attempt]) -> list[dict[str, Any]]:
    return [a.to_json() for a in attempts]


def attempts_from_json(rows: Any) -> list[Attempt]:
    return [Attempt.from_json(r) for r in rows or []]

