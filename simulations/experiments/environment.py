"""What an experiment's figures depend on besides the commit: the machine and the installed packages.

The same commit gives bit-identical results on one machine and install, but not always across
them (floating-point kernels differ by release and by instruction set): one federated run gave a
seed's test balanced accuracy 0.718 in one session and 0.714 in a later one, at the same commit
(docs/results.md). Each results.json records both, and the hash of each trunk prior file its variants
start from (a prior is rebuilt on each machine), so a figure can be traced to where it came from.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from simulations.data_fetch import sha256_file

#: The packages whose numerics or behaviour an experiment's figures depend on.
PACKAGES = ("torch", "numpy", "timm", "opacus", "flwr", "scikit-learn")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux), else the platform's processor string, else ``unknown``."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description() -> str:
    """One line: architecture, CPU model, cores, Python, torch (and the GPU where there is one)."""
    text = (f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores, "
            f"{platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}")
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version of each package in ``names`` (``not installed`` where it is missing)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def trunk_prior_hashes(runs: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """``model.trunk_prior`` path -> the SHA-256 of that file, for each distinct prior the run configs
    ``runs`` start from (``missing`` where there is no such file). A prior is rebuilt per machine
    (`fedvitgan prior`) and its weights differ between machines, so a figure depends on which file."""
    hashes: dict[str, str] = {}
    for run in runs:
        prior = (run.get("model") or {}).get("trunk_prior")
        if prior and str(prior) not in hashes:
            path = Path(str(prior)).expanduser()
            hashes[str(prior)] = sha256_file(path) if path.is_file() else "missing"
    return hashes
