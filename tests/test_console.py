"""A clean simulation console: Flower's shutdown noise dropped in the Ray workers, --quiet keeps the
per-round lines."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.console import DropFlowerNoise, RoundLinesOnly, round_lines_only

ROOT = Path(__file__).resolve().parents[1]
ROUND = "[round 2/5] 3 hospitals aggregated, 0 left out, 12.6 s  |  global: accuracy 0.670"


def test_round_lines_only_passes_the_per_round_lines_even_when_written_in_pieces() -> None:
    target = io.StringIO()
    stream = RoundLinesOnly(target)
    stream.write("[round 2/5] training at the hospitals ...\npartition (patches per hospital and class):\n")
    stream.write(ROUND[:20])
    stream.write(ROUND[20:] + "\n| site-0 | train | 10 |\nrun folder: /tmp/x\n")
    assert target.getvalue() == ROUND + "\n"


def test_round_lines_only_restores_stdout() -> None:
    original = sys.stdout
    with round_lines_only(True):
        assert isinstance(sys.stdout, RoundLinesOnly)
    assert sys.stdout is original
    with round_lines_only(False):
        assert sys.stdout is original


def test_flower_noise_filter_drops_only_the_known_noise() -> None:
    records = []
    logger = logging.getLogger("test.flower.noise")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.addFilter(DropFlowerNoise())
    logger.warning("Manually terminating %s", "ClientAppActor")
    logger.warning("DEPRECATED FEATURE: %s\n\n  more", "The `run_simulation` function is deprecated and ...")
    logger.warning("ClientApp raised an exception")
    assert [r.getMessage() for r in records] == ["ClientApp raised an exception"]


WORKER_SCRIPT = """
import logging, sys, time
import ray
from simulations.console import start_ray

start_ray({{}}, quiet={quiet})

@ray.remote
class Actor:
    def speak(self):
        log = logging.getLogger("flwr")
        log.warning("Manually terminating ClientAppActor")
        log.warning("a warning the user must see")
        log.error("an error the user must see")
        return True

actor = Actor.remote()
assert ray.get(actor.speak.remote())
time.sleep(3)  # let Ray forward the worker's output to this driver
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True])
def test_ray_workers_drop_the_shutdown_warning_and_keep_real_ones(quiet: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    done = subprocess.run([sys.executable, "-c", WORKER_SCRIPT.format(quiet=quiet)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "an error the user must see" in output
    assert ("a warning the user must see" in output) is not quiet  # --quiet: hospitals print errors only
    assert "Manually terminating" not in output
