"""The wheel puts one name into site-packages, and carries every module and data file of the app."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fedvitgan

ROOT = Path(__file__).resolve().parents[1]
DATA_SUFFIXES = (".py", ".yaml", ".json", ".safetensors")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every file of a wheel built from the checkout, by its name in the archive."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):  # a copy: a build folder left in the checkout cannot hide a gap
        shutil.copy2(ROOT / name, source / name)
    for package in ("fedvitgan", *fedvitgan.APP_PACKAGES):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("fedvitgan-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name_and_its_command(wheel_files: dict[str, bytes]) -> None:
    tops = {name.split("/", 1)[0] for name in wheel_files}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"fedvitgan"}
    (dist_info,) = tops - {"fedvitgan"}
    assert "fedvitgan = fedvitgan:main" in wheel_files[f"{dist_info}/entry_points.txt"].decode()


@pytest.mark.slow
def test_the_wheel_carries_every_module_and_data_file_of_the_app(wheel_files: dict[str, bytes]) -> None:
    """A new subpackage or data file that pyproject.toml does not list would be missing from the wheel."""
    wanted = {f"fedvitgan/_app/{path.relative_to(ROOT).as_posix()}"
              for package in fedvitgan.APP_PACKAGES for path in (ROOT / package).rglob("*")
              if path.suffix in DATA_SUFFIXES and "__pycache__" not in path.parts}
    assert len(wanted) > 100
    assert sorted(wanted - set(wheel_files)) == []


def test_the_app_root_is_the_installed_folder_when_there_is_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site-packages" / "fedvitgan"
    (package / "_app").mkdir(parents=True)
    monkeypatch.setattr(fedvitgan, "__file__", str(package / "__init__.py"))
    assert fedvitgan.app_root() == package / "_app"
    (package / "_app").rmdir()
    assert fedvitgan.app_root() == tmp_path / "site-packages"


def test_use_app_root_puts_the_folder_first_for_this_process_and_its_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(ROOT)])
    monkeypatch.setenv("PYTHONPATH", f"/elsewhere{os.pathsep}{ROOT}")
    assert fedvitgan.use_app_root() == ROOT
    assert sys.path[0] == str(ROOT)
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    done = subprocess.run([sys.executable, "-c", "import common.config, sys; print(common.config.__file__)"],
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ROOT / "common" / "config.py")
