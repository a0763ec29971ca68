"""What a config class is made of: its settable fields, nested groups, flat-name aliases.

A config is a plain ``@dataclass`` whose fields carry a one-line doc in
``field(metadata={"help": ...})``; a field holding another dataclass is a group of dotted
keys (``lora.r``). A class may accept flat names for keys that live in a group through a
class attribute ``ALIASES: ClassVar[dict[str, str]]`` (``{"max_new_tokens":
"sampling.max_new_tokens"}``), so configs written before the key moved into its group keep
working.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin


class FieldSpec(NamedTuple):
    field: dataclasses.Field[Any]
    type: Any  # the resolved annotation (string annotations are evaluated)


@functools.cache
def config_fields(cls: type) -> dict[str, FieldSpec]:
    """The settable (init) fields of a config class, with resolved annotations."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    try:
        hints = typing.get_type_hints(cls)
    except NameError as err:  # a programming error in the config class, not user input
        raise TypeError(f"cannot resolve the annotations of {cls.__name__}: {err}") from err
    return {f.name: FieldSpec(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def union_arms(tp: Any) -> tuple[list[Any], bool] | None:
    """For ``X | Y | None``: ([X, Y], True). None when ``tp`` is not a union."""
    if get_origin(tp) not in (Union, types.UnionType):
        return None
    args = get_args(tp)
    arms = [arm for arm in args if arm is not type(None)]
    return arms, len(arms) < len(args)


def nested_config(tp: Any) -> type | None:
    """The dataclass a field holds (``Sub`` or ``Sub | None``), or None for a plain value."""
    union = union_arms(tp)
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
class Section:
    """The leaf options of one (possibly nested) config, for grouped help."""

    prefix: str  # "" at top level, else e.g. "lora"
    help: str
    options: list[Option]


def sections(cls: type, default: Any, prefix: str = "", title: str = "") -> list[Section]:
    """Top-level leaves first, then each nested config's section, depth first."""
    leaves: list[Option] = []
    nested: list[Section] = []
    for name, spec in config_fields(cls).items():
        key, value = prefix + name, getattr(default, name)
        help_text = str(spec.field.metadata.get("help", ""))
        sub_cls = nested_config(spec.type)
        if sub_cls is None:
            leaves.append(Option(key, spec.type, value, help_text))
        else:
            if value is None:  # an optional group: say it is off until one of its keys is set
                help_text = f"{help_text} (default: null)".lstrip()
            sub_default = value if value is not None else sub_cls()
            nested.extend(sections(sub_cls, sub_default, key + ".", help_text))
    return [Section(prefix.rstrip("."), title, leaves), *nested]


def flatten_keys(cls: type) -> dict[str, Option]:
    """Every leaf option of ``cls`` by dotted key, in help order (top level, then groups)."""
    return {opt.key: opt for sec in sections(cls, cls()) for opt in sec.options}


def type_name(tp: Any) -> str:
    union = union_arms(tp)
    if union is not None:
        names = [type_name(arm) for arm in union[0]]
        return " | ".join(names + (["null"] if union[1] else []))
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(choice) for choice in get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(arg) for arg in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))




def aliases(cls: type) -> dict[str, str]:
    """Flat name -> dotted key, for the keys of ``cls`` that live in a nested group."""
    return dict(getattr(cls, "ALIASES", {}))
