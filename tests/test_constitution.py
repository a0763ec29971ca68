"""Constitution files: the shipped ones load; every error names file, line and field."""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from posttrain.cai import ConstitutionError, load_constitution

GOOD = """\
name: mine
principles:
  - name: harm
    critique: Point out harm.
    revision: Remove the harm.
    categories: [safety]
    weight: 3
  - name: help
    critique: Point out needless refusals.
    revision: Help directly.
    judge: Which answer helps more?
    rubric: Does the answer help?
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "constitution.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", ["hhh", "demo"])
def test_shipped_constitutions_load(name: str) -> None:
    c = load_constitution(name)
    assert c.principles and all(p.critique and p.revision and p.judge and p.rubric
                                for p in c.principles)


def test_fields_weights_and_categories(tmp_path: Path) -> None:
    c = load_constitution(write(tmp_path, GOOD))
    assert c.name == "mine" and c["help"].judge == "Which answer helps more?"
    assert c["harm"].judge.startswith("Which answer better follows")  # derived from revision
    assert c["help"].rubric == "Does the answer help?"
    assert c["harm"].rubric == "Does the answer follow this request: Remove the harm."
    rng = random.Random(0)
    draws = Counter(c.sample(rng, "safety").name for _ in range(4000))
    assert draws["harm"] / 4000 == pytest.approx(0.75, abs=0.03)  # weights 3 : 1
    assert {c.sample(rng, "arithmetic").name for _ in range(50)} == {"help"}  # harm: safety only


BAD = {
    "unknown field": ("    critque: Typo.\n", "critique: Point out harm.\n", 4,
                      "principles[0].critque: unknown field"),
    "missing revision": ("", "revision: Remove the harm.\n", 3,
                         "principles[0].revision: required"),
    "weight <= 0": ("    weight: 0\n", "weight: 3\n", 7, "principles[0].weight: must be > 0"),
    "weight not a number": ("    weight: lots\n", "weight: 3\n", 7,
                            "principles[0].weight: needs a number"),
    "empty critique": ("    critique: ''\n", "critique: Point out harm.\n", 4,
                       "principles[0].critique: needs a non-empty string"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_errors_name_file_line_and_field(tmp_path: Path, case: str) -> None:
    new, old, line, message = BAD[case]
    path = write(tmp_path, GOOD.replace("    " + old, new, 1))
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    assert str(err.value).startswith(f"{path}:{line}: {message}"), str(err.value)


def test_duplicate_names_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConstitutionError, match=r":8: name: principle 'harm' is defined twice"):
        load_constitution(write(tmp_path, GOOD.replace("name: help", "name: harm")))
    with pytest.raises(ConstitutionError, match=r"constitution.yaml:\d+: not valid YAML"):
        load_constitution(write(tmp_path, "principles: [\n"))
    with pytest.raises(ConstitutionError, match="constitution not found: nope.yaml"):
        load_constitution("nope.yaml")
