"""The run config, typed: one root dataclass holding each section's typed form.

Hydra composes ``conf/`` into a dict (it also travels as JSON in every Flower message); ``run_config``
builds the typed sections from it once and names the section and key at fault. Defaults live in
``conf/``: every section here is built from a composed config, so a key conf/ lacks is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config import ConfigError, dataclass_from_mapping, to_plain
from common.data.config import DataConfig, PartitionConfig, data_config, partition_config
from common.data.options import DataSetOptions
from common.data.registry import data_set_options
from common.device import resolve_device
from common.faults import Fault, parse_faults
from common.federation_config import FederationConfig, federation_config
from common.model import ModelConfig
from common.privacy.config import PrivacyConfig, check_private_centre, check_private_training, privacy_config
from common.train.config import TrainConfig, run_train_config

#: Top-level keys that are single values (the sections are typed below).
SCALAR_KEYS = ("seed", "device")


@dataclass(frozen=True)
class RunConfig:
    """One run's configuration: the seed, the device (resolved), and every typed section."""

    seed: int
    device: str
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    data_options: DataSetOptions  # the data set's own keys, typed by its registration
    partition: PartitionConfig
    federation: FederationConfig
    privacy: PrivacyConfig
    faults: tuple[Fault, ...]


def run_config(run: Mapping[str, Any] | Any) -> RunConfig:
    """``run`` (a composed config, as a dict or a DictConfig) as a ``RunConfig``; ``ConfigError``
    naming the section and key when one is missing, unknown or out of range."""
    values = to_plain(run)
    if not isinstance(values, Mapping):
        raise ConfigError(f"run config: expected a mapping, got {type(values).__name__}")
    missing = [k for k in (*SCALAR_KEYS, "model", "train", "data", "partition", "federation", "privacy")
               if k not in values]
    if missing:
        raise ConfigError(f"run config: missing section(s) or key(s) {missing} (conf/config.yaml sets them)")
    federation = federation_config(values["federation"])
    typed = RunConfig(
        seed=int(values["seed"]),
        device=resolve_device(values["device"]),
        model=dataclass_from_mapping(ModelConfig, values["model"], "model"),
        train=run_train_config(values),
        data=data_config(values["data"]),
        data_options=data_set_options(values["data"]),
        partition=partition_config(values["partition"]),
        federation=federation,
        privacy=privacy_config(values["privacy"]),
        faults=tuple(parse_faults(values.get("faults"), federation.num_sites)),
    )
    check_private_training(typed.train, typed.privacy)  # no hospital could run it: refused once, here
    check_private_centre(typed.model.classifier_centre, typed.privacy)
    return typed
