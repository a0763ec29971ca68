"""A pipeline file as data, with the line of every key, and the one-line errors that cite them.

Every key's line is kept under its dotted path (``stages.sft.lora.r``), whether it was written
nested or dotted, so an error found much later (building a stage's config) can still say
``pipeline.yaml:12: stage 'sft', key 'lora.r': ...``. ``key=value`` overrides from the command
line are applied here and cited as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import PosttrainError


@dataclass(frozen=True)
class Where:
    """Where a value was written: a file line, or a command-line override."""

    file: str
    line: int | None = None
    override: str | None = None

    def __str__(self) -> str:
        if self.override is not None:
            return f"{self.file} (override {self.override!r})"
        return f"{self.file}:{self.line}" if self.line else self.file


class PipelineError(PosttrainError):
    """Problems in a pipeline file, one line each; raised before any stage runs."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Problems:
    """Collects every problem of one checking pass, so a user fixes them all in one go."""

    def __init__(self) -> None:
        self.found: dict[str, int] = {}  # problem -> its line in the file (0: none)

    @property
    def lines(self) -> list[str]:
        """In file order, as a reader fixes them; the rounds of a repeated stage share one."""
        return sorted(self.found, key=self.found.__getitem__)

    def add(self, where: Where, message: str, stage: str | None = None,
            key: str | None = None) -> None:
        parts = [f"stage {stage!r}" if stage else "", f"key {key!r}" if key else ""]
        subject = ", ".join(p for p in parts if p)
        line = f"{where}: {subject}: {message}" if subject else f"{where}: {message}"
        self.found.setdefault(line, where.line or 0)

    def check(self) -> None:
        if self.found:
            raise PipelineError(self.lines)


@dataclass
class Source:
    file: str
    data: dict[str, Any]
    lines: dict[str, int] = field(default_factory=dict)  # dotted path -> line
    overrides: dict[str, str] = field(default_factory=dict)  # dotted path -> "key=value"

    def set(self, key: str, value: Any, label: str) -> None:
        """Set a top-level key from the command line (``label`` is how errors cite it)."""
        self.data[key] = value
        self.overrides[key] = label

    def where(self, path: str) -> Where:
        """The nearest written place of ``path``: the key itself, else its closest parent."""
        probe = path
        while probe:
            if probe in self.overrides:
                return Where(self.file, override=self.overrides[probe])
            if probe in self.lines:
                return Where(self.file, self.lines[probe])
            probe = probe.rpartition(".")[0]
        return Where(self.file)


def _key_lines(node: yaml.Node, prefix: str, src: Source, problems: Problems) -> None:
    if isinstance(node, yaml.SequenceNode):  # list items by index: repeat.0.rounds
        for i, item in enumerate(node.value):
            src.lines[f"{prefix}{i}"] = item.start_mark.line + 1
            _key_lines(item, f"{prefix}{i}.", src, problems)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue  # `<<: *anchor` merges are expanded by the constructor; no line to keep
        path = prefix + key_node.value
        line = key_node.start_mark.line + 1
        if path in seen:
            problems.add(Where(src.file, line), f"duplicate key {key_node.value!r} (YAML would "
                                                "keep only the last one)")
        seen.add(path)
        src.lines[path] = line
        _key_lines(value_node, path + ".", src, problems)


def _yaml_problem(file: str, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = Where(file, mark.line + 1 if mark is not None else None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}: invalid YAML: {problem}"


def read_source(source: str | Path | Mapping[str, Any]) -> Source:
    """A pipeline file (or an already-parsed mapping, which has no lines to cite)."""
    if isinstance(source, Mapping):
        return Source("<pipeline>", dict(source))
    path = Path(source)
    if not path.is_file():
        raise PipelineError([f"pipeline file not found: {path}"])
    text = path.read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        raise PipelineError([_yaml_problem(str(path), err)]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        got = "nothing" if data is None else f"a {type(data).__name__}"
        raise PipelineError([f"{path}: a pipeline file is a mapping with output_dir and "
                             f"stages, got {got}"])
    src = Source(str(path), data)
    problems = Problems()
    _key_lines(node, "", src, problems)
    problems.check()
    return src


def _override_value(text: str) -> Any:
    # Read as YAML so `seed=1` is a number and `rewards=[a, b]` a list, as in the file.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _override_target(src: Source, parts: list[str]) -> tuple[dict[str, Any], list[str]] | str:
    """The mapping an override writes into and the key path left inside it, or a problem."""
    head, rest = parts[0], parts[1:]
    if head == "stages":
        stages = src.data.get("stages")
        if len(rest) < 2 or not isinstance(stages, dict) or not isinstance(
                stages.get(rest[0]), dict):
            return "write stages.STAGE.KEY=VALUE for a stage of the file"
        return stages[rest[0]], rest[1:]
    if head in ("defaults", "repeat") and rest:
        target = src.data.setdefault(head, {})
        if not isinstance(target, dict):
            return f"{head} is not a mapping in the file"
        return target, rest
    return src.data, parts


def apply_overrides(src: Source, overrides: list[str]) -> None:
    """Apply ``key=value`` items: top-level keys (``seed=1``), ``defaults.KEY=...``,
    ``stages.STAGE.KEY=...`` and ``repeat.rounds=...``; later items win."""
    problems = Problems()
    for item in overrides:
        key, sep, text = item.partition("=")
        target = _override_target(src, key.strip().split(".")) if sep and key.strip() else (
            "write key=value, e.g. seed=1 or stages.sft.lr=1e-4")
        if isinstance(target, str):
            problems.add(Where("command line"), f"bad override {item!r}: {target}")
            continue
        mapping, keys = target
        # Walk into mappings the file already has, so `stages.sft.lora.r=8` changes one key
        # of a nested `lora:`; what is left is one dotted key, which configs read the same way.
        while len(keys) > 1 and isinstance(mapping.get(keys[0]), dict):
            mapping, keys = mapping[keys[0]], keys[1:]
        mapping[".".join(keys)] = _override_value(text)
        src.overrides[key.strip()] = item
    problems.check()
