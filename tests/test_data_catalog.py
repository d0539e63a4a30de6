"""The data-set registry: a new data set is one module plus one registration, and mistakes are caught."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.config import ConfigError
from common.data import catalog
from common.data.base import PatchDataset
from common.data.errors import DataError
from common.data.registry import configured_class_names, data_set_names, dataset_splits, load_site_data, site_splits
from tests.data_fixtures import ALL_LABELS


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


def stripes_splits(cfg: Mapping[str, Any]) -> dict[str, str]:
    return {"fit": "fit", "holdout": "holdout"}


def stripes_load(root: Path, cfg: Mapping[str, Any], split: str, image_size: int) -> Stripes:
    sizes = {"fit": 24, "holdout": 12}
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
    assert site_splits({"name": "camelyon17"}) == ("train", "id_val")
    assert site_splits({"name": "pcam", "test_split": "val"}) == ("train", "val")


def test_a_registered_file_data_set_serves_hospitals(private_registry: None, tmp_path: Path) -> None:
    catalog.register_file_data_set("stripes", splits=stripes_splits, load=stripes_load,
                                   site_splits=("fit", "holdout"))
    data = {"name": "stripes", "root": str(tmp_path), "class_names": ["dark", "bright"], **ALL_LABELS}
    assert "stripes" in data_set_names(files_only=True)
    assert configured_class_names(data) == ("dark", "bright")
    site = load_site_data(data, {"name": "iid"}, 1, 2, 8, seed=0)
    assert len(site.test) == 6  # half of the 12 held-out patches: the registered site splits were used
    assert sorted(np.unique(site.test.labels).tolist()) == [0, 1]


def test_registering_a_name_twice_or_half_an_entry_is_refused(private_registry: None) -> None:
    with pytest.raises(ValueError, match="registered twice"):
        catalog.register_file_data_set("pcam", splits=stripes_splits, load=stripes_load)
    with pytest.raises(ValueError, match="either splits and load"):
        catalog.register_data_set(catalog.DataSetEntry("half", catalog.named_class_names, load=stripes_load))


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="'nope' is not a known data set.*imagefolder"):
        load_site_data({"name": "nope", "root": "x", **ALL_LABELS}, {"name": "iid"}, 0, 1, 8, seed=0)
    with pytest.raises(ConfigError, match=r"or of \['synthetic'\] \(generated"):
        dataset_splits({"name": "nope"})
