"""What a training round leaves to its gradient strategy: plain steps, or DP-SGD with its ledger.

``client.training_round.train_round`` is the one round (data, local state, model, trainer, steps,
save, reply). A strategy plugs in at four points: the train section it runs under, what is checked
or released before the model is loaded, what the trainer's steps do with the real patches'
gradients (nothing, or ``DPTraining``) and which batches they see, and what the round may release
afterwards. ``client.plain_round.PlainRound`` and ``client.private_round.PrivateRound`` are the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from flwr.app import RecordDict

if TYPE_CHECKING:
    from client.local_run import LocalRun, SavedLocal
    from common.data.sites import SiteData
    from common.model import UnifiedViTGAN
    from common.privacy.wiring import DPTraining
    from common.train import RoundMetrics
    from common.train.config import TrainConfig


class RoundEnds(Exception):
    """The round stops before training, with ``reply`` as its answer (e.g. the privacy budget is spent)."""

    def __init__(self, reply: RecordDict) -> None:
        super().__init__("the round ends before training")
        self.reply = reply


@dataclass
class RoundRelease:
    """What a round may send besides the shared groups: its metrics, the example counts (exact, or
    the released noisy ones), metadata kept with the local state, and the data whose class counts
    the reply may carry (None: none)."""

    metrics: dict[str, float]
    examples: int
    labelled: int
    meta: dict[str, Any] = field(default_factory=dict)
    class_counts_from: SiteData | None = None


class RoundStrategy(Protocol):
    """The points where a plain and a private round differ (called in this order)."""

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """The train section the round runs under (checked before any patch is read)."""

    def before_training(self, local: LocalRun, data: SiteData, saved: SavedLocal | None, train: TrainConfig) -> None:
        """Checks and releases before the model is loaded; ``RoundEnds`` stops the round."""

    def gradients(self, local: LocalRun, model: UnifiedViTGAN) -> DPTraining | None:
        """What the steps do with the real patches' gradients (None: plain steps); may raise ``RoundEnds``."""

    def batches(self, local: LocalRun, data: SiteData, train: TrainConfig) -> Iterable[Any]:
        """The real batches the round's steps cycle."""

    def release(self, local: LocalRun, data: SiteData, metrics: RoundMetrics) -> RoundRelease:
        """After the steps: what the round may send."""
