"""Shared fixtures: the tiny preset and small synthetic data sets (CPU, a few seconds each)."""

from __future__ import annotations

import pytest
import torch

from common.model import ModelConfig, model_preset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return model_preset("tiny")
