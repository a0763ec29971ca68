"""A config as plain data and as YAML: what ``config.yaml`` in a run directory holds."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

YAML_WIDTH = 100


def plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts/lists/scalars, in field order."""
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


class _Dumper(yaml.SafeDumper):
    """Lists of scalars inline (``report_to: [jsonl]``); mappings as indented blocks."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(item, dict | list) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def to_yaml(cfg: Any) -> str:
    """YAML text of the resolved config, keys in field order."""
    return yaml.dump(
        config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=YAML_WIDTH
    )


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config; ``load_config(type(cfg), path)`` returns an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved {type(cfg).__name__}, exactly as run. Reuse with --config.\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)  # atomic: a crash never leaves a half-written config.yaml
    return path


