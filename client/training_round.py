"""One train instruction: the hospital's policy first (privacy, secure aggregation), then the plain or the private round.

The two rounds share :class:`client.local_run.LocalRun`'s building blocks (load, build the trainer,
run the steps, save the local state, reply); the private one adds the ledger, the count release and
the DP-SGD step. The DP modules (Opacus, the accountants) are imported only for a DP instruction.
"""

from __future__ import annotations

from flwr.app import RecordDict

from client.local_run import LocalRun
from client.policy import check_privacy, check_secure_policy
from client.secure_aggregation import under_secure_aggregation


def train(local: LocalRun) -> RecordDict:
    """Local training under the run's privacy section, refused first if the hospital's policy says so."""
    pcfg = local.config.privacy
    check_privacy(pcfg, local.site.policy)  # before any patch is read
    check_secure_policy(local.run, local.site.policy, under_secure_aggregation(local.msg))
    with local.kept():
        if pcfg.enabled:
            from client.private_round import train_private

            return train_private(local, pcfg)
        from client.plain_round import train_plain

        return train_plain(local)
