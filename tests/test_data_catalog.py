"""The data-set registry: a new data set is one module plus one registration, and mistakes are caught."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError
from common.data import catalog
from common.data.base import PatchDataset
from common.data.errors import DataError
from common.data.options import FileDataSetOptions
from common.data.registry import (
    configured_class_names,
    data_set_names,
    data_set_options,
    dataset_splits,
    load_site_data,
    site_splits,
)
from tests.data_fixtures import ALL_LABELS, data_section


class Stripes(PatchDataset):
    """A stand-in for a new data set's loader: class k is stripes of brightness 60 * (k + 1)."""

    def __init__(self, count: int, image_size: int) -> None:
        self.labels = np.arange(count, dtype=np.int64) % 2
        self.class_names = ("dark", "bright")
        self.image_size = image_size

    def load_uint8(self, index: int) -> np.ndarray:
        patch = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        patch[::2] = 60 * (int(self.labels[index]) + 1)
        return patch


@dataclass(frozen=True, kw_only=True)
class StripesOptions(FileDataSetOptions):
    class_names: Sequence[str]
    holdout_size: int


def stripes_splits(options: StripesOptions) -> dict[str, str]:
    return {"fit": "fit", "holdout": "holdout"}


def stripes_load(root: Path, options: StripesOptions, split: str, image_size: int) -> Stripes:
    sizes = {"fit": 24, "holdout": options.holdout_size}
    if split not in sizes:
        raise DataError(f"stripes has no split {split!r}")
    return Stripes(sizes[split], image_size)


@pytest.fixture
def private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test stay in a copy of the registry."""
    monkeypatch.setattr(catalog.DATA_SETS, "_entries", dict(catalog.DATA_SETS._entries))


def test_every_shipped_data_set_is_registered_with_its_conf_file() -> None:
    conf = Path(__file__).resolve().parents[1] / "conf" / "data"
    assert set(data_set_names()) == {p.stem for p in conf.glob("*.yaml") if p.stem != "default"}
    assert "synthetic" not in data_set_names(files_only=True)
    assert site_splits(data_section("camelyon17", "x")) == ("train", "id_val")
    assert site_splits(data_section("pcam", "x", test_split="val")) == ("train", "val")


def test_every_conf_data_file_sets_exactly_its_data_sets_options() -> None:
    """Each file builds its data set's typed options: no key the data set does not know, none it lacks."""
    for name in data_set_names():
        options = data_set_options(data_section(name, "x"))
        assert options.name == name and type(options) is catalog.data_set(name).options
    with pytest.raises(ConfigError, match=r"data\.test_fracton is not an option of data set 'imagefolder'"):
        data_set_options(data_section("imagefolder", "x", test_fracton=0.1))
    with pytest.raises(ConfigError, match=r"data\.stain_shift is not set \(conf/data/synthetic\.yaml"):
        data_set_options({k: v for k, v in data_section("synthetic", "x").items() if k != "stain_shift"})


def test_a_registered_file_data_set_serves_hospitals(private_registry: None, tmp_path: Path) -> None:
    catalog.register_file_data_set("stripes", options=StripesOptions, splits=stripes_splits, load=stripes_load)
    data = {"name": "stripes", "root": str(tmp_path), "class_names": ["dark", "bright"], "holdout_size": 12,
            "train_split": "fit", "test_split": "holdout", **ALL_LABELS}
    assert "stripes" in data_set_names(files_only=True)
    assert configured_class_names(data) == ("dark", "bright")
    site = load_site_data(data, {"name": "iid"}, 1, 2, 8, seed=0)
    assert len(site.test) == 6  # half of the 12 held-out patches: the data set's own option and site splits
    assert sorted(np.unique(site.test.labels).tolist()) == [0, 1]


def test_registering_a_name_twice_or_half_an_entry_is_refused(private_registry: None) -> None:
    with pytest.raises(ValueError, match="registered twice"):
        catalog.register_file_data_set("pcam", options=StripesOptions, splits=stripes_splits, load=stripes_load)
    with pytest.raises(ValueError, match="either splits and load"):
        catalog.register_data_set(catalog.DataSetEntry("half", StripesOptions, catalog.named_class_names,
                                                       load=stripes_load))


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="'nope' is not a known data set.*imagefolder"):
        load_site_data({"name": "nope", "root": "x", **ALL_LABELS}, {"name": "iid"}, 0, 1, 8, seed=0)
    with pytest.raises(ConfigError, match=r"or of \['synthetic'\] \(generated"):
        dataset_splits({"name": "nope"})


def test_a_hospital_with_its_own_data_set_gets_that_sets_options_and_the_runs_shared_keys() -> None:
    from common.data.registry import hospital_data_section

    run = data_section("synthetic", "x", labeled_per_class=5, val_fraction=0.15, symmetries="none")
    mine = hospital_data_section("imagefolder", run)
    options = data_set_options({**mine, "root": "/data/mine"})
    assert options.name == "imagefolder" and options.test_fraction == data_section("imagefolder", "x")["test_fraction"]
    assert (mine["labeled_per_class"], mine["val_fraction"], mine["symmetries"]) == (5, 0.15, "none")
    assert "stain_shift" not in mine
    with pytest.raises(ConfigError, match="'mnist' .* is not a known data set"):
        hospital_data_section("mnist", run)
