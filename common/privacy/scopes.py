"""The privacy scopes: which parameter groups each one's DP-SGD trains, and what its epsilon means.

One table (``SCOPES``), read by the config (the scope names), the mechanism
(``common.privacy.wiring``: the groups whose real-patch gradients are clipped and noised), the
privacy report (covered and uncovered groups, side channels, the plain-words statement) and the
statements that go with an exported classifier or a generated data set. ``docs/privacy.md``
explains the same table for a reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scope:
    """One value of ``privacy.scope``."""

    name: str
    #: Parameter groups whose real-patch gradients get per-sample clipping and Gaussian noise.
    dp_groups: tuple[str, ...]
    #: Shared groups the guarantee covers -> how (the report lists them in this order).
    covered: dict[str, str]
    #: Shared groups it does not cover -> why not.
    not_covered: dict[str, str]
    #: Other ways real data could reach the server -> what this scope does about them.
    side_channels: dict[str, str]
    #: Whether the epsilon bounds everything the hospital shares (given a secret noise seed).
    end_to_end_guarantee: bool
    #: What the epsilon means, in plain words (report.md's first paragraph).
    statement: str
    #: Product (``generator``: what it generates; ``classifier``: trunk + head) -> what covers it.
    products: dict[str, str] = field(default_factory=dict)


#: Said of a product with no guarantee.
NO_GUARANTEE = "no formal privacy guarantee"

_CLASSIFIER = Scope(
    name="classifier",
    dp_groups=("classifier",),
    covered={
        "classifier": "DP-SGD on the classifier head's real-patch gradients (per-sample clipping, Gaussian noise), "
                      "with the trunk's features taken as given",
    },
    not_covered={
        "generator": "trained against that non-private discriminator and sent every round: what it learns "
                     "about the real patches is not bounded",
        "discriminator": "trained on this hospital's real patches with ordinary, non-private gradients and sent "
                         "to the server every round: its weights can reveal training patches directly, and the "
                         "head's epsilon is conditional on it",
    },
    side_channels={
        "loss weights": "learned without DP from losses of the model the real patches train (the generated "
                        "images' loss; the real-label loss's own weight is fixed under weighting.anchor; local "
                        "state, steers the head's training): not covered",
        "class centroids": "real-feature centroids steer which generated images teach the classifier, without "
                           "DP: not covered",
        "train metrics and class counts": "real-image losses, realised batch sizes and per-class counts are "
                                          "sent without DP: not covered",
    },
    end_to_end_guarantee=False,
    statement=(
        "No end-to-end guarantee. The epsilon bounds only what the classifier head's DP-SGD updates reveal, "
        "given the discriminator trunk and the generator. Those are trained on the same real patches without "
        "differential privacy and are shared as well, so the released model as a whole has no formal "
        "differential-privacy guarantee: do not describe this run as private. For a guarantee that covers "
        "every shared group, run with privacy.scope=discriminator."
    ),
    products={
        "generator": f"{NO_GUARANTEE}: with privacy.scope=classifier only the classifier head was trained with "
                     "DP-SGD; the discriminator trunk that trained the generator saw the real patches without "
                     "differential privacy, so the epsilons below do not cover the generator",
        "classifier": f"{NO_GUARANTEE}: only the classifier head was trained with DP-SGD (privacy.scope=classifier); "
                      "the trunk it reads was trained on the same patches without differential privacy, so the "
                      "epsilons below hold only for the head given the trunk",
    },
)

_DISCRIMINATOR = Scope(
    name="discriminator",
    dp_groups=("discriminator", "classifier"),
    covered={
        "discriminator": "DP-SGD on every parameter (trunk, adversarial head, class projection) for the real "
                         "patches' gradients",
        "classifier": "DP-SGD on every parameter for the real patches' gradients",
        "generator": "private by post-processing: it never sees a real patch, only the private discriminator "
                     "and classifier",
    },
    not_covered={},
    side_channels={
        "loss weights": "disabled: fixed weights (learned ones would be fitted to real-patch losses)",
        "class centroids": "disabled: generated images are selected by the private classifier's confidence "
                           "alone",
        "train metrics": "real-image losses and realised batch sizes are left out of the reply",
        "class counts": "not sent",
        "training-set size": "released once per data set with Gaussian noise (accounted, see count_release); "
                             "the exact size and labelled count are never used for the mechanism nor sent",
        "assumed public": "the configuration, and the wall-clock time of a round",
        "evaluation": "metrics on the held-out split are computed on other patches than the training split "
                      "this guarantee is about",
    },
    end_to_end_guarantee=True,
    statement=(
        "(epsilon, delta)-DP at the level of one training patch for everything this hospital shares through its "
        "model updates: every discriminator and classifier parameter that a real patch's gradient reaches is "
        "trained with DP-SGD, and the generator, which sees real patches only through the discriminator, is "
        "private by post-processing. The real-data side channels are closed as listed below."
    ),
    products={
        "generator": "differentially private by post-processing only: the generator never reads a real patch; it "
                     "learns only through the discriminator, whose every real-patch gradient was trained with DP-SGD "
                     "(privacy.scope=discriminator). Each hospital's (epsilon, delta) below bounds what the generated "
                     "images reveal about one of its training patches; epsilons are per hospital, never added",
        "classifier": "(epsilon, delta)-differentially private per hospital: the trunk and the head were trained with "
                      "DP-SGD on every real-patch gradient (privacy.scope=discriminator); each hospital's epsilon below "
                      "bounds what the classifier reveals about one of its training patches; epsilons are never added",
    },
)

#: Every scope, from the one covering least to the one covering most (a hospital's policy floor
#: compares positions in this order).
SCOPES: dict[str, Scope] = {s.name: s for s in (_CLASSIFIER, _DISCRIMINATOR)}
