"""Build a config from its defaults, then a YAML file, then ``key=value`` overrides.

    cfg = load_config(SFTConfig, "sft.yaml", ["lr=2e-5", "lora.r=8"])

Every user mistake (unknown key, bad value, broken YAML) raises :class:`ConfigError` with a
one-line message naming the key and, where it helps, the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from posttrain.config.checks import check_ranges, check_unused
from posttrain.config.schema import (
    aliases,
    config_fields,
    flatten_keys,
    nested_config,
    type_name,
    union_arms,
)
from posttrain.config.serialize import config_to_dict
from posttrain.errors import ConfigError

T = TypeVar("T")

NULL_WORDS = frozenset({"null", "none", "~", ""})
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


class _CliStr(str):
    """A value typed on the command line. There 'none' means null; in a YAML file it is text."""


def _bad_value(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {type_name(tp)}, got {value!r}")


def _parse_yaml_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"config key {key!r}: cannot parse {text!r} as a YAML value") from None


def _is_null(value: Any, text_allowed: bool) -> bool:
    if value is None:
        return True
    # For `str | None` only the command line maps 'none' to null, so a saved config whose
    # value is the text 'none' loads back unchanged.
    if isinstance(value, str) and (isinstance(value, _CliStr) or not text_allowed):
        return value.strip().lower() in NULL_WORDS
    return False


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            number = _float_or_none(text)  # "1e3" is an integer written in float notation
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise _bad_value(key, int, value)


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    # YAML 1.1 reads "1e-4" (no dot) as a string, so strings must be parsed here.
    number = _float_or_none(value.strip()) if isinstance(value, str) else None
    if number is None:
        raise _bad_value(key, float, value)
    return number


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise _bad_value(key, bool, value)


def _to_str(value: Any, key: str) -> str:
    # Numbers are accepted so `output_dir: 2024` works; booleans are not, since an unquoted
    # `yes` in YAML was far more likely meant as a flag than as text.
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise _bad_value(key, str, value)


def _to_path(value: Any, key: str) -> Path:
    return Path(_to_str(value, key))


_SCALARS: dict[Any, Any] = {
    int: _to_int,
    float: _to_float,
    bool: _to_bool,
    str: _to_str,
    Path: _to_path,
}


def _to_literal(value: Any, tp: Any, key: str) -> Any:
    choices = get_args(tp)
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
    if isinstance(value, str):
        text = value.strip().lower()
        for choice in choices:
            if str(choice).lower() == text:
                return choice
    allowed = ", ".join(repr(choice) for choice in choices)
    raise ConfigError(f"config key {key!r}: expected one of {allowed}, got {value!r}")


def _to_list(value: Any, tp: Any, key: str) -> list[Any]:
    item_tp = (get_args(tp) or (Any,))[0]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _parse_yaml_value(text, key)
        else:  # "a,b,c"; type(value) keeps the command-line marker on each item
            value = [type(value)(part.strip()) for part in text.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise _bad_value(key, tp, value)
    return [_coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value)]


def _to_dict(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    key_tp, value_tp = get_args(tp) or (str, Any)
    if isinstance(value, str):
        value = _parse_yaml_value(value, key) if value.strip() else {}
    if not isinstance(value, Mapping):
        raise _bad_value(key, tp, value)
    return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}


def _to_union(value: Any, tp: Any, key: str) -> Any:
    arms, nullable = union_arms(tp) or ([tp], False)
    if nullable and _is_null(value, text_allowed=str in arms):
        return None
    if len(arms) == 1:  # let the arm's own, more specific error through
        return _coerce(value, arms[0], key)
    lists = [arm for arm in arms if arm is list or get_origin(arm) is list]
    if lists and isinstance(value, _CliStr) and value.lstrip().startswith("["):
        # `data=[a.jsonl, b.jsonl]` is a YAML list wherever the option takes one, though the
        # text would pass as a string too; a YAML mistake in it is reported as such.
        return _coerce(value, lists[0], key)
    for arm in arms:
        try:
            return _coerce(value, arm, key)
        except ConfigError:
            continue
    raise _bad_value(key, tp, value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the annotated type, or raise ConfigError."""
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _to_union(value, tp, key)
    if origin is Literal:
        return _to_literal(value, tp, key)
    if tp is list or origin is list:
        return _to_list(value, tp, key)
    if tp is dict or origin is dict:
        return _to_dict(value, tp, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is Any:
        return _parse_yaml_value(value, key) if isinstance(value, _CliStr) else value
    raise TypeError(f"config key {key!r}: unsupported annotation {tp!r}")


# --------------------------------------------------------------------------- merging values


class _Group(dict[str, Any]):
    """Pending values for a nested config (as opposed to the value of a dict-typed option)."""


class _UnknownKeyError(Exception):
    """Raised deep in the merge; turned into a ConfigError that knows the root config."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _as_mapping(value: Any, cls: type, key: str) -> Mapping[Any, Any]:
    if isinstance(value, cls):
        return config_to_dict(value)
    if isinstance(value, str):
        value = _parse_yaml_value(value, key)
    if not isinstance(value, Mapping):
        example = next(iter(config_fields(cls)), "name")
        raise ConfigError(
            f"config key {key!r}: expected a mapping of {cls.__name__} options "
            f"(or dotted keys like {key}.{example}=...), got {value!r}"
        )
    return value


def _subgroup(group: _Group, name: str) -> _Group:
    existing = group.get(name)
    if not isinstance(existing, _Group):  # unset, or set to null earlier: start from defaults
        existing = group[name] = _Group()
    return existing


def _set(cls: type, group: _Group, key: str, value: Any, prefix: str = "") -> None:
    """Record one (possibly dotted) key; a mapping for a nested config merges into it."""
    head, _, rest = key.partition(".")
    spec = config_fields(cls).get(head)
    if spec is None:
        alias = aliases(cls).get(head)
        if alias is None:
            raise _UnknownKeyError(prefix + key)
        _set(cls, group, alias + (f".{rest}" if rest else ""), value, prefix)
        return
    full = prefix + head
    sub_cls = nested_config(spec.type)
    if sub_cls is None:
        if rest:
            raise _UnknownKeyError(prefix + key)
        group[head] = _coerce(value, spec.type, full)
    elif rest:
        _set(sub_cls, _subgroup(group, head), rest, value, full + ".")
    elif _is_null(value, text_allowed=False):
        nullable = (union_arms(spec.type) or ([], False))[1]
        # A bare `lora:` in YAML (all sub-keys commented out) means "defaults", not an error.
        group[head] = None if nullable else _subgroup(group, head)
    else:
        _set_mapping(sub_cls, _subgroup(group, head), _as_mapping(value, sub_cls, full), full + ".")


def _set_mapping(cls: type, group: _Group, data: Mapping[Any, Any], prefix: str = "") -> None:
    for key, value in data.items():
        _set(cls, group, str(key), value, prefix)


def _instantiate(cls: type[T], group: _Group, base: T | None = None) -> T:
    """Apply the recorded values on top of ``base`` (default: ``cls()``), recursively."""
    base = cls() if base is None else base
    changes: dict[str, Any] = {}
    for name, value in group.items():
        if isinstance(value, _Group):
            sub_cls = nested_config(config_fields(cls)[name].type)
            assert sub_cls is not None  # only nested-config fields get a _Group
            value = _instantiate(sub_cls, value, getattr(base, name))
        changes[name] = value
    # replace() re-runs __init__, so __post_init__ sees the final values.
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]


def _build(cls: type[T], value: Any, key: str) -> T:
    group = _Group()
    _set_mapping(cls, group, _as_mapping(value, cls, key), key + ".")
    return _instantiate(cls, group)


def _unknown_key_message(cls: type, key: str) -> str:
    options = flatten_keys(cls)
    valid = list(options) + sorted({k.rpartition(".")[0] for k in options if "." in k})
    valid += list(aliases(cls))
    # `r=8` most likely meant the nested `lora.r`, which plain string similarity misses.
    close = [k for k in valid if k.endswith("." + key)]
    close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r} for {cls.__name__}{hint}"


def _apply(cls: type, group: _Group, data: Mapping[Any, Any]) -> None:
    try:
        _set_mapping(cls, group, data)
    except _UnknownKeyError as err:
        raise ConfigError(_unknown_key_message(cls, err.key)) from None


# --------------------------------------------------------------------------- public API


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}: set options as key=value, e.g. lr=2e-5 lora.r=8")
    return key.strip(), value


def _read_yaml(path: Path) -> Mapping[Any, Any]:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_error_message(path, err)) from None
    if data is None:  # an empty file (or only comments) sets nothing
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {path} must be a mapping of key: value, got a {type(data).__name__}"
        )
    return data


def _yaml_error_message(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"invalid YAML in {path}{where}: {problem}"


def load_config(
    cls: type[T],
    config_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build ``cls`` from its defaults, then ``config_file``, then ``key=value`` overrides.

    Later sources win; overrides apply left to right. The result is validated.
    """
    group = _Group()
    if config_file is not None:
        path = Path(config_file)
        data = _read_yaml(path)  # its errors name the file already
        try:
            _apply(cls, group, data)
        except ConfigError as err:
            raise ConfigError(f"{err} (in {path})") from None
    for item in overrides:
        key, value = _split_override(item)
        _apply(cls, group, {key: _CliStr(value)})
    cfg = _instantiate(cls, group)
    validate_config(cfg)
    return cfg


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build and validate ``cls`` from a (nested or dotted) mapping, as if read from YAML."""
    group = _Group()
    _apply(cls, group, data)
    cfg = _instantiate(cls, group)
    validate_config(cfg)
    return cfg


def validate_config(cfg: Any) -> None:
    """Check every config in ``cfg``, nested groups first: its declared ``RANGES`` and its
    own ``validate()``; then, all values valid, the ``ONLY_WITH`` of each (``config/checks.py``:
    an option given where it has no effect is the mildest mistake, so it is reported last)."""
    groups = list(_groups(cfg, type(cfg)(), ""))
    for sub, _, prefix in groups:
        check_ranges(sub, prefix)
        check = getattr(sub, "validate", None)
        if callable(check):
            check()
    for sub, default, prefix in groups:
        check_unused(sub, default, prefix)


def _groups(cfg: Any, default: Any, prefix: str) -> Iterator[tuple[Any, Any, str]]:
    """(config, its defaults, dotted prefix) for every config in ``cfg``, nested first.

    A group's defaults are its parent's default value for it, so the group defaults a class
    sets itself (``PPOConfig``'s ``sampling``) count as defaults."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            sub_default = getattr(default, f.name, None)
            if type(sub_default) is not type(value):  # an optional group, null by default
                sub_default = type(value)()
            yield from _groups(value, sub_default, f"{prefix}{f.name}.")
    yield cfg, default, prefix
