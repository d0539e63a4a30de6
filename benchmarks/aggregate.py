"""Aggregation at scale: the server's per-group FedAvg against Flower's own ``FedAvg`` on the same replies.

Each reply is the preset's three groups (generator, discriminator, classifier) of a hospital: the
global model plus its own random perturbation, float32 on the wire, in the shape the ClientApp
sends (one packed ArrayRecord per group, ``common/records.py``; a metrics record, a site record).
The same values also make a Flower-shaped reply (one ArrayRecord with one array per tensor,
``num-examples``), so both strategies read identical numbers.

- time: ``GroupedStrategy.aggregate_train`` (every reply checked, then per-group FedAvg, as
  ``server/federation.py`` calls it) against ``flwr.serverapp.strategy.FedAvg.aggregate_train``
  (``aggregate_arrayrecords``: all keys under one weight, the "one group") on the same N replies in
  memory, interleaved, median of ``--repeats``;
- memory: in a fresh spawned child per kind, tracemalloc's peak during ``aggregate_train`` minus
  what was traced just before it (the replies): the aggregation's own memory;
- streaming: in one more child, ``--stream-replies`` replies made one at a time, each checked
  (``check_train_reply``), added to the running sums (``server.aggregate.WeightedSum``) and
  dropped: the traced peak beyond the global model while a reply is checked and summed (the reply
  in hand, the sums, and what checking and summing take; building the next reply, which is the
  benchmark's own work, is left out), after 10 replies and after all of them.

Both strategies get every reply of a round at once (Flower's Grid hands them over as one batch), so
N replies of the base preset need N x 106 MiB in memory; ``--replies`` is lowered to what fits in
70 % of the available memory, and the output says so.

    python benchmarks/aggregate.py [--preset base] [--replies 100] [--repeats 5] [--stream-replies 100]

Ends with ``aggregate/flower time ratio: R, peak memory M MiB for a model of N MiB`` (M: the
server path's own peak at N replies).
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from common import protocol  # noqa: E402
from common.config import compose_config, plain_config  # noqa: E402
from common.model import GROUPS, build_model, model_preset  # noqa: E402
from common.records import to_arrayrecord  # noqa: E402
from server.replies import ReplyLimits, check_train_reply  # noqa: E402
from server.strategy import AggregationConfig, GroupedStrategy  # noqa: E402

MIB = 1024.0**2
CLASS_NAMES = ("normal", "tumour")
LOCAL_STEPS = 100
KINDS = ("flower", "server")


@dataclass
class Setup:
    """The global model (float32 NumPy, by group) and what the server needs to check replies."""

    preset: str
    state: dict[str, np.ndarray]
    groups: dict[str, list[str]]
    aggregation: AggregationConfig
    limits: ReplyLimits

    @property
    def model_bytes(self) -> int:
        return sum(v.nbytes for v in self.state.values())


def make_setup(preset: str) -> Setup:
    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every aggregation
    run = plain_config(compose_config([f"model={preset}"]))
    model = build_model(model_preset(preset), len(CLASS_NAMES), seed=0)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    groups = {g: [k for k in state if k.startswith(g + ".")] for g in GROUPS}
    limits = ReplyLimits(CLASS_NAMES, int(run["federation"]["score_bins"]), int(run["federation"]["max_site_examples"]),
                         LOCAL_STEPS)
    return Setup(preset, state, groups, AggregationConfig.from_config(run["federation"]["aggregation"]), limits)


def _perturbed(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``value`` plus uniform noise in [-0.01, 0.01) (uniform: four times faster to draw than normal)."""
    noise = rng.random(value.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(0.02)
    noise += value
    return noise


def make_reply(setup: Setup, index: int, flower_too: bool = True) -> tuple[Message, Message | None]:
    """Hospital ``index``'s reply as the server gets it, and (``flower_too``) the same values as
    Flower's FedAvg wants them."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process has
    rng = np.random.default_rng(1000 + index)
    values = {k: _perturbed(v, rng) for k, v in setup.state.items()}
    examples = int(rng.integers(50, 500))
    node = index + 1
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({g: to_arrayrecord({k: torch.from_numpy(values[k]) for k in keys}, "float32")
                          for g, keys in setup.groups.items()})
    content[protocol.METRICS] = MetricRecord({protocol.REAL_EXAMPLES: examples, protocol.LABELLED_EXAMPLES: examples // 2,
                                              protocol.GENERATOR_STEPS: LOCAL_STEPS})
    content[protocol.SITE] = ConfigRecord({protocol.SITE_NAME: f"site-{index}", protocol.STATUS: "ok"})
    if not flower_too:
        return Message(content, reply_to=instruction), None
    flower = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in values.items()}),
                         "metrics": MetricRecord({"num-examples": examples})})
    return (Message(content, reply_to=instruction),
            Message(flower, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train")))


class Nodes:
    """The one thing ``configure_train`` asks of a Grid here: the connected node ids."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))


def server_strategy(setup: Setup, count: int) -> GroupedStrategy:
    reference = {k: torch.from_numpy(v) for k, v in setup.state.items()}
    return GroupedStrategy(reference, setup.aggregation, "float32", "{}", setup.limits, count, min_sites=1,
                           wait_for_sites_s=0.0, phase_timeout_s=3600.0)


def aggregate_once(kind: str, setup: Setup, replies: list[tuple[Message, Message]]) -> tuple[float, ArrayRecord]:
    """Seconds one ``aggregate_train`` of ``kind`` takes over ``replies``, and its result."""
    if kind == "flower":
        strategy: Any = FedAvg()
        batch = [flower for _, flower in replies]
    else:
        strategy = server_strategy(setup, len(replies))
        current = ArrayRecord({k: Array(v) for k, v in setup.state.items()})
        strategy.configure_train(1, current, ConfigRecord(), Nodes(len(replies)))  # type: ignore[arg-type]
        batch = [ours for ours, _ in replies]
    gc.collect()
    start = time.perf_counter()
    arrays, _ = strategy.aggregate_train(1, batch)
    seconds = time.perf_counter() - start
    if arrays is None:
        raise RuntimeError(f"{kind}: aggregate_train returned nothing "
                           f"({getattr(getattr(strategy, 'train_record', None), 'excluded', '')})")
    return seconds, arrays


def _memory_child(kind: str, preset: str, count: int, queue: Any) -> None:
    """In a fresh process: make ``count`` replies, then trace the memory of one ``aggregate_train``."""
    setup = make_setup(preset)
    replies = [make_reply(setup, i) for i in range(count)]
    if kind == "server":  # configure_train's outgoing messages are not part of aggregating
        strategy = server_strategy(setup, count)
        strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in setup.state.items()}), ConfigRecord(),
                                 Nodes(count))  # type: ignore[arg-type]
        batch = [ours for ours, _ in replies]
    else:
        strategy = FedAvg()
        batch = [flower for _, flower in replies]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    arrays, _ = strategy.aggregate_train(1, batch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert arrays is not None
    queue.put((kind, (peak - before) / MIB))


def streamed(setup: Setup, count: int) -> Iterator[Message]:
    """Replies made one at a time, as they would arrive."""
    for index in range(count):
        yield make_reply(setup, index, flower_too=False)[0]


def _stream_child(preset: str, count: int, queue: Any) -> None:
    """Replies checked and summed one at a time: the traced peak after 10 replies and after ``count``."""
    from server.aggregate import WeightedSum

    setup = make_setup(preset)
    reference = {g: {k: torch.from_numpy(setup.state[k]) for k in keys} for g, keys in setup.groups.items()}
    weight_keys = {g: protocol.WEIGHT_KEYS[setup.aggregation.rules[g].weight] for g in GROUPS}
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sums = {g: WeightedSum({k: setup.state[k] for k in keys}) for g, keys in setup.groups.items()}
    peaks: dict[int, float] = {}
    seconds = 0.0
    highest = 0
    for index, msg in enumerate(streamed(setup, count), start=1):
        tracemalloc.reset_peak()  # from here: the reply in hand, the running sums and what checking them takes
        start = time.perf_counter()
        reply = check_train_reply(msg, reference, "float32", setup.limits)
        for group, running in sums.items():
            running.add(reply.groups[group], float(reply.metrics[weight_keys[group]]))
        seconds += time.perf_counter() - start
        highest = max(highest, tracemalloc.get_traced_memory()[1])
        del reply, msg
        gc.collect()  # a Message sits in reference cycles: without this, a dropped reply waits for the cyclic GC,
        # which few allocations (packed groups) trigger late, and the next replies pile up beside it
        if index in (min(10, count), count):
            peaks[index] = (highest - before) / MIB
    tracemalloc.reset_peak()
    result = {g: running.mean({k: setup.state[k] for k in setup.groups[g]}) for g, running in sums.items()}
    peaks[count] = max(peaks[count], (tracemalloc.get_traced_memory()[1] - before) / MIB)
    tracemalloc.stop()
    assert all(np.isfinite(v).all() for arrays in result.values() for v in arrays.values())
    queue.put(("stream", {"peaks": peaks, "seconds": seconds}))


def in_child(target: Any, *args: Any) -> Any:
    """``target(*args, queue)`` in a fresh spawned process; its result, or an error if it died."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not process.is_alive():
                raise RuntimeError(f"child {target.__name__} died (exit code {process.exitcode})") from None
    process.join()
    return result[1]


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def largest_fitting(requested: int, model_bytes: int) -> int:
    """Replies that fit in 70 % of the available memory beside about 1.5 GiB of the rest."""
    room = 0.7 * available_bytes() - 1.5 * 1024**3
    return max(2, min(requested, int(room // (1.1 * model_bytes))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", help="model preset in conf/model (default: base)")
    parser.add_argument("--replies", type=int, default=100,
                        help="replies both strategies aggregate (default: 100; lowered to what fits in memory)")
    parser.add_argument("--stream-replies", type=int, default=100,
                        help="replies streamed one at a time through the running sum (default: 100; 0: skip)")
    parser.add_argument("--repeats", type=int, default=5, help="timed aggregations of each kind (default: 5)")
    args = parser.parse_args(argv)

    setup = make_setup(args.preset)
    model_mib = setup.model_bytes / MIB
    count = largest_fitting(args.replies, setup.model_bytes)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}, "
          f"numpy {np.__version__}, load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"preset: {args.preset}, {sum(v.size for v in setup.state.values()):,} parameters, model {model_mib:.1f} MiB "
          f"(float32), groups: " + ", ".join(f"{g} {sum(setup.state[k].nbytes for k in keys) / MIB:.1f} MiB"
                                            for g, keys in setup.groups.items()), flush=True)
    if count < args.replies:
        print(f"replies in memory: {count} (asked {args.replies}; {args.replies} x {model_mib:.0f} MiB do not fit "
              f"in 70 % of the {available_bytes() / 1024**3:.1f} GiB available)", flush=True)

    memory = {kind: in_child(_memory_child, kind, args.preset, count) for kind in KINDS}
    stream = in_child(_stream_child, args.preset, args.stream_replies) if args.stream_replies > 0 else None

    start = time.perf_counter()
    replies = [make_reply(setup, i) for i in range(count)]
    print(f"made {count} replies in {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    results: dict[str, ArrayRecord] = {}
    for _ in range(args.repeats):
        for kind in KINDS:
            seconds, results[kind] = aggregate_once(kind, setup, replies)
            times[kind].append(seconds)
    # Same check as FedAvg where the weights agree: the server weighs discriminator and classifier
    # by num-examples, as Flower weighs everything.
    alike = [k for g in GROUPS if setup.aggregation.rules[g].weight == "real_examples" for k in setup.groups[g]]
    worst = max(float(np.max(np.abs(results["server"][k].numpy() - results["flower"][k].numpy()))) for k in alike)

    medians = {kind: statistics.median(t) for kind, t in times.items()}
    for kind, label in (("flower", "flower FedAvg"), ("server", "server (checks + per-group FedAvg)")):
        print(f"{label:>36}: {count} replies, median {medians[kind]:7.2f} s ({medians[kind] / count * 1e3:6.1f} ms "
              f"per reply) over {args.repeats}, peak memory beyond the replies {memory[kind]:7.1f} MiB", flush=True)
    print(f"largest difference from Flower's FedAvg on the groups weighted alike: {worst:.2e}")
    if stream is not None:
        print(f"streamed {args.stream_replies} replies one at a time (checked, summed, dropped) in "
              f"{stream['seconds']:.1f} s of checking and summing: traced peak beyond the model "
              + ", ".join(f"{peak:.1f} MiB after {n}" for n, peak in sorted(stream["peaks"].items()))
              + f" (one reply of {model_mib:.1f} MiB in flight)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"aggregate/flower time ratio: {medians['server'] / medians['flower']:.2f}, "
          f"peak memory {memory['server']:.0f} MiB for a model of {model_mib:.0f} MiB")


if __name__ == "__main__":
    main()
