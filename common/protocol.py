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

#: MetricRecord entries used as aggregation weights.
REAL_EXAMPLES = "num-examples"
LABELLED_EXAMPLES = "labelled-examples"
GENERATOR_STEPS = "generator-steps"
WEIGHT_KEYS = {
    "real_examples": REAL_EXAMPLES,
    "labelled_examples": LABELLED_EXAMPLES,
    "generator_steps": GENERATOR_STEPS,
}

#: Site ConfigRecord entries.
SITE_NAME = "name"
STATUS = "status"  # "ok" | "data_error" | "error"
STATUS_MESSAGE = "message"
CLASS_COUNTS_JSON = "class-counts-json"
