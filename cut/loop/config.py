"""Reading a loop tool's YAML: one mapping, unknown keys named, the dataclass built and validated."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from cut.args import Options, opt
from cut.errors import ConfigError

C = TypeVar("C")


def read_config(
    path: str,
    known: Iterable[str],
    what: str = "config",
    shape: str = "a config must be a mapping of option names to values",
) -> dict[str, Any]:
    """The YAML mapping at `path`; a ConfigError names the file and any key not in `known`."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read {what}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {shape}")
    unknown = sorted(map(str, set(data) - set(known)))
    if unknown:
        raise ConfigError(f"{path}: unknown option(s): {', '.join(unknown)}")
    return data


def load_dataclass(cls: type[C], path: str, overrides: dict[str, Any] | None = None) -> C:
    """The config `cls` from the YAML at `path` (keys = its field names), with `overrides` (None
    values ignored) on top, validated."""
    data = read_config(path, (f.name for f in dataclasses.fields(cls)))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = cls(**data)
    cfg.validate()
    return cfg


@dataclasses.dataclass
class LoopArgs(Options):
    """A loop tool's flags: --config names the tool's own YAML (required; the tool reads it with
    its config class), the fields are the flags that override it."""

    CONFIG_HELP: ClassVar[str] = "the online loop's YAML (cut.online)"

    config: str = opt("", "the tool's YAML", cli=False)

    @classmethod
    def from_sources(cls, config: dict[str, Any], flags: dict[str, Any], config_path: str = "") -> LoopArgs:
        if not config_path:
            raise ConfigError("the following arguments are required: --config")
        return cls.from_values({**flags, "config": config_path})
