"""How the run's one ``seed`` becomes each hospital's and each round's own seed.

Every derived seed is written here once, so that two draws never share a stream by accident and a
reader finds in one place which draws a seed change moves. The constants are arbitrary but fixed:
changing one changes every seeded run's results.
"""

from __future__ import annotations

#: Seeds of different hospitals are this far apart (``site_seed``), so up to 1000 hospitals never share one.
SITE_STRIDE = 1000
#: Batch streams of different runs are this far apart (a prime, so (site, round) offsets never alias).
BATCH_STRIDE = 1_000_003
#: Batch streams of different hospitals in one run are this far apart (more rounds than any run has).
BATCH_SITE_STRIDE = 1009


def site_seed(seed: int, site: int) -> int:
    """Hospital ``site``'s own seed: its data draws (labels kept, validation carved) and its trainer."""
    return int(seed) * SITE_STRIDE + int(site)


def batch_seed(seed: int, stream: int) -> int:
    """The seed of real-batch stream ``stream`` of the run (see ``round_stream``)."""
    return int(seed) * BATCH_STRIDE + int(stream)


def round_stream(site: int, server_round: int) -> int:
    """The batch stream a hospital draws in one federated round: a new one every round."""
    return int(site) * BATCH_SITE_STRIDE + int(server_round)


def held_out_seed(seed: int) -> int:
    """The seed of a partition's held-out (test) split, next to the training split's ``seed``."""
    return int(seed) + 1
