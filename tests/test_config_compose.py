"""Every config choice composes: each option of each group, each experiment and each variant builds
the typed run config (and the server's aggregation rules, and an experiment's own section)."""

from __future__ import annotations

import pytest

from common.config import CONF_DIR, ConfigError, compose_config, plain_config
from common.data.registry import data_set_names
from common.run_config import RunConfig, run_config
from server.strategy import AggregationConfig
from simulations.experiments.config import experiment_config
from simulations.experiments.runner import variant_run
from simulations.experiments.variants import load_variant, variant_names

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("experiment", "variants", "__pycache__"))
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _typed(run: dict) -> RunConfig:
    typed = run_config(run)
    AggregationConfig.from_config(run["federation"]["aggregation"])
    assert typed.data.name in data_set_names()
    return typed


def test_the_lists_cover_every_group_and_option() -> None:
    assert {"data", "model", "partition", "train", "federation", "privacy", "tracking"} <= set(GROUPS)
    assert ("data", "breakhis") in OPTIONS and ("partition", "natural") in OPTIONS and len(OPTIONS) >= 20


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_of_every_group_builds_the_typed_config(group: str, option: str) -> None:
    run = plain_config(compose_config([f"{group}={option}"]))
    typed = _typed(run)
    if group == "data":
        assert typed.data.name == run["data"]["name"]
    if group == "model":
        assert typed.model.name == option


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_builds_the_typed_config(name: str) -> None:
    run = plain_config(compose_config([f"experiment={name}"], config_name="experiments"))
    exp = experiment_config(run["experiment"])
    assert exp.name == name  # the experiment's file overrides conf/experiments.yaml's defaults, not the reverse
    for variant in exp.variants:  # as the runner builds each of its runs
        _typed(variant_run(run, exp, load_variant(variant), seed=0))


@pytest.mark.parametrize("name", variant_names())
def test_every_variant_builds_the_typed_config_on_the_default_experiment(name: str) -> None:
    run = plain_config(compose_config(["experiment=few_labels"], config_name="experiments"))
    _typed(variant_run(run, experiment_config(run["experiment"]), load_variant(name), seed=0))


def test_a_bad_section_is_named() -> None:
    run = plain_config(compose_config())
    del run["privacy"]
    with pytest.raises(ConfigError, match=r"missing section\(s\) or key\(s\) \['privacy'\]"):
        run_config(run)
    run = plain_config(compose_config(["train.local_steps=-1"]))
    with pytest.raises(ConfigError, match="local_steps"):
        run_config(run)
