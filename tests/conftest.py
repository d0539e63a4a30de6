"""Shared fixtures: the tiny preset and small synthetic data sets (CPU, a few seconds each)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from client.hospital_cache import HOSPITALS
from common.model import ModelConfig, model_preset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return model_preset("tiny")


@pytest.fixture(autouse=True)
def no_kept_hospitals() -> Iterator[None]:
    """Each test starts and ends without hospitals kept by the process (client/hospital_cache.py)."""
    HOSPITALS.clear()
    yield
    HOSPITALS.clear()
