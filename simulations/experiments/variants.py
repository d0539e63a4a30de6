"""Variants of an experiment: named sets of config overrides in ``conf/variants/<name>.yaml``.

A variant file holds a one-line ``description``, the ``overrides`` it applies to the experiment's
base config (Hydra dotlist syntax), and a ``procedure``: ``standard`` (train as a hospital does),
``two_stage`` (train the cGAN, then a fresh classifier on real + selected generated images), or a
reference row a user would try instead (``logistic_regression`` on pixels, ``small_cnn``: a
ResNet-18), trained on the same labels and scored on the same patches. Procedures are registered in
``simulations/experiments/procedures.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from common.config import CONF_DIR, ConfigError, load_yaml

SETTINGS = ("centralized", "local", "federated")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: tuple[str, ...]
    procedure: str = "standard"


def variant_names() -> list[str]:
    """Every variant shipped in ``conf/variants``."""
    return sorted(p.stem for p in (CONF_DIR / "variants").glob("*.yaml"))


def load_variant(name: str) -> Variant:
    """The variant ``conf/variants/<name>.yaml``; ``ConfigError`` naming the file when it is wrong."""
    path = CONF_DIR / "variants" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown variant {name!r} (no {path}); variants: {variant_names()}")
    spec = load_yaml(path)
    unknown = sorted(set(spec) - {"description", "overrides", "procedure"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; expected description, overrides, procedure")
    overrides = spec.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{path}: overrides must be a list of 'key=value' strings")
    procedure = str(spec.get("procedure", "standard"))  # checked against the registry by experiment_config
    return Variant(name, str(spec.get("description", "")), tuple(overrides), procedure)


def apply_overrides(run: dict[str, Any], overrides: tuple[str, ...] | list[str], where: str) -> dict[str, Any]:
    """``run`` with dotlist ``overrides`` merged in; keys must already exist (no typos pass)."""
    base = OmegaConf.create(run)
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    except Exception as error:  # OmegaConf raises several key/validation error types
        raise ConfigError(f"{where}: cannot apply overrides {list(overrides)}: {error}") from error
    resolved = OmegaConf.to_container(merged, resolve=True)
    assert isinstance(resolved, dict)
    return resolved
