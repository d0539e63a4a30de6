"""Playing a broken or hostile hospital in a simulation (``faults`` in the config; see ``common.faults``).

Only a node that Flower's simulation engine created (``partition-id`` in its node config and no
``site-id``, which every deployed SuperNode sets) injects faults. A deployed hospital that receives
a run config with faults refuses the instruction: a coordinator cannot make a real hospital crash,
stall or send corrupted weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from client.policy import Refusal
from common import protocol
from common.faults import INFLATED_EXAMPLES, Fault, parse_faults
from common.model import GROUPS
from common.records import encode_tensor

logger = logging.getLogger("fedvitgan.client")

#: How long past the phase deadline a ``hang`` sleeps.
HANG_MARGIN_S = 5.0


class InjectedCrash(RuntimeError):
    """The ``crash`` fault: raised out of the ClientApp on purpose."""


class FaultsRefused(Refusal):
    """A run config with faults reached a hospital that is not a simulated node."""

    def __init__(self) -> None:
        super().__init__("faults", "the run config asks this hospital to inject faults; fault injection is for "
                                   "simulations only and this is a deployed node")


def is_simulated_node(node_config: Mapping[str, Any]) -> bool:
    """A node of Flower's simulation engine (it sets partition-id; deployed SuperNodes set site-id)."""
    return "partition-id" in node_config and "site-id" not in node_config


def faults_for(run: Mapping[str, Any], node_config: Mapping[str, Any], site: int, server_round: int,
               phase: str) -> list[Fault]:
    """The faults this hospital injects into this message; refuses any fault outside a simulation."""
    faults = parse_faults(run.get("faults"), int(run["federation"]["num_sites"]))
    if not faults:
        return []
    if not is_simulated_node(node_config):
        raise FaultsRefused()
    return [f for f in faults if f.applies(site, server_round, phase)]


def act_before(faults: Sequence[Fault], run: Mapping[str, Any]) -> str | None:
    """``crash`` raises; ``hang`` sleeps past the deadline and returns a status message; else None."""
    for fault in faults:
        if fault.kind == "crash":
            raise InjectedCrash("injected fault: crash")
    for fault in faults:
        if fault.kind == "hang":
            seconds = float(run["federation"]["round_timeout_s"]) + HANG_MARGIN_S
            logger.warning("injected fault: hanging for %.0f s", seconds)
            time.sleep(seconds)
            return f"injected fault: hung for {seconds:.0f} s"
    return None


def _float_like(array: np.ndarray, transport: str) -> bool:
    return np.issubdtype(array.dtype, np.floating) or (transport == "bfloat16" and array.dtype == np.int16)


def _decode(array: np.ndarray, transport: str) -> torch.Tensor:
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16).float() if transport == "bfloat16" else tensor.float()


def _map_floats(record: ArrayRecord, transport: str, change: Any) -> ArrayRecord:
    """A copy of ``record`` with ``change(key, float32 tensor)`` applied to its floating arrays."""
    out = {}
    for key in record.keys():
        array = record[key].numpy()
        out[key] = Array(encode_tensor(change(key, _decode(array, transport)), transport)
                         if _float_like(array, transport) else array)
    return ArrayRecord(out)


def _scaled(sent: ArrayRecord, factor: float, transport: str) -> Any:
    """``global + factor x (update - global)``, the global being what the server sent."""
    def change(key: str, update: torch.Tensor) -> torch.Tensor:
        base = _decode(sent[key].numpy(), transport)
        return base + factor * (update - base)

    return change


def corrupt(content: RecordDict, faults: Sequence[Fault], instruction: Message, transport: str) -> RecordDict:
    """The reply ``content`` with every content-changing fault applied."""
    groups = [g for g in GROUPS if g in content.array_records]
    for fault in faults:
        if fault.kind == "nan":
            for group in groups:
                content[group] = _map_floats(content.array_records[group], transport,
                                             lambda _k, t: torch.full_like(t, float("nan")))
        elif fault.kind == "shape" and groups:
            record = content.array_records[groups[0]]
            first = next(iter(record.keys()))
            items = {k: record[k] for k in record.keys()}
            wrong = record[first].numpy()
            items[first] = Array(np.zeros(wrong.size + 1, dtype=wrong.dtype))
            content[groups[0]] = ArrayRecord(items)
        elif fault.kind == "scale":
            factor = float(fault.scale if fault.scale is not None else 1.0)
            for group in groups:
                content[group] = _map_floats(content.array_records[group], transport,
                                             _scaled(instruction.content.array_records[group], factor, transport))
        elif fault.kind == "inflate_examples" and protocol.METRICS in content.metric_records:
            metrics = dict(content.metric_records[protocol.METRICS])
            metrics[protocol.REAL_EXAMPLES] = INFLATED_EXAMPLES
            metrics[protocol.LABELLED_EXAMPLES] = INFLATED_EXAMPLES
            content[protocol.METRICS] = MetricRecord(metrics)
        elif fault.kind == "impersonate" and protocol.SITE in content.config_records:
            content.config_records[protocol.SITE][protocol.SITE_NAME] = f"site-{fault.target}"
    return content
