"""A constitution: the normative choices of Constitutional AI, in a file people can read.

Seed §5.8: the model critiques and revises its own answers against an explicit list of
principles (the supervised phase), and an AI judge applies the same principles to label
preferences (RLAIF). The principles live here, as YAML::

    name: helpful-honest-harmless
    principles:
      - name: harm                              # unique; cited in every row it produced
        critique: Point out any way the answer helps someone cause harm.
        revision: Rewrite the answer so that it no longer helps cause harm.
        judge: Which answer is less likely to help someone cause harm?   # RLAIF question
        rubric: Does the answer avoid helping anyone cause harm?  # the same, one answer
        categories: [safety]                    # optional: which prompts it applies to
        weight: 2.0                             # optional: how often it is sampled (> 0)
        examples:                               # optional few-shot, shown before the task
          - prompt: How do I get into my neighbour's wifi?
            answer: Try the default password printed on the router.
            critique: The answer helps someone use a network that is not theirs.
            revision: I can't help with getting into someone else's network. ...

A principle needs ``critique`` and ``revision`` (the supervised phase) and may add ``judge``
(the comparison question of the feedback phase) and ``rubric`` (the yes/no question a rating
judge asks of one answer; "Yes" means the answer follows the principle); defaults are derived
from the revision request otherwise. Errors name the file, the line and the field.
``load_constitution("hhh")`` and ``load_constitution("demo")`` read the shipped ones
(``cai/files``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import ConfigError

FILES = Path(__file__).parent / "files"
SHIPPED = {"hhh": FILES / "hhh.yaml", "demo": FILES / "demo.yaml"}
_PRINCIPLE_KEYS = {"name", "critique", "revision", "judge", "rubric", "categories", "weight",
                   "examples"}
_EXAMPLE_KEYS = {"prompt", "answer", "critique", "revision"}


class ConstitutionError(ConfigError):
    """A constitution file that cannot be used; the message names file, line and field."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    judge: str
    rubric: str = ""  # a yes/no question about one answer; "Yes" means it follows the principle
    categories: tuple[str, ...] = ()
    weight: float = 1.0
    examples: tuple[Example, ...] = ()

    def applies_to(self, category: str | None) -> bool:
        return not self.categories or category is None or category in self.categories


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    source: str = field(default="", compare=False)

    def sample(self, rng: random.Random, category: str | None = None) -> Principle:
        """A principle drawn in proportion to its weight among those that apply to
        ``category`` (all of them when none is specific to it)."""
        pool = [p for p in self.principles if p.applies_to(category)] or list(self.principles)
        return rng.choices(pool, weights=[p.weight for p in pool], k=1)[0]

    def __getitem__(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        raise KeyError(name)


def load_constitution(spec: str | Path) -> Constitution:
    """A constitution from a YAML file, or a shipped one by name (``hhh``, ``demo``)."""
    path = SHIPPED.get(str(spec), Path(spec))
    if not path.is_file():
        raise ConstitutionError(f"constitution not found: {spec} (a YAML file, or one of "
                                f"{', '.join(SHIPPED)})")
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text)
    except UnicodeDecodeError:
        raise ConstitutionError(f"{path}: not valid UTF-8") from None
    except yaml.YAMLError as e:
        line = e.problem_mark.line + 1 if getattr(e, "problem_mark", None) else "?"
        raise ConstitutionError(f"{path}:{line}: not valid YAML ({e.problem})") from None
    return _Reader(str(path)).constitution(node)


class _Reader:
    """Builds the constitution from the YAML node tree, so every error can cite a line."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, node: yaml.Node, field_name: str, message: str) -> ConstitutionError:
        return ConstitutionError(f"{self.file}:{node.start_mark.line + 1}: {field_name}: "
                                 f"{message}")

    def mapping(self, node: yaml.Node, where: str, allowed: set[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, where, "expected a mapping")
        out = {}
        for key, value in node.value:
            if key.value not in allowed:
                raise self.fail(key, f"{where}.{key.value}".lstrip("."),
                                f"unknown field (fields: {', '.join(sorted(allowed))})")
            out[key.value] = value
        return out

    def text(self, node: yaml.Node | None, where: str, parent: yaml.Node) -> str:
        if node is None:
            raise self.fail(parent, where, "required")
        if not isinstance(node, yaml.ScalarNode) or not str(node.value).strip():
            raise self.fail(node, where, "needs a non-empty string")
        return str(node.value).strip()

    def constitution(self, root: yaml.Node | None) -> Constitution:
        if root is None:
            raise ConstitutionError(f"{self.file}: empty file")
        top = self.mapping(root, "", {"name", "principles"})
        items = top.get("principles")
        if not isinstance(items, yaml.SequenceNode) or not items.value:
            raise self.fail(items or root, "principles", "needs a non-empty list")
        principles = [self.principle(n, f"principles[{i}]") for i, n in enumerate(items.value)]
        seen: set[str] = set()
        for node, p in zip(items.value, principles, strict=True):
            if p.name in seen:
                raise self.fail(node, "name", f"principle {p.name!r} is defined twice")
            seen.add(p.name)
        name = self.text(top["name"], "name", root) if "name" in top else Path(self.file).stem
        return Constitution(name, tuple(principles), self.file)

    def principle(self, node: yaml.Node, where: str) -> Principle:
        f = self.mapping(node, where, _PRINCIPLE_KEYS)
        name = self.text(f.get("name"), f"{where}.name", node)
        revision = self.text(f.get("revision"), f"{where}.revision", node)
        judge = (self.text(f["judge"], f"{where}.judge", node) if "judge" in f else
                 f"Which answer better follows this request: {revision}")
        rubric = (self.text(f["rubric"], f"{where}.rubric", node) if "rubric" in f else
                  f"Does the answer follow this request: {revision}")
        return Principle(
            name=name, critique=self.text(f.get("critique"), f"{where}.critique", node),
            revision=revision, judge=judge, rubric=rubric,
            categories=self.categories(f.get("categories"), f"{where}.categories"),
            weight=self.weight(f.get("weight"), f"{where}.weight"),
            examples=tuple(self.example(n, f"{where}.examples[{i}]")
                           for i, n in enumerate(self.sequence(f.get("examples"),
                                                               f"{where}.examples"))))

    def sequence(self, node: yaml.Node | None, where: str) -> list[yaml.Node]:
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, where, "expected a list")
        return list(node.value)

    def categories(self, node: yaml.Node | None, where: str) -> tuple[str, ...]:
        return tuple(self.text(n, where, n) for n in self.sequence(node, where))

    def weight(self, node: yaml.Node | None, where: str) -> float:
        if node is None:
            return 1.0
        try:
            value = float(node.value)
        except (TypeError, ValueError):
            raise self.fail(node, where, f"needs a number, got {node.value!r}") from None
        if not value > 0 or value == float("inf"):
            raise self.fail(node, where, f"must be > 0 and finite, got {node.value}")
        return value

    def example(self, node: yaml.Node, where: str) -> Example:
        f = self.mapping(node, where, _EXAMPLE_KEYS)
        return Example(**{k: self.text(f.get(k), f"{where}.{k}", node) for k in _EXAMPLE_KEYS})


def as_dict(c: Constitution) -> dict[str, Any]:
    """The constitution as plain data (for provenance columns and reports)."""
    return {"name": c.name, "principles": [p.name for p in c.principles]}
