"""Where the configuration lives, and typed views of its sections."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

import conf

#: Root of the Hydra configuration tree (``conf/`` in the source tree and in an installed copy).
CONF_DIR: Path = Path(conf.__file__).resolve().parent

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


def to_plain(section: Any) -> Any:
    """OmegaConf containers -> plain dicts and lists (other values pass through)."""
    if isinstance(section, DictConfig) or OmegaConf.is_config(section):
        return OmegaConf.to_container(section, resolve=True)
    return section


def dataclass_from_mapping(cls: type[T], mapping: Mapping[str, Any] | Any, where: str) -> T:
    """Build dataclass ``cls`` from ``mapping``; nested dataclass fields are built recursively.

    Unknown and missing keys raise ``ConfigError`` naming ``where`` (the config section) and the key.
    """
    values = to_plain(mapping)
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in values:
            no_default = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING  # type: ignore[misc]
            )
            if no_default:
                raise ConfigError(f"{where}: missing required key {name!r}")
            continue
        value = values[name]
        nested = _nested_dataclass(cls, name)
        if nested is not None and isinstance(value, Mapping):
            value = dataclass_from_mapping(nested, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from error


def _nested_dataclass(cls: type, name: str) -> type | None:
    """Resolve a string annotation of field ``name`` to a dataclass type, if it is one."""
    import typing

    hints = typing.get_type_hints(cls)
    hint = hints.get(name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def load_yaml(path: Path, section: str | None = None) -> dict[str, Any]:
    """Read one YAML file of the config tree as a plain dict, naming the file on failure; with
    ``section`` (a dotted key), only that part, resolved on its own (the rest may hold
    interpolations that only Hydra resolves, such as ``${now:...}``)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as error:  # OmegaConf raises several YAML error types
        raise ConfigError(f"cannot parse {path}: {error}") from error
    where = f"{path}" + (f" ({section})" if section else "")
    if section:
        node = OmegaConf.select(node, section, default=None)
        if node is None:
            raise ConfigError(f"{where}: the file has no section {section!r}")
    try:
        loaded = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception as error:
        raise ConfigError(f"cannot resolve {where}: {error}") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return loaded


#: ``dataclasses.field`` metadata key of a field set from another config section by the code that
#: builds the section (e.g. ``augment.symmetries`` from ``data.symmetries``): the one kind of field
#: ``defaults_from_conf`` lets keep a default in code, because it is not a key of its own file.
DERIVED_FROM = "derived_from"


def derived_field(default: Any, source: str) -> Any:
    """A dataclass field that no config file sets: its builder copies it from ``source`` (a dotted
    key of the run config); ``default`` stands until it does."""
    return dataclasses.field(default=default, metadata={DERIVED_FROM: source})


def defaults_from_conf(relative_path: str, section: str | None = None) -> Callable[[type[T]], type[T]]:
    """Class decorator, written under ``@dataclass``: every field of the class takes its default
    from ``conf/<relative_path>`` (from its ``section``, a dotted key, when given), which must set
    each one. The YAML is then the only place a default is written; ``Cls()`` is the section as
    conf/ ships it (read once, on first use), and ``Cls(key=value)`` changes one key of it. A field
    given a value in the class body is refused, except a ``derived_field`` (set from another section)."""

    def decorate(cls: type[T]) -> type[T]:
        where = f"conf/{relative_path}" + (f" ({section})" if section else "")
        built: dict[str, Any] = {}

        def shipped() -> Any:
            if "value" not in built:
                if built.get("building"):
                    return None  # a key the file lacks: named by the caller below
                built["building"] = True
                try:
                    values = load_yaml(CONF_DIR / relative_path, section)
                    built["value"] = dataclass_from_mapping(cls, values, where)
                finally:
                    built["building"] = False
            return built["value"]

        def default(name: str) -> Any:
            shipped_section = shipped()
            if shipped_section is None:
                raise ConfigError(f"{where}: missing required key {name!r} (it holds {cls.__name__}'s defaults)")
            return copy.deepcopy(getattr(shipped_section, name))

        for name in cls.__dict__.get("__annotations__", {}):
            if name in cls.__dict__:
                value = cls.__dict__[name]
                if isinstance(value, dataclasses.Field) and DERIVED_FROM in value.metadata:
                    continue
                raise TypeError(f"{cls.__name__}.{name} has a default in code; its default belongs in {where}")
            setattr(cls, name, dataclasses.field(default_factory=functools.partial(default, name)))
        return cls

    return decorate


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> DictConfig:
    """The full config (``conf/<config_name>.yaml`` + overrides), as Hydra composes it, without a Hydra app.

    Used where Flower, not Hydra, starts the process (``flwr run``: the run config's
    ``overrides`` string carries the same overrides the simulation CLI takes).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except Exception as error:  # Hydra raises several override/config error types
        raise ConfigError(f"cannot compose the configuration with overrides {list(overrides)}: {error}") from error
    return cfg


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, without Hydra's own section (what a run records)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    assert isinstance(resolved, dict)
    return resolved
