"""Names shared by the ServerApp and the ClientApp: message record keys and metric keys.

Kept in one place so the two sides, which never import each other, agree on the wire format.
"""

from __future__ import annotations

#: Record key of the round's configuration (a ConfigRecord) in every instruction message.
CONFIG = "config"
#: Record key of a reply's metrics (MetricRecord) and of the site's status (ConfigRecord).
METRICS = "metrics"
SITE = "site"

#: ConfigRecord entries of an instruction.
SERVER_ROUND = "server-round"
TRANSPORT_DTYPE = "transport-dtype"
RUN_CONFIG_JSON = "run-config-json"
SENT_GROUPS = "sent-groups"  # comma-separated groups present in the message

#: MetricRecord entries used as aggregation weights (with DP: the hospital's released noisy counts).
REAL_EXAMPLES = "num-examples"
LABELLED_EXAMPLES = "labelled-examples"
GENERATOR_STEPS = "generator-steps"
WEIGHT_KEYS = {
    "real_examples": REAL_EXAMPLES,
    "labelled_examples": LABELLED_EXAMPLES,
    "generator_steps": GENERATOR_STEPS,
}

#: MetricRecord entries of an evaluate reply: the held-out split's counts (no single patch's
#: prediction), as flat lists of integers. The confusion matrix is row-major (true class, predicted
#: class); the score histograms are (class, bin), bins equal over [0, 1] (``federation.score_bins``).
EVAL_CONFUSION = "eval/confusion"
EVAL_POSITIVE_SCORES = "eval/positive-scores"  # class c's probability, over the patches of class c
EVAL_NEGATIVE_SCORES = "eval/negative-scores"  # class c's probability, over the other patches

#: Site ConfigRecord entries.
SITE_NAME = "name"
STATUS = "status"  # one of the STATUS_* values below
STATUS_MESSAGE = "message"
CLASS_COUNTS_JSON = "class-counts-json"

#: Site status of a reply the coordinator may use.
STATUS_OK = "ok"
#: Site status of a hospital that cannot read its data or its configuration (the message says why, or
#: only the error's type where the text could name files on the hospital's machine).
STATUS_DATA_ERROR = "data_error"
#: Site status of any other failure at the hospital (the error's type only; the details stay in its log).
STATUS_ERROR = "error"
#: Site status of a hospital whose privacy budget would be exceeded by the coming round.
STATUS_BUDGET_EXHAUSTED = "budget_exhausted"
#: Site status of a hospital whose own policy refuses the run's configuration (the message names the
#: key), or that is asked to inject faults outside a simulation; it trains nothing that round.
STATUS_REFUSED = "refused"

#: Differential-privacy entries of a train reply's MetricRecord (privacy.enabled=true). Epsilons are
#: at dp/delta by the configured accountant; "epsilon" and "steps_total" are this run's (cumulative
#: over its rounds), "lifetime" adds every earlier run on the same data set (the hospital's ledger).
DP_EPSILON = "dp/epsilon"
DP_EPSILON_LIFETIME = "dp/epsilon_lifetime"
DP_DELTA = "dp/delta"
DP_NOISE_MULTIPLIER = "dp/noise_multiplier"
DP_SAMPLE_RATE = "dp/sample_rate"
DP_MAX_GRAD_NORM = "dp/max_grad_norm"
DP_EXPECTED_BATCH = "dp/expected_batch"
DP_STEPS_ROUND = "dp/steps_round"
DP_STEPS_TOTAL = "dp/steps_total"
DP_STEPS_LIFETIME = "dp/steps_lifetime"
DP_MAX_EPSILON = "dp/max_epsilon"
DP_WOULD_BE_EPSILON = "dp/would_be_epsilon"
DP_BUDGET_EXHAUSTED = "dp/budget_exhausted"
#: Std of the Gaussian noise on the released training-set size and labelled count (which then
#: stand in for the exact counts: sampling rate, loss scale, num-examples, labelled-examples).
DP_COUNT_NOISE_STD = "dp/count_noise_std"
#: Noise multiplier of this run's head-centre release at the hospital (model.classifier_centre), when it made one.
DP_CENTRE_NOISE = "dp/centre_noise_multiplier"
#: This run's accountant history as three parallel lists (noise multiplier, sample rate, steps).
DP_HISTORY_NOISE = "dp/history_noise_multiplier"
DP_HISTORY_RATE = "dp/history_sample_rate"
DP_HISTORY_STEPS = "dp/history_steps"

#: Local-state entries of a train reply: state files the hospital could not read and skipped for an
#: older one (0 normally), and the round of the state it continued from (-1: none).
STATE_FILES_SKIPPED = "state/files_skipped"
STATE_RESTORED_ROUND = "state/restored_round"
