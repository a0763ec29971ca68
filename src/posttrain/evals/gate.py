"""``posttrain gate``: the release gate. A model's eval results pass or fail written thresholds.

A thresholds file (YAML) is one key, ``thresholds``, a list of ``METRIC OP LIMIT`` strings:

    thresholds:
      - refusal_rate >= 0.9
      - over_refusal_rate <= 0.1
      - refusal_rate.low >= 0.8          # the lower end of the metric's interval
      - accuracy >= baseline - 0.02      # needs --baseline: another model's eval.json

METRIC names a number under ``metrics`` of an ``eval.json`` (written by ``posttrain eval``);
dots descend into nested mappings (``safety.refusal_rate``). A metric is a plain number or an
interval ``{"value", "low", "high", "n", ...}`` (``evals.stats.Interval``); an interval is
compared by its ``value`` unless the name ends in ``.low`` or ``.high``. OP is one of >=, <=,
>, <. LIMIT is a number, or ``baseline``, ``baseline + x`` or ``baseline - x``: the same
metric in the baseline results, shifted by x.

The gate prints every threshold (PASS/FAIL, the measured value with its interval, the limit)
and fails when any threshold fails. A file that cannot be read, an unknown key or metric, a
bad operator or limit is a ``GateError``: a one-line message naming the file and the key.
"""

from __future__ import annotations

import argparse
import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import PosttrainError

EVAL_FILE = "eval.json"  # = evals.run.EVAL_FILE (not imported: run.py pulls in the models)
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}
BOUNDS = ("low", "high")
_SYNTAX = "write 'METRIC OP LIMIT', e.g. 'refusal_rate >= 0.9' or 'accuracy >= baseline - 0.02'"
_THRESHOLD = re.compile(r"^\s*(?P<metric>[^\s<>=!]+)\s*(?P<op>[<>=!]+)\s*(?P<limit>.*?)\s*$")
_BASELINE = re.compile(r"^baseline(?:\s*(?P<sign>[+-])\s*(?P<x>\S+))?$")


class GateError(PosttrainError):
    """A thresholds or results file the gate cannot use; the message names file and key."""


@dataclass(frozen=True)
class Threshold:
    """``metric op limit`` as written at ``where`` (``file: thresholds[i]``). With
    ``relative`` the limit is the baseline's value of the metric plus ``offset``."""

    metric: str
    op: str
    offset: float
    relative: bool
    text: str
    where: str


@dataclass(frozen=True)
class Measured:
    """A metric as found in the results: its value and, for an interval, its bounds."""

    value: float
    low: float | None = None
    high: float | None = None
    n: int | None = None
    method: str | None = None


@dataclass(frozen=True)
class Check:
    """One threshold applied: ``compared`` (the value, or the bound the metric names) op
    ``limit``; ``bound`` says which number ``compared`` is (value, low or high);
    ``baseline`` is the baseline's number when the limit is relative."""

    threshold: Threshold
    measured: Measured
    compared: float
    bound: str
    limit: float
    baseline: float | None
    passed: bool


@dataclass(frozen=True)
class GateVerdict:
    """Every threshold's check, in file order; the gate passes when all of them pass."""

    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [
            {"threshold": c.threshold.text, "passed": c.passed, "compared": c.compared,
             "bound": c.bound, "limit": c.limit, "baseline": c.baseline,
             "measured": asdict(c.measured)}
            for c in self.checks]}


# --------------------------------------------------------------------------- thresholds


def parse_threshold(text: Any, where: str) -> Threshold:
    """One ``METRIC OP LIMIT`` string (see the module docstring)."""
    if not isinstance(text, str):
        raise GateError(f"{where}: expected a string, got {type(text).__name__} "
                        f"{text!r}; {_SYNTAX}")
    m = _THRESHOLD.match(text)
    if not m or not m["limit"]:
        raise GateError(f"{where}: cannot read {text!r}; {_SYNTAX}")
    if m["op"] not in OPS:
        raise GateError(f"{where}: bad operator {m['op']!r} in {text!r}; use one of "
                        f"{', '.join(OPS)}")
    offset, relative = _parse_limit(m["limit"], text, where)
    return Threshold(m["metric"], m["op"], offset, relative, " ".join(text.split()), where)


def _parse_limit(limit: str, text: str, where: str) -> tuple[float, bool]:
    """(number, False) for a number; (offset, True) for ``baseline [+-] offset``."""
    b = _BASELINE.match(limit)
    try:
        if b is None:
            return float(limit), False
        offset = float(b["x"]) if b["x"] else 0.0
        return (-offset if b["sign"] == "-" else offset), True
    except ValueError:
        raise GateError(f"{where}: bad limit {limit!r} in {text!r}; a number, 'baseline', "
                        f"or 'baseline +/- a number'") from None


def parse_thresholds(items: Any, source: str = "thresholds") -> list[Threshold]:
    """A list of threshold strings (from a file, or inline in a pipeline stage)."""
    if not isinstance(items, list) or not items:
        raise GateError(f"{source}: thresholds must be a non-empty list of strings; "
                        f"{_SYNTAX}")
    return [parse_threshold(t, f"{source}[{i}]") for i, t in enumerate(items)]


def load_thresholds(path: str | Path) -> list[Threshold]:
    """The thresholds of a YAML file whose only key is ``thresholds``."""
    path = Path(path)
    data = _read(path, "thresholds", yaml.safe_load)
    if not isinstance(data, Mapping):
        raise GateError(f"{path}: expected a mapping with the key 'thresholds', got "
                        f"{type(data).__name__}")
    unknown = [k for k in data if k != "thresholds"]
    if unknown:
        raise GateError(f"{path}: unknown key {unknown[0]!r} (the only key is 'thresholds')")
    if "thresholds" not in data:
        raise GateError(f"{path}: missing key 'thresholds'")
    return parse_thresholds(data["thresholds"], f"{path}: thresholds")


def _read(path: Path, what: str, parse: Callable[[str], Any]) -> Any:
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "not found"
        raise GateError(f"{what} file {state}: {path}")
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GateError(f"{path}: cannot read {what}: {first}") from None


# --------------------------------------------------------------------------- results


def load_results(path: str | Path) -> dict[str, Any]:
    """An ``eval.json`` (a run directory means its ``eval.json``), checked to hold a
    ``metrics`` mapping."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_FILE
    data = _read(path, "results", json.loads)
    if not isinstance(data, Mapping) or not isinstance(data.get("metrics"), Mapping):
        raise GateError(f"{path}: no 'metrics' mapping; expected an {EVAL_FILE} written by "
                        "posttrain eval")
    return dict(data)


def _metrics(results: Mapping[str, Any]) -> Mapping[str, Any]:
    # a whole eval.json, or its metrics mapping alone (a pipeline stage may pass either)
    inner = results.get("metrics")
    return inner if isinstance(inner, Mapping) else results


_MISSING = object()


def _lookup(tree: Mapping[str, Any], name: str) -> Any:
    """``tree[name]``, else descend at a dot: ``a.b.c`` is ``tree["a"]["b.c"]`` or
    ``tree["a.b"]["c"]``... (flat keys may hold dots or slashes, e.g. ``dpo/margin``)."""
    if name in tree:
        return tree[name]
    for i, ch in enumerate(name):
        if ch == "." and isinstance(tree.get(name[:i]), Mapping):
            found = _lookup(tree[name[:i]], name[i + 1:])
            if found is not _MISSING:
                return found
    return _MISSING


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def measure(results: Mapping[str, Any], name: str,
            where: str) -> tuple[Measured, float, str]:
    """The metric ``name`` in ``results``, the number to compare, and which one it is:
    ``value``, or the bound named by a ``.low``/``.high`` suffix on an interval. ``where``
    names the source in errors."""
    tree = _metrics(results)
    head, _, bound = name.rpartition(".")
    if head and bound in BOUNDS:
        parent = _lookup(tree, head)
        if _is_number(parent):
            raise GateError(f"{where}: metric {head!r} is a plain number, it has no "
                            f"{bound!r} bound")
        got = _as_measured(parent)
        if got is not None:
            value = getattr(got, bound)
            if value is None:
                raise GateError(f"{where}: metric {head!r} has no {bound!r} bound")
            return got, value, bound
    node = _lookup(tree, name)
    got = _as_measured(node)
    if got is None:
        have = ", ".join(sorted(str(k) for k in tree)) or "no metrics"
        what = "unknown metric" if node is _MISSING else "not a number or an interval:"
        raise GateError(f"{where}: {what} {name!r} (it has: {have})")
    return got, got.value, "value"


def _as_measured(node: Any) -> Measured | None:
    if _is_number(node):
        return Measured(float(node))
    if not isinstance(node, Mapping) or not _is_number(node.get("value")):
        return None
    num = lambda k: float(node[k]) if _is_number(node.get(k)) else None  # noqa: E731
    n = node.get("n")
    return Measured(float(node["value"]), num("low"), num("high"),
                    int(n) if _is_number(n) else None, node.get("method"))


# --------------------------------------------------------------------------- the gate


def check_gate(results: Mapping[str, Any], thresholds: Sequence[Threshold | str] | str | Path,
               baseline: Mapping[str, Any] | None = None, *, results_name: str = "results",
               baseline_name: str = "baseline") -> GateVerdict:
    """Apply ``thresholds`` (parsed, strings, or a YAML file's path) to ``results`` (an
    ``eval.json`` mapping or its ``metrics``); ``baseline`` is another model's results, for
    relative limits. ``*_name`` name the sources in error messages (their file paths)."""
    if isinstance(thresholds, str | Path):
        thresholds = load_thresholds(thresholds)
    parsed = [t if isinstance(t, Threshold) else parse_threshold(t, f"thresholds[{i}]")
              for i, t in enumerate(thresholds)]
    if not parsed:
        raise GateError("the gate has no thresholds: a gate that checks nothing passes "
                        "every model")
    return GateVerdict([_check(t, results, baseline, results_name, baseline_name)
                        for t in parsed])


def _check(t: Threshold, results: Mapping[str, Any], baseline: Mapping[str, Any] | None,
           results_name: str, baseline_name: str) -> Check:
    measured, compared, bound = measure(results, t.metric, f"{t.where} {t.text!r}: {results_name}")
    base = None
    if t.relative:
        if baseline is None:
            raise GateError(f"{t.where}: {t.text!r} compares with a baseline; pass "
                            "--baseline EVAL_JSON")
        _, base, _ = measure(baseline, t.metric, f"{t.where} {t.text!r}: {baseline_name}")
    limit = base + t.offset if base is not None else t.offset
    # NaN compares False with everything: a NaN metric fails its threshold
    return Check(t, measured, compared, bound, limit, base, OPS[t.op](compared, limit))


# --------------------------------------------------------------------------- output


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.3g}"


def _measured_text(c: Check) -> str:
    m = c.measured
    text = _fmt(m.value)
    if m.low is not None and m.high is not None:
        text += f" [{_fmt(m.low)}, {_fmt(m.high)}]"
    if m.n is not None:
        text += f" n={m.n}"
    if m.method:
        text += f" {m.method}"
    return text if c.bound == "value" else f"{c.bound} {_fmt(c.compared)} of {text}"


def _limit_text(c: Check) -> str:
    text = f"{c.threshold.op} {_fmt(c.limit)}"
    if c.baseline is not None:
        sign = "-" if c.threshold.offset < 0 else "+"
        shift = f" {sign} {_fmt(abs(c.threshold.offset))}" if c.threshold.offset else ""
        text += f" (baseline {_fmt(c.baseline)}{shift})"
    return text


def format_verdict(verdict: GateVerdict) -> list[str]:
    """One aligned line per threshold, then the verdict (naming each failed threshold)."""
    rows = [("PASS" if c.passed else "FAIL", c.threshold.text, _measured_text(c),
             _limit_text(c)) for c in verdict.checks]
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = [f"{s}  {t:<{w1}}  measured {m:<{w2}}  limit {lim}" for s, t, m, lim in rows]
    if verdict.passed:
        lines.append(f"gate PASSED: all {len(rows)} thresholds hold")
    else:
        failed = "; ".join(f"{c.threshold.metric} = {_fmt(c.compared)} (limit "
                           f"{c.threshold.op} {_fmt(c.limit)})" for c in verdict.failed)
        lines.append(f"gate FAILED: {len(verdict.failed)} of {len(rows)} thresholds: "
                     f"{failed}")
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain gate",
        description="release gate: check an eval.json against thresholds; exit 1 when any "
                    "threshold fails")
    p.add_argument("results", help="eval.json written by posttrain eval (or its run dir)")
    p.add_argument("--thresholds", required=True, help="YAML file: thresholds: [METRIC OP "
                   "LIMIT, ...]")
    p.add_argument("--baseline", help="another model's eval.json, for 'baseline' limits")
    p.add_argument("--json", dest="json_out", help="also write the verdict to this file")
    return p


def gate_main(argv: list[str]) -> int:
    """``posttrain gate RESULTS --thresholds FILE [--baseline EVAL] [--json OUT]``: print
    every threshold's check; 0 when all pass, 1 when any fails. Bad files raise
    ``GateError`` (the CLI prints its one line and exits 2)."""
    a = _parser().parse_args(argv)
    thresholds = load_thresholds(a.thresholds)
    results = load_results(a.results)
    baseline = load_results(a.baseline) if a.baseline else None
    verdict = check_gate(results, thresholds, baseline, results_name=a.results,
                         baseline_name=a.baseline or "baseline")
    print(f"gate: {a.results} against {a.thresholds}"
          + (f" (baseline {a.baseline})" if a.baseline else ""))
    print("\n".join(format_verdict(verdict)))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(verdict.to_dict(), indent=2) + "\n")
    return 0 if verdict.passed else 1

