"""One set of method defaults for every data set: an experiment's real-image twin may change only its
data, partition and its own budget, never how the model is built or trained or made private."""

from __future__ import annotations

import pytest

from common.config import compose_config, plain_config

METHOD_SECTIONS = ("train", "model", "privacy", "federation")
PAIRS = [("few_labels", "digits_few_labels"), ("privacy_utility", "privacy_utility_digits")]


def _composed(experiment: str) -> dict:
    return plain_config(compose_config([f"experiment={experiment}"], config_name="experiments"))


@pytest.mark.parametrize(("synthetic", "real"), PAIRS)
def test_a_real_image_experiment_shares_every_method_key_with_its_synthetic_twin(synthetic: str, real: str) -> None:
    first, second = _composed(synthetic), _composed(real)
    for section in METHOD_SECTIONS:
        assert first[section] == second[section], f"{real} changes {section}.* against {synthetic}"
    assert first["data"]["name"] != second["data"]["name"]


def test_the_digits_dp_experiment_runs_the_synthetic_experiments_dp_recipe() -> None:
    synthetic = set(_composed("privacy_utility")["experiment"]["variants"])
    digits = _composed("privacy_utility_digits")["experiment"]
    assert {"plain", "unified", "plain_dp8_prior_whitened", "unified_dp8_prior_nogen"} <= set(digits["variants"])
    assert set(digits["variants"]) <= synthetic  # the same variant files: one DP recipe for both
    assert digits["settings"] == ["federated"] and digits["steps"] == 500 and digits["rounds"] == 10
