"""The hospital's Flower ClientApp: local unified training and evaluation on its own data.

A train message carries the global groups and the run's config; the reply carries the updated
groups and metrics. Loss weights, optimiser moments, selection statistics, the random state and any
group configured as local stay here: in ``context.state`` across rounds and in the hospital's state
folder across process restarts and resumed runs. They are never put in a reply.

What a reply says about a failure is limited to what is safe to tell the coordinator: a refusal by
the hospital's policy names the run-config key (status ``refused``); other errors are named by
type only, with a reference to the full message, which stays in the hospital's log (it may name
files and folders on the hospital's machine).

Every instruction passes ``client.secure_aggregation.secure_aggregation_mod`` first: in a round with
secure aggregation (SecAgg+) Flower's ``secaggplus_mod`` answers the key stages and masks the
training reply, so no group leaves the hospital in the clear.

In a simulation, the config's ``faults`` make chosen hospitals misbehave (``client.faults``); a
deployed hospital refuses any instruction that asks for them.
"""

from __future__ import annotations

import logging
import os
import secrets
import traceback

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from client.faults import act_before, corrupt, faults_for  # noqa: E402
from client.local_run import LocalRun  # noqa: E402
from client.policy import PublicError, Refusal  # noqa: E402
from client.secure_aggregation import secure_aggregation_mod  # noqa: E402
from client.training_round import train as train_locally  # noqa: E402
from common import protocol  # noqa: E402
from common.config import ConfigError  # noqa: E402
from common.data.errors import DataError  # noqa: E402

logger = logging.getLogger("fedvitgan.client")

app = ClientApp(mods=[secure_aggregation_mod])


def _status_reply(msg: Message, site_name: str, status: str, message: str) -> Message:
    record = ConfigRecord({protocol.SITE_NAME: site_name, protocol.STATUS: status, protocol.STATUS_MESSAGE: message})
    return Message(RecordDict({protocol.SITE: record}), reply_to=msg)


def withheld(error: BaseException) -> str:
    """A reply's text for an error whose message may name local files: its type and a reference to
    the full message in the hospital's log."""
    reference = secrets.token_hex(4)
    logger.error("error reference %s: %s: %s", reference, type(error).__name__, error)
    return (f"{type(error).__name__} at the hospital (details withheld: they may name files on the hospital's "
            f"machine; its log has them under reference {reference})")


def _failure_reply(msg: Message, site_name: str, action: str, error: Exception) -> Message:
    """A status reply for an error at the hospital (its process goes on), telling only what is safe."""
    if isinstance(error, Refusal):  # the hospital's policy, or faults sent to a deployed hospital
        logger.error("%s: refusing to %s: %s", site_name, action, error)
        return _status_reply(msg, site_name, protocol.STATUS_REFUSED, str(error))
    if isinstance(error, PublicError):
        logger.error("%s: cannot %s: %s", site_name, action, error)
        return _status_reply(msg, site_name, protocol.STATUS_DATA_ERROR, str(error))
    if isinstance(error, (DataError, ConfigError)):
        logger.error("%s: cannot %s: %s", site_name, action, error)
        return _status_reply(msg, site_name, protocol.STATUS_DATA_ERROR, withheld(error))
    logger.error("%s: %s failed:\n%s", site_name, action, traceback.format_exc())
    return _status_reply(msg, site_name, protocol.STATUS_ERROR, withheld(error))


def _handle(msg: Message, context: Context, action: str) -> Message:
    site_name = str(context.node_config.get("site-name", f"site-{context.node_config.get('partition-id', '?')}"))
    try:
        run = LocalRun.from_message(msg, context)
        site_name = run.site.name
        faults = faults_for(run.run, context.node_config, run.site.site_id, run.server_round, action)
    except Exception as error:  # report, don't crash the hospital's process
        return _failure_reply(msg, site_name, action, error)
    hung = act_before(faults, run.run)  # simulation only: an injected crash leaves the ClientApp here
    if hung is not None:
        return _status_reply(msg, site_name, protocol.STATUS_ERROR, hung)
    try:
        content = train_locally(run) if action == "train" else run.evaluate()
    except Exception as error:
        return _failure_reply(msg, site_name, action, error)
    if faults:
        content = corrupt(content, faults, msg, run.transport)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global groups, run the local unified training, reply with groups and metrics."""
    return _handle(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global classifier on this hospital's held-out split: confusion matrix and binned class scores."""
    return _handle(msg, context, "evaluate")


