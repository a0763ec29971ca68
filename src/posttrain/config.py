"""Typed run configs: dataclass defaults, then a YAML file, then ``key=value`` overrides.

A config is a plain ``@dataclass`` whose fields carry a one-line doc in
``field(metadata={"help": ...})``. Nested dataclasses become dotted keys (``lora.r``), and
recipes subclass :class:`TrainConfig` to add their own keys beside the core ones.

    cfg = load_config(SFTConfig, "sft.yaml", ["lr=2e-5", "lora.r=8"])
    save_config(cfg, run_dir / "config.yaml")   # load_config(SFTConfig, that) gives cfg back

Every user mistake (unknown key, bad value, broken YAML) raises :class:`ConfigError` with a
one-line message naming the key and, where it helps, the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

import yaml

from posttrain.errors import ConfigError

__all__ = [
    "LoraConfig",
    "Option",
    "TrainConfig",
    "config_from_dict",
    "config_help",
    "config_to_dict",
    "flatten_keys",
    "load_config",
    "save_config",
    "to_yaml",
    "validate_config",
]

T = TypeVar("T")

NULL_WORDS = frozenset({"null", "none", "~", ""})
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
REPORTERS = ("jsonl", "tensorboard", "wandb")
HELP_WIDTH = 100


# --------------------------------------------------------------------------- core configs


@dataclass
class LoraConfig:
    """Low-rank adapters; ``r: 0`` trains the full model instead."""

    r: int = field(default=0, metadata={"help": "LoRA rank; 0 = LoRA off (full fine-tuning)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (scale = alpha/r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "names of the linear layers that get adapters"},
    )
    merge: bool = field(
        default=False, metadata={"help": "merge adapters into the base weights in final/"}
    )

    def validate(self) -> None:
        _require_at_least(self, "r", 0, prefix="lora.")
        _require_positive(self, "alpha", prefix="lora.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.r > 0 and not self.target_modules:
            raise ConfigError("lora.target_modules is empty but lora.r > 0 asks for LoRA")


@dataclass
class TrainConfig:
    """Options shared by every training command."""

    model: str = field(
        default="tiny",
        metadata={"help": "HF dir, hub id, .gguf file, or 'tiny' for the built-in tiny model"},
    )
    data: str | None = field(default=None, metadata={"help": "training data: file, dir or hub id"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out data for evaluation"})
    output_dir: str = field(
        default="runs/run", metadata={"help": "run dir: config.yaml, metrics, checkpoints, final/"}
    )
    max_steps: int = field(
        default=-1, metadata={"help": "optimizer steps; -1 = derive from epochs"}
    )
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (fractions ok)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="cosine", metadata={"help": "learning-rate decay after warmup"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear LR warmup from 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the global grad norm to this; 0 = no clipping"}
    )
    max_length: int = field(default=1024, metadata={"help": "max tokens per sequence"})
    save_steps: int = field(
        default=0, metadata={"help": "checkpoint every N steps; 0 = only at the end"}
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "checkpoints to keep, oldest pruned first; 0 = keep all"}
    )
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps; 0 = at the end"})
    logging_steps: int = field(default=1, metadata={"help": "log metrics every N steps"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and sampling"})
    precision: Literal["bf16", "fp32"] = field(
        default="bf16", metadata={"help": "bf16 autocast (fp32 master weights) or pure fp32"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations to save memory"}
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the decoder layers' training forward (fuses "
                          "elementwise ops; the first step compiles)"},
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the last checkpoint in output_dir"}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["jsonl"],
        metadata={"help": "metric sinks: any of jsonl, tensorboard, wandb"},
    )
    on_bad_row: Literal["error", "skip"] = field(
        default="error", metadata={"help": "a malformed data row stops the run, or is skipped"}
    )
    max_bad_steps: int = field(
        default=5, metadata={"help": "consecutive non-finite steps before the run aborts"}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow model code from the hub (runs that code!)"}
    )
    lora: LoraConfig = field(
        default_factory=LoraConfig, metadata={"help": "LoRA adapters (lora.r > 0 turns them on)"}
    )

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "logging_steps", "max_bad_steps"):
            _require_at_least(self, name, 1)
        for name in ("warmup_steps", "save_steps", "save_total_limit", "eval_steps"):
            _require_at_least(self, name, 0)
        for name in ("weight_decay", "max_grad_norm"):
            _require_at_least(self, name, 0.0)
        _require_at_least(self, "max_length", 2)
        _require_positive(self, "lr")
        _require_positive(self, "epochs")
        self._validate_steps()
        self._validate_betas()
        self._validate_report_to()

    def _validate_steps(self) -> None:
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError(
                f"max_steps must be -1 (derive from epochs) or >= 1, got {self.max_steps}"
            )
        # A warmup longer than the run never reaches the peak LR: almost surely a typo.
        if self.max_steps > 0 and self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})"
            )

    def _validate_betas(self) -> None:
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")

    def _validate_report_to(self) -> None:
        for name in self.report_to:
            if name not in REPORTERS:
                raise ConfigError(
                    f"report_to: unknown sink {name!r}; choose from {', '.join(REPORTERS)}"
                )


def _require_at_least(cfg: Any, name: str, low: float, prefix: str = "") -> None:
    value = getattr(cfg, name)
    # `not >=` (rather than `<`) also rejects NaN.
    if not (value >= low and math.isfinite(value)):
        raise ConfigError(f"{prefix}{name} must be >= {low}, got {value}")


def _require_positive(cfg: Any, name: str, prefix: str = "") -> None:
    value = getattr(cfg, name)
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{prefix}{name} must be > 0, got {value}")


# --------------------------------------------------------------------------- field introspection


class _FieldSpec(NamedTuple):
    field: dataclasses.Field[Any]
    type: Any  # the resolved annotation (string annotations are evaluated)


@functools.cache
def _config_fields(cls: type) -> dict[str, _FieldSpec]:
    """The settable (init) fields of a config class, with resolved annotations."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    try:
        hints = typing.get_type_hints(cls)
    except NameError as err:  # a programming error in the config class, not user input
        raise TypeError(f"cannot resolve the annotations of {cls.__name__}: {err}") from err
    return {f.name: _FieldSpec(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _union_arms(tp: Any) -> tuple[list[Any], bool] | None:
    """For ``X | Y | None``: ([X, Y], True). None when ``tp`` is not a union."""
    if get_origin(tp) not in (Union, types.UnionType):
        return None
    args = get_args(tp)
    arms = [arm for arm in args if arm is not type(None)]
    return arms, len(arms) < len(args)


def _nested_config(tp: Any) -> type | None:
    """The dataclass a field holds (``Sub`` or ``Sub | None``), or None for a plain value."""
    union = _union_arms(tp)
    if union is not None and len(union[0]) == 1:
        tp = union[0][0]
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


@dataclass(frozen=True)
class Option:
    """One settable leaf option, as listed by ``--help``."""

    key: str  # dotted, e.g. "lora.r"
    type: Any  # resolved annotation
    default: Any
    help: str


@dataclass(frozen=True)
class _Section:
    """The leaf options of one (possibly nested) config, for grouped help."""

    prefix: str  # "" at top level, else e.g. "lora"
    help: str
    options: list[Option]


def _sections(cls: type, default: Any, prefix: str = "", title: str = "") -> list[_Section]:
    """Top-level leaves first, then each nested config's section, depth first."""
    leaves: list[Option] = []
    nested: list[_Section] = []
    for name, spec in _config_fields(cls).items():
        key, value = prefix + name, getattr(default, name)
        help_text = str(spec.field.metadata.get("help", ""))
        sub_cls = _nested_config(spec.type)
        if sub_cls is None:
            leaves.append(Option(key, spec.type, value, help_text))
        else:
            if value is None:  # an optional group: say it is off until one of its keys is set
                help_text = f"{help_text} (default: null)".lstrip()
            sub_default = value if value is not None else sub_cls()
            nested.extend(_sections(sub_cls, sub_default, key + ".", help_text))
    return [_Section(prefix.rstrip("."), title, leaves), *nested]


def flatten_keys(cls: type) -> dict[str, Option]:
    """Every leaf option of ``cls`` by dotted key, in help order (top level, then groups)."""
    return {opt.key: opt for sec in _sections(cls, cls()) for opt in sec.options}


# --------------------------------------------------------------------------- value coercion


class _CliStr(str):
    """A value typed on the command line. There 'none' means null; in a YAML file it is text."""


def _type_name(tp: Any) -> str:
    union = _union_arms(tp)
    if union is not None:
        names = [_type_name(arm) for arm in union[0]]
        return " | ".join(names + (["null"] if union[1] else []))
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(choice) for choice in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _bad_value(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


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
    arms, nullable = _union_arms(tp) or ([tp], False)
    if nullable and _is_null(value, text_allowed=str in arms):
        return None
    if len(arms) == 1:  # let the arm's own, more specific error through
        return _coerce(value, arms[0], key)
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
        example = next(iter(_config_fields(cls)), "name")
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
    spec = _config_fields(cls).get(head)
    if spec is None:
        raise _UnknownKeyError(prefix + key)
    full = prefix + head
    sub_cls = _nested_config(spec.type)
    if sub_cls is None:
        if rest:
            raise _UnknownKeyError(prefix + key)
        group[head] = _coerce(value, spec.type, full)
    elif rest:
        _set(sub_cls, _subgroup(group, head), rest, value, full + ".")
    elif _is_null(value, text_allowed=False):
        nullable = (_union_arms(spec.type) or ([], False))[1]
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
            sub_cls = _nested_config(_config_fields(cls)[name].type)
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
    """Run ``validate()`` on every nested config first, then on ``cfg`` itself."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_config(value)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts/lists/scalars, in field order."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


class _Dumper(yaml.SafeDumper):
    """Lists of scalars inline (``report_to: [jsonl]``); mappings as indented blocks."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(item, dict | list) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def to_yaml(cfg: Any) -> str:
    """YAML text of the resolved config, keys in field order."""
    return yaml.dump(
        config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=HELP_WIDTH
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


# --------------------------------------------------------------------------- help text


def _format_default(value: Any) -> str:
    """The default as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list | tuple):
        return ",".join(_format_default(v) for v in value) if value else "[]"
    if isinstance(value, Mapping):
        return yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6).strip()
    return str(value)


def _doc_summary(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # @dataclass invents "Name(field: type = ...)" when a class has no docstring; skip that.
    if doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _section_rows(sections: list[_Section]) -> Iterator[tuple[str, list[list[str]]]]:
    for sec in sections:
        if not sec.options:
            continue
        title = "Options:" if not sec.prefix else f"{sec.prefix}.*: {sec.help}".rstrip(": ")
        rows = [
            [o.key, _type_name(o.type), _format_default(o.default), o.help] for o in sec.options
        ]
        yield title, rows


def _escaper(markup: bool) -> Callable[[str], str]:
    if not markup:
        return lambda text: text
    from rich.markup import escape  # lazy: plain-text help must not need rich

    return escape


def _render_row(cells: list[str], widths: list[int], width: int, markup: bool) -> list[str]:
    """One option: key, type and default in columns, then the help text, wrapped."""
    esc = _escaper(markup)
    key, type_name, default = (c.ljust(w) + "  " for c, w in zip(cells, widths, strict=False))
    plain_len = 2 + len(key + type_name + default)
    head = f"  {key}{type_name}{default}"
    if markup:  # escaping keeps the rendered width, so the plain padding still lines up
        pad = " " * (len(default) - len(default.rstrip()))
        head = f"  [bold cyan]{esc(key)}[/][dim]{esc(type_name)}{esc(default.rstrip())}[/]{pad}"
    indent = 2 + sum(widths) + 2 * len(widths)
    lines = [esc(line) for line in textwrap.wrap(cells[3], width=max(width - indent, 30))]
    if not lines:
        return [head.rstrip()]
    if plain_len > indent:  # an overlong cell: the help starts on the next line
        return [head.rstrip()] + [" " * indent + line for line in lines]
    return [head + lines[0]] + [" " * indent + line for line in lines[1:]]


def _column_widths(groups: list[tuple[str, list[list[str]]]]) -> list[int]:
    rows = [row for _, group_rows in groups for row in group_rows]
    # Capped, so one long cell (a Literal's choices, a list default) overflows onto its own
    # line instead of pushing every help text to the right.
    caps = (28, 12, 10)
    return [min(max(len(row[i]) for row in rows), cap) for i, cap in enumerate(caps)]


def config_help(cls: type, command: str, markup: bool = False, width: int = HELP_WIDTH) -> str:
    """Usage line plus every option (dotted key, type, default, help), grouped and aligned.

    Plain text by default; ``markup=True`` gives rich markup (brackets escaped, keys styled).
    """
    groups = list(_section_rows(_sections(cls, cls())))
    widths = _column_widths(groups)
    usage = f"usage: posttrain {command} [--config FILE.yaml] [key=value ...]"
    intro = [usage, ""]
    summary = _doc_summary(cls)
    if summary:
        intro += [*textwrap.wrap(summary, width), ""]
    intro += textwrap.wrap(
        "Set options in the YAML file or as key=value (nested: lora.r=8). Later values win: "
        "defaults < --config file < key=value, left to right.",
        width,
    )
    esc = _escaper(markup)
    out = [esc(line) for line in intro]
    for title, rows in groups:
        out += ["", f"[bold]{esc(title)}[/]" if markup else title]
        for row in rows:
            out += _render_row(row, widths, width, markup)
    return "\n".join(out)
