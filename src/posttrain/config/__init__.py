"""Typed run configs: dataclass defaults, then a YAML file, then ``key=value`` overrides.

Each component owns its config dataclass (``train/config.py: TrainConfig``,
``models/lora.py: LoraConfig``, ``rollout/config.py: SamplingConfig``, ...); this package
only reads, writes and documents them, for the CLI and pipelines:

    cfg = load_config(SFTConfig, "sft.yaml", ["lr=2e-5", "lora.r=8"])
    save_config(cfg, run_dir / "config.yaml")   # load_config(SFTConfig, that) gives cfg back
    print(config_help(SFTConfig, "sft"))

``schema`` (fields, groups, aliases), ``loader`` (YAML and overrides), ``serialize`` (dicts
and YAML out), ``help`` (``--help``) and ``checks`` (range checks for ``validate()``).
Names are imported on first use, so a component importing ``config.checks`` does not load
the YAML loader.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_config": "loader", "config_from_dict": "loader", "validate_config": "loader",
    "config_to_dict": "serialize", "to_yaml": "serialize", "save_config": "serialize",
    "config_help": "help", "flatten_keys": "schema", "Option": "schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'posttrain.config' has no attribute {name!r}")
    return getattr(importlib.import_module(f"posttrain.config.{module}"), name)
