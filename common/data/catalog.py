"""The data-set registry: one entry per ``data.name``, added by the data set's own module.

Every data set declares its options, a frozen dataclass of the keys its ``conf/data/<name>.yaml``
sets beyond the shared ones (``common/data/options.py``). A file-backed data set (read from
``data.root``) registers them with its two functions, in the style of timm's ``register_model``::

    register_file_data_set("nct_crc", options=NctCrcOptions, splits=splits, load=load)

- ``splits(options) -> {split: on-disk name}``: the splits it offers;
- ``load(root, options, split, image_size) -> PatchDataset``: one split, with clear ``DataError``\\ s.

A generated data set (no files) registers how a hospital gets its whole ``SiteData`` instead
(``register_generated_data_set``). ``common/data/registry.py`` imports every data-set module, so that
each registration has run before a name is looked up; adding a data set is its module, its import
there, and ``conf/data/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import ConfigError
from common.data.options import DataSetOptions, FileDataSetOptions, read_options
from common.registry import Registry

if TYPE_CHECKING:
    from common.data.base import PatchDataset
    from common.data.config import DataConfig, PartitionConfig
    from common.data.sites import SiteData

SplitsFn = Callable[[Any], Mapping[str, str]]
LoadFn = Callable[[Path, Any, str, int], "PatchDataset"]
ClassNamesFn = Callable[[Any], tuple[str, ...]]  # a generated set's is called with None (no options needed)
DescribeFn = Callable[[Any], str]
SiteFn = Callable[["DataConfig", Any, "PartitionConfig", int, int, int, int], "SiteData"]


def named_class_names(options: Any) -> tuple[str, ...]:
    """A file-backed set's classes: ``data.class_names`` (the loaders check the files against them)."""
    names = getattr(options, "class_names", None)
    if not names:
        raise ConfigError(f"data.class_names is not set for data set {options.name!r}; list the classes "
                          "(in label order) in its conf/data file or on the command line")
    return tuple(str(n) for n in names)


@dataclass(frozen=True)
class DataSetEntry:
    """One registered data set. File-backed: ``splits`` and ``load`` are set; generated: ``load_site``.
    Every function takes the data set's ``options`` (built by :meth:`read_options`)."""

    name: str
    options: type[DataSetOptions]
    class_names: ClassNamesFn
    splits: SplitsFn | None = None
    load: LoadFn | None = None
    load_site: SiteFn | None = None
    #: Optional one-line description of the layout and splits a loader read (``fedvitgan data check``).
    describe: DescribeFn | None = None

    @property
    def file_backed(self) -> bool:
        return self.load is not None

    def read_options(self, section: Mapping[str, Any] | Any) -> Any:
        """This data set's options from the ``data`` section (``ConfigError`` naming a bad key)."""
        return read_options(self.options, section)


DATA_SETS: Registry[DataSetEntry] = Registry("data set")


def register_data_set(entry: DataSetEntry) -> DataSetEntry:
    """Add ``entry`` under its name; a name registered twice, or an entry that is neither file-backed
    nor generated, is a programming error."""
    if (entry.load is None) == (entry.load_site is None) or (entry.load is None) != (entry.splits is None):
        raise ValueError(f"data set {entry.name!r}: register either splits and load (files) or load_site "
                         f"(generated)")
    return DATA_SETS.add(entry.name, entry)


def register_file_data_set(name: str, *, options: type[FileDataSetOptions], splits: SplitsFn, load: LoadFn,
                           class_names: ClassNamesFn = named_class_names,
                           describe: DescribeFn | None = None) -> DataSetEntry:
    """Register a data set read from ``data.root`` (see the module docstring); its options say the
    splits its hospitals train and evaluate on (``data.train_split``, ``data.test_split``)."""
    return register_data_set(DataSetEntry(name, options, class_names, splits=splits, load=load,
                                          describe=describe))


def register_generated_data_set(name: str, *, options: type[DataSetOptions], load_site: SiteFn,
                                class_names: ClassNamesFn) -> DataSetEntry:
    """Register a data set that makes each hospital's data itself (no files)."""
    return register_data_set(DataSetEntry(name, options, class_names, load_site=load_site))


def data_set(name: Any) -> DataSetEntry:
    """The entry ``data.name`` picks; ``ConfigError`` listing the known names otherwise."""
    if name not in DATA_SETS:
        raise ConfigError(f"data.name {name!r} is not a known data set; choose one of {data_set_names()}")
    return DATA_SETS[str(name)]


def file_data_set(name: Any) -> DataSetEntry:
    """The file-backed entry ``data.name`` picks; ``ConfigError`` otherwise."""
    entry = DATA_SETS.get(str(name))
    if entry is None or not entry.file_backed:
        generated = sorted(set(data_set_names()) - set(data_set_names(files_only=True)))
        raise ConfigError(f"data.name {name!r} is not a known data set; choose one of "
                          f"{data_set_names(files_only=True)} (files under data.root) or of {generated} "
                          f"(generated, no files)")
    return entry


def data_set_names(files_only: bool = False) -> list[str]:
    """Every registered name (sorted); with ``files_only`` the file-backed ones."""
    return sorted(n for n, e in DATA_SETS.items() if e.file_backed or not files_only)
