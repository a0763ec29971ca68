"""``posttrain <command> --help``: every option of a config, grouped and aligned."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import yaml

from posttrain.config.schema import Section, aliases, sections, type_name
from posttrain.config.serialize import plain

HELP_WIDTH = 100


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
        return yaml.safe_dump(plain(value), default_flow_style=True, width=10**6).strip()
    return str(value)


def _doc_summary(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # @dataclass invents "Name(field: type = ...)" when a class has no docstring; skip that.
    if doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _section_rows(sections: list[Section]) -> Iterator[tuple[str, list[list[str]]]]:
    for sec in sections:
        if not sec.options:
            continue
        title = "Options:" if not sec.prefix else f"{sec.prefix}.*: {sec.help}".rstrip(": ")
        rows = [
            [o.key, type_name(o.type), _format_default(o.default), o.help] for o in sec.options
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
    groups = list(_section_rows(sections(cls, cls())))
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
    flat = aliases(cls)
    if flat:
        title = "Flat names also accepted (same option):"
        out += ["", f"[bold]{esc(title)}[/]" if markup else title]
        out += [esc(line) for line in textwrap.wrap(
            ", ".join(f"{a}={k}" for a, k in flat.items()), width - 2,
            initial_indent="  ", subsequent_indent="  ")]
    return "\n".join(out)
