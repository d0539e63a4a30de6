"""One train instruction: the hospital's policy first (privacy, secure aggregation), then one round.

The round (:func:`train_round`) is the same with and without DP: load the data and the local state,
load the model, train, save, reply. What differs is its strategy (``client.round_strategy``): the
plain one (``client.plain_round``) or DP-SGD with the hospital's ledger and the count release
(``client.private_round``). The DP modules (Opacus, the accountants) are imported only for a DP
instruction.
"""

from __future__ import annotations

from flwr.app import RecordDict

from client.local_run import LocalRun
from client.plain_round import PlainRound
from client.policy import check_privacy, check_secure_policy
from client.round_strategy import RoundEnds, RoundStrategy
from client.secure_aggregation import under_secure_aggregation


def train(local: LocalRun) -> RecordDict:
    """Local training under the run's privacy section, refused first if the hospital's policy says so."""
    pcfg = local.config.privacy
    check_privacy(pcfg, local.site.policy)  # before any patch is read
    check_secure_policy(local.run, local.site.policy, under_secure_aggregation(local.msg))
    with local.kept():
        if pcfg.enabled:
            from client.private_round import PrivateRound

            return train_round(local, PrivateRound(pcfg))
        return train_round(local, PlainRound())


def train_round(local: LocalRun, strategy: RoundStrategy) -> RecordDict:
    """Local training on this round's global groups; the reply holds the shared groups and what the
    strategy releases."""
    train_cfg = strategy.train_config(local.config.train)
    data = local.data()
    saved = local.load_local()
    try:
        strategy.before_training(local, data, saved, train_cfg)
        model = local.loaded_model(data.train.num_classes)
        dp = strategy.gradients(local, model)
    except RoundEnds as stop:
        return stop.reply
    trainer = local.build_trainer(model, train_cfg, data, saved, dp)
    metrics = local.run_steps(trainer, strategy.batches(local, data, train_cfg), train_cfg.local_steps)
    out = strategy.release(local, data, metrics)
    return local.finish_round(trainer, model, saved, metrics, out.metrics, out.examples, out.labelled, out.meta,
                              out.class_counts_from)
