"""Hospital partitions: pure, seeded functions from labels or group ids to index arrays per site.

Every function returns ``num_sites`` sorted int64 index arrays that are disjoint and together
cover the input (except where a docstring says otherwise), and gives the same result for the same
arguments. Impossible requests (too few items or groups for the sites) raise ``ValueError``.

- ``iid_partition``: stratified shuffle; every site gets the same class mix (up to one patch).
- ``dirichlet_partition``: label skew; each class is spread over the sites in Dirichlet(alpha)
  proportions (smaller alpha, more skew). ``dirichlet_proportions`` + ``split_by_proportions``
  let a test split follow the same proportions as the train split.
- ``quantity_partition``: quantity skew; site sizes in Dirichlet(alpha) shares, classes mixed;
  ``quantity_split`` cuts a train and a test split with the same shares.
- ``natural_partition``: the natural split by a recorded hospital id (Camelyon17 ``center``).
- ``group_partition``: whole groups (patients, slides) per site, balanced in patch count.
- ``split_by_groups``: a patient-level train/val/test split, stratified by class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.seeds import held_out_seed

_IID, _DIRICHLET, _QUANTITY, _GROUPS, _SPLIT = 11, 13, 17, 19, 23  # stream tags of the seeded rngs


def _check_sites(num_sites: int) -> None:
    if num_sites < 1:
        raise ValueError(f"the number of sites must be >= 1, got {num_sites}")


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest-remainder rounding)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = int(total - counts.sum())
    if remainder:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:remainder]] += 1
    return counts


def _cut(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    bounds = np.cumsum(counts)[:-1]
    return list(np.split(indices, bounds))


def _finish(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def iid_partition(labels: np.ndarray, num_sites: int, seed: int) -> list[np.ndarray]:
    """Shuffle each class and deal it round-robin: equal class mix and sizes (up to one) per site."""
    _check_sites(num_sites)
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, _IID])
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
                           ) if len(labels) else np.zeros(0, np.int64)
    return [np.sort(order[s::num_sites]).astype(np.int64) for s in range(num_sites)]


def split_by_proportions(labels: np.ndarray, proportions: np.ndarray, seed: int) -> list[np.ndarray]:
    """Spread each class ``c`` over the sites in ``proportions[c]`` (rows: classes, columns: sites)."""
    labels = np.asarray(labels)
    proportions = np.asarray(proportions, dtype=np.float64)
    num_sites = proportions.shape[1]
    rng = np.random.default_rng([seed, _DIRICHLET, 1])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in np.unique(labels):
        if not 0 <= c < len(proportions):
            raise ValueError(f"label {c} has no row in the proportions (classes 0..{len(proportions) - 1})")
        rows = rng.permutation(np.flatnonzero(labels == c))
        for site, chunk in enumerate(_cut(rows, _largest_remainder(proportions[c], len(rows)))):
            parts[site].append(chunk)
    return _finish(parts)


def dirichlet_proportions(labels: np.ndarray, num_sites: int, alpha: float, seed: int,
                          min_size: int = 1, max_tries: int = 1000) -> np.ndarray:
    """Per-class site proportions ~ Dirichlet(alpha), redrawn until every site gets ``min_size`` patches.

    Returns a (max label + 1, num_sites) array whose rows sum to 1.
    """
    _check_sites(num_sites)
    if alpha <= 0:
        raise ValueError(f"partition.alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    if len(labels) and labels.min() < 0:
        raise ValueError("the Dirichlet partition needs every patch labelled (labels >= 0)")
    if len(labels) < min_size * num_sites:
        raise ValueError(f"{len(labels)} patches cannot give {num_sites} sites {min_size} each")
    num_classes = int(labels.max()) + 1 if len(labels) else 1
    counts = np.bincount(labels, minlength=num_classes) if len(labels) else np.zeros(1, np.int64)
    rng = np.random.default_rng([seed, _DIRICHLET, 0])
    for _ in range(max_tries):
        proportions = rng.dirichlet(np.full(num_sites, float(alpha)), size=num_classes)
        sizes = sum(_largest_remainder(proportions[c], int(counts[c])) for c in range(num_classes))
        if np.min(sizes) >= min_size:
            return proportions
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw in {max_tries} gave all {num_sites} sites at least "
                     f"{min_size} of {len(labels)} patches; raise alpha, lower partition.min_size or use "
                     f"fewer sites")


def dirichlet_partition(labels: np.ndarray, num_sites: int, alpha: float, seed: int,
                        min_size: int = 1) -> list[np.ndarray]:
    """Label skew: each class spread over the sites in Dirichlet(alpha) proportions."""
    return split_by_proportions(labels, dirichlet_proportions(labels, num_sites, alpha, seed, min_size), seed)


def quantity_shares(num_sites: int, alpha: float, seed: int) -> np.ndarray:
    """Each site's share of the patches ~ Dirichlet(alpha) over the sites (sums to 1)."""
    _check_sites(num_sites)
    if alpha <= 0:
        raise ValueError(f"partition.alpha must be > 0, got {alpha}")
    return np.random.default_rng([seed, _QUANTITY]).dirichlet(np.full(num_sites, float(alpha)))


def split_by_shares(num_items: int, shares: np.ndarray, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """A random split of ``range(num_items)`` into parts of the given shares, each >= ``min_size``."""
    num_sites = len(shares)
    if num_items < min_size * num_sites:
        raise ValueError(f"{num_items} patches cannot give {num_sites} sites {min_size} each")
    sizes = _largest_remainder(np.asarray(shares), num_items)
    while sizes.min() < min_size:  # move patches from the largest site to the smallest
        sizes[np.argmax(sizes)] -= 1
        sizes[np.argmin(sizes)] += 1
    order = np.random.default_rng([seed, _QUANTITY, 1]).permutation(num_items)
    return [np.sort(p).astype(np.int64) for p in _cut(order, sizes)]


def quantity_split(num_train: int, num_test: int, num_sites: int, alpha: float, seed: int,
                   min_size: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Quantity skew of a train and a test split alike: one set of Dirichlet(alpha) site shares cuts
    both (at least ``min_size`` training and one held-out patch per site)."""
    shares = quantity_shares(num_sites, alpha, seed)
    return (split_by_shares(num_train, shares, seed, min_size),
            split_by_shares(num_test, shares, held_out_seed(seed), 1))


def quantity_partition(num_items: int, num_sites: int, alpha: float, seed: int,
                       min_size: int = 1) -> list[np.ndarray]:
    """Quantity skew: site sizes in Dirichlet(alpha) shares (smaller alpha, more unequal), classes mixed."""
    return split_by_shares(num_items, quantity_shares(num_sites, alpha, seed), seed, min_size)


def natural_partition(hospitals: np.ndarray, hospital_ids: Sequence[int]) -> list[np.ndarray]:
    """Site ``k`` gets the patches of hospital ``hospital_ids[k]`` (patches of other hospitals: none)."""
    hospitals = np.asarray(hospitals)
    return [np.flatnonzero(hospitals == h).astype(np.int64) for h in hospital_ids]


def group_partition(groups: np.ndarray, num_sites: int, seed: int) -> list[np.ndarray]:
    """Whole groups (patients, slides) per site: largest first to the site with fewest patches."""
    _check_sites(num_sites)
    groups = np.asarray(groups)
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(ids) < num_sites:
        raise ValueError(f"{len(ids)} patient/slide groups cannot be spread over {num_sites} sites "
                         f"(each site needs at least one)")
    shuffled = np.random.default_rng([seed, _GROUPS]).permutation(len(ids))
    order = shuffled[np.argsort(-counts[shuffled], kind="stable")]
    totals = np.zeros(num_sites, np.int64)
    site_of = np.empty(len(ids), np.int64)
    for g in order:
        site = int(np.argmin(totals))
        site_of[g] = site
        totals[site] += counts[g]
    owner = site_of[inverse]
    return [np.flatnonzero(owner == s).astype(np.int64) for s in range(num_sites)]


def split_by_groups(groups: np.ndarray, strata: np.ndarray, fractions: Sequence[float],
                    seed: int) -> list[np.ndarray]:
    """A group-level split (no patient in two parts) into ``len(fractions)`` parts, per stratum.

    Each group's stratum is its most frequent ``strata`` value (its class); within a stratum the
    groups are shuffled and counted out by ``fractions`` (the first part takes the rest; a later
    part with a positive fraction gets at least one group when the stratum has groups to spare).
    """
    groups, strata = np.asarray(groups), np.asarray(strata)
    fractions = np.asarray(fractions, dtype=np.float64)
    if len(fractions) < 1 or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions.tolist()}")
    ids, inverse = np.unique(groups, return_inverse=True)
    stratum_of = np.array([np.bincount(strata[inverse == g] - strata.min()).argmax() for g in range(len(ids))])
    rng = np.random.default_rng([seed, _SPLIT])
    part_of = np.zeros(len(ids), np.int64)
    for s in np.unique(stratum_of):
        members = rng.permutation(np.flatnonzero(stratum_of == s))
        counts = np.round(fractions * len(members)).astype(np.int64)
        for k in range(1, len(fractions)):
            if fractions[k] > 0 and counts[k] == 0 and len(members) - counts[1:].sum() > 1:
                counts[k] = 1
        counts[0] = len(members) - counts[1:].sum()
        if counts[0] < 0:  # rounding overshot: take back from the last parts
            for k in range(len(fractions) - 1, 0, -1):
                take = min(counts[k], -counts[0])
                counts[k] -= take
                counts[0] += take
        for k, chunk in enumerate(_cut(members, counts)):
            part_of[chunk] = k
    owner = part_of[inverse]
    return [np.flatnonzero(owner == k).astype(np.int64) for k in range(len(fractions))]


def label_skew(labels: np.ndarray, parts: Sequence[np.ndarray]) -> float:
    """Mean total-variation distance between each site's class mix and the overall one (0: IID)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = []
    for part in parts:
        if len(part):
            mix = np.array([(labels[part] == c).mean() for c in classes])
            distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances)) if distances else 0.0
