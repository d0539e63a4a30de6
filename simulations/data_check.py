"""``fedvitgan data check ROOT --dataset NAME``: validate a copy of a data set, print its counts.

Reads the data set's options from ``conf/data/NAME.yaml`` (change any with ``--set KEY=VALUE``),
opens every split, checks files, keys, shapes, dtypes and labels, confirms that every image file
exists and decodes a sample of patches per split, then prints the patches per split and class (and
per hospital where the data set records hospitals) and the data set's caveats. Exit status 0 when
the data are usable, 2 when not (the reason, naming the file, on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml

from common.config import CONF_DIR, ConfigError, load_yaml
from common.data.base import PatchDataset
from common.data.catalog import data_set
from common.data.errors import DataError
from common.data.folder import ImageFilesDataset
from common.data.registry import data_set_names, dataset_splits, load_dataset

EXIT_BAD_DATA = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedvitgan data check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  fedvitgan data check /data/pcam --dataset pcam\n"
               "  fedvitgan data check /data/nct --dataset nct_crc --decode all\n"
               "  fedvitgan data check /data/breakhis --dataset breakhis --set magnification=100X\n"
               "  fedvitgan data check /data/mine --dataset imagefolder --skip-corrupt\n"
               "  fedvitgan data check /data/mine --dataset imagefolder --set test_fraction=0.3",
    )
    parser.add_argument("root", help="the data set's folder (data.root)")
    parser.add_argument("--dataset", required=True, choices=data_set_names(files_only=True),
                        help="layout of the data set (data.name)")
    parser.add_argument("--split", action="append", default=None, metavar="SPLIT",
                        help="check only this split (repeatable; default: every split the data set has)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a data option of conf/data/NAME.yaml, e.g. --set size=64 (repeatable)")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="report and skip unreadable image files instead of failing (data.skip_corrupt=true)")
    parser.add_argument("--decode", default="64", metavar="N|all",
                        help="patches to decode per split, evenly spaced (default: 64; 'all' decodes every one)")
    parser.add_argument("--image-size", type=int, default=96, help="size to decode patches at (default: 96)")
    return parser


def data_config(dataset: str, root: str, overrides: Sequence[str], skip_corrupt: bool) -> dict[str, Any]:
    """``conf/data/<dataset>.yaml`` with ``root``, ``--set`` overrides and ``skip_corrupt`` applied."""
    path = CONF_DIR / "data" / f"{dataset}.yaml"
    cfg: dict[str, Any] = load_yaml(path) if path.is_file() else {"name": dataset}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        target = cfg
        *parents, leaf = key.removeprefix("data.").split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = yaml.safe_load(value)
    cfg.update(name=dataset, root=root)
    if skip_corrupt:
        if "skip_corrupt" not in cfg:
            raise ConfigError(f"--skip-corrupt: data set {dataset!r} has no data.skip_corrupt option (it reads "
                              f"no image files one by one)")
        cfg["skip_corrupt"] = True
    return cfg


def decode_sample(dataset: PatchDataset, limit: int | None) -> int:
    """Decode ``limit`` evenly spaced patches (all when None); ``DataError`` on the first failure."""
    if isinstance(dataset, ImageFilesDataset):
        missing = dataset.missing_files()
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            raise DataError(f"{len(missing)} of {len(dataset)} image files listed for this split do not exist "
                            f"(e.g. {shown}); expected every file of the layout (is the copy complete?)")
    n = len(dataset)
    indices = np.arange(n) if limit is None or limit >= n else np.unique(np.linspace(0, n - 1, limit).round())
    expected = (dataset.image_size, dataset.image_size, 3)
    for i in indices.astype(int):
        patch = dataset.load_uint8(int(i))
        if patch.shape != expected or patch.dtype != np.uint8:
            raise DataError(f"patch {i} decodes to {patch.dtype} {patch.shape}; expected uint8 {expected}")
    return len(indices)


def counts_table(datasets: dict[str, PatchDataset]) -> str:
    """Patches per class (rows) and split (columns), with totals."""
    classes = list(next(iter(datasets.values())).class_names)
    for ds in datasets.values():
        classes += [c for c in ds.class_names if c not in classes]
    splits = list(datasets)
    width = max(len("class"), *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>9}" for s in splits)]
    per_split = {s: ds.class_counts() for s, ds in datasets.items()}
    for c in classes:
        lines.append(f"{c:<{width}}  " + "  ".join(f"{per_split[s].get(c, 0):>9}" for s in splits))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{len(datasets[s]):>9}" for s in splits))
    return "\n".join(lines)


def check(cfg: dict[str, Any], splits: Sequence[str] | None, decode: int | None, image_size: int) -> str:
    """The check's report; raises ``DataError`` or ``ConfigError`` when the data are unusable."""
    names = list(splits) if splits else list(dataset_splits(cfg))
    datasets: dict[str, PatchDataset] = {}
    decoded: dict[str, int] = {}
    for split in names:
        try:
            datasets[split] = ds = load_dataset(cfg, split, image_size)
            decoded[split] = decode_sample(ds, decode)
        except DataError as error:
            raise DataError(f"split {split!r}: {error}") from error
    total = sum(len(d) for d in datasets.values())
    out = [f"data set {cfg['name']} at {cfg['root']}: {len(names)} split(s), {total} patches"]
    entry = data_set(cfg["name"])
    if entry.describe is not None:  # which layout and split a loader with several reads (class folders)
        out.append(entry.describe(entry.read_options(cfg)))
    out += ["", counts_table(datasets)]
    for split, ds in datasets.items():
        if ds.hospitals is not None:
            ids, counts = np.unique(ds.hospitals, return_counts=True)
            out.append(f"{split}: patches per hospital: " + ", ".join(f"{int(h)}: {int(c)}" for h, c in zip(ids, counts)))
        if ds.groups is not None:
            out.append(f"{split}: {len(np.unique(ds.groups))} patients/slides")
        for path in getattr(ds, "skipped", []):
            out.append(f"{split}: skipped unreadable image {path}")
    out.append("decoded " + ", ".join(f"{decoded[s]} {s}" for s in names) + f" patches at {image_size} px: all readable")
    warnings = list(dict.fromkeys(w for ds in datasets.values() for w in ds.warnings))
    if warnings:
        out += ["", "warnings:"] + [f"- {w}" for w in warnings]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when the data are usable, 2 when not (the reason on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has already printed
        return int(stop.code or 0)
    try:
        decode = None if args.decode == "all" else int(args.decode)
    except ValueError:
        print(f"fedvitgan data check: --decode expects a number or 'all', got {args.decode!r}", file=sys.stderr)
        return EXIT_BAD_DATA
    data_logger = logging.getLogger("fedvitgan.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # the report lists the data set's warnings itself
    try:
        cfg = data_config(args.dataset, args.root, args.overrides, args.skip_corrupt)
        print(check(cfg, args.split, decode, args.image_size))
    except (DataError, ConfigError) as error:
        print(f"fedvitgan data check: {error}", file=sys.stderr)
        return EXIT_BAD_DATA
    finally:
        data_logger.setLevel(level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


DATA_USAGE = """usage: fedvitgan data check ROOT --dataset NAME     validate a copy of a data set
       fedvitgan data fetch NAME --out DIR           write a small real-image data set (mnist5k: network)

Run 'fedvitgan data check --help' or 'fedvitgan data fetch --help' for the options."""


def data_command(argv: list[str]) -> int:
    """``fedvitgan data SUBCOMMAND ...``: ``check`` (this module) or ``fetch`` (simulations/data_fetch.py)."""
    if argv and argv[0] == "check":
        return main(argv[1:])
    if argv and argv[0] == "fetch":
        from simulations.data_fetch import main as fetch_main  # only fetch needs it

        return fetch_main(argv[1:])
    if argv and argv[0] in ("-h", "--help", "help"):
        print(DATA_USAGE)
        return 0
    print(DATA_USAGE, file=sys.stderr)
    return 2  # a usage error, as argparse reports one
