"""Shared fixtures: the tiny preset and small synthetic data sets (CPU, a few seconds each)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedvitgan import use_app_root

use_app_root()  # the checkout's folders, for this process and the ones the tests start (fedvitgan/__init__.py)

from client.site_cache import SITE_CACHE  # noqa: E402
from common.model import ModelConfig, model_preset  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return model_preset("tiny")


@pytest.fixture(autouse=True)
def no_kept_hospitals() -> Iterator[None]:
    """Each test starts and ends without hospitals kept by the process (client/site_cache.py)."""
    SITE_CACHE.clear()
    yield
    SITE_CACHE.clear()
