"""The shape of a pipeline file, checked, with ``repeat:`` rounds expanded into stages.

```yaml
output_dir: runs/pipe          # every stage runs in output_dir/<stage name>
seed: 0                        # every stage's seed unless defaults or the stage set one
workers: 1                     # > 1: independent stages run side by side
alone: [sft]                   # these run with every core, nothing beside them
defaults: {precision: fp32}    # keys given to every stage whose kind has them
stages:                        # name -> kind + that command's keys, in order
  sft: {kind: sft, model: tiny:nano, data: task:chat}
  dpo: {kind: dpo, model: "${sft.output}", data: task:safety_pairs}
repeat:                        # or a list of such blocks
  stages: [dpo]                # run these stages, in this order, once per round
  rounds: 3                    # dpo@1, dpo@2, dpo@3
  start: {dpo: sft}            # before round 1, dpo's own output is sft's
```
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError
from posttrain.pipeline.kinds import canonical_kind, get_kind
from posttrain.pipeline.refs import STAGE_NAME, Ref, RefError, find_refs, substitute
from posttrain.pipeline.source import Problems, Source

TOP_KEYS = ("output_dir", "seed", "workers", "alone", "defaults", "stages", "repeat")
REPEAT_KEYS = ("stages", "rounds", "start")
# The pipeline sets these in every stage: where it runs, and whether it resumes.
OWNED = {"output_dir": "every stage runs in <output_dir>/<stage name>",
         "resume": "the pipeline resumes interrupted stages itself",
         "overwrite": "the pipeline replaces a changed stage's directory itself",
         "output": "a data stage writes its rows in its own directory; refer to them as "
                   "${<stage>.output}"}


@dataclass(frozen=True)
class StageSpec:
    name: str  # as run: "dpo", or "dpo@2" for round 2 of a repeated stage
    base: str  # as written in the file
    kind: str
    keys: dict[str, Any]  # the stage's keys as written, without `kind`

    @property
    def path(self) -> str:
        """Where its keys' lines are kept in the Source."""
        return f"stages.{self.base}"


@dataclass(frozen=True)
class RepeatSpec:
    stages: list[str]
    rounds: int
    start: dict[str, str]
    path: str


@dataclass(frozen=True)
class PipelineSpec:
    source: Source
    output_dir: str
    seed: int | None
    workers: int
    defaults: dict[str, Any]
    stages: list[StageSpec]  # repeats expanded, in file order
    alone: tuple[str, ...] = ()  # stage names as written: every round of a repeated one


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_top(src: Source, problems: Problems) -> None:
    for key in src.data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (keys: {', '.join(TOP_KEYS)})"
            problems.add(src.where(str(key)), f"unknown top-level key {key!r}{hint}")
    out = src.data.get("output_dir")
    if not isinstance(out, str | int) or isinstance(out, bool) or out == "":
        problems.add(src.where("output_dir"), "output_dir is required: the directory the "
                     "stages' run directories go under", key="output_dir")
    if src.data.get("seed") is not None and not _is_int(src.data["seed"]):
        problems.add(src.where("seed"), f"expected int, got {src.data['seed']!r}", key="seed")
    workers = src.data.get("workers", 1)
    if not _is_int(workers) or workers < 1:
        problems.add(src.where("workers"), f"expected an int >= 1, got {workers!r}",
                     key="workers")
    for key in ("defaults", "stages"):
        if not isinstance(src.data.get(key) or {}, dict):
            problems.add(src.where(key), "expected a mapping", key=key)
    if not src.data.get("stages"):
        problems.add(src.where("stages"), "stages is required: a mapping of stage name -> "
                     "{kind: ..., keys of that command}", key="stages")


def _check_owned(src: Source, path: str, keys: Mapping[str, Any], problems: Problems,
                 stage: str | None = None) -> None:
    for key in keys:
        if key in OWNED:
            problems.add(src.where(f"{path}.{key}"), f"set by the pipeline ({OWNED[key]}); "
                         "remove it", stage=stage, key=key)


def _stage(src: Source, name: Any, body: Any, problems: Problems) -> StageSpec | None:
    where = src.where(f"stages.{name}")
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
        problems.add(where, f"bad stage name {name!r}: use letters, digits, '_' and '-'")
        return None
    if not isinstance(body, dict):
        problems.add(where, "expected a mapping with kind: and the command's keys", stage=name)
        return None
    if "kind" not in body:
        problems.add(where, "missing required key 'kind' (sft, dpo, grpo, ...)", stage=name)
        return None
    try:
        get_kind(str(body["kind"]))
    except ConfigError as err:
        problems.add(src.where(f"stages.{name}.kind"), str(err), stage=name, key="kind")
        return None
    _check_owned(src, f"stages.{name}", body, problems, stage=name)
    keys = {str(k): v for k, v in body.items() if k != "kind"}
    return StageSpec(name, name, canonical_kind(str(body["kind"])), keys)


def _repeat(src: Source, block: Any, path: str, names: list[str],
            problems: Problems) -> RepeatSpec | None:
    where = src.where(path)
    if not isinstance(block, dict):
        problems.add(where, "repeat: expected {stages: [NAME, ...], rounds: N, start: {...}}")
        return None
    for key in block:
        if key not in REPEAT_KEYS:
            problems.add(src.where(f"{path}.{key}"), f"unknown repeat key {key!r} (keys: "
                         f"{', '.join(REPEAT_KEYS)})")
    stages, rounds, start = block.get("stages"), block.get("rounds"), block.get("start") or {}
    if not isinstance(stages, list) or not stages or any(s not in names for s in stages):
        problems.add(src.where(f"{path}.stages"), f"repeat.stages must list stages of the "
                     f"file, got {stages!r}")
        return None
    if not _is_int(rounds) or rounds < 1:
        problems.add(src.where(f"{path}.rounds"), f"repeat.rounds: expected an int >= 1, got "
                     f"{rounds!r}")
        return None
    if not isinstance(start, dict) or any(k not in stages or v not in names or v in stages
                                          for k, v in start.items()):
        problems.add(src.where(f"{path}.start"), "repeat.start maps a repeated stage to the "
                     f"stage outside the block it starts from (e.g. {{{stages[-1]}: sft}}), "
                     f"got {start!r}")
        return None
    return RepeatSpec([str(s) for s in stages], rounds, dict(start), path)


def _repeats(src: Source, names: list[str], problems: Problems) -> list[RepeatSpec]:
    raw = src.data.get("repeat")
    if raw is None:
        return []
    blocks = raw if isinstance(raw, list) else [raw]
    paths = [f"repeat.{i}" for i in range(len(blocks))] if isinstance(raw, list) else ["repeat"]
    found = [_repeat(src, b, p, names, problems) for b, p in zip(blocks, paths, strict=True)]
    specs = [r for r in found if r is not None]
    seen: set[str] = set()
    for r in specs:
        for name in r.stages:
            if name in seen:
                problems.add(src.where(r.path), f"stage {name!r} is in two repeat blocks")
            seen.add(name)
    return specs


class _Rounds:
    """Which concrete stage a bare name means, from a given round of a given block."""

    def __init__(self, repeats: list[RepeatSpec]) -> None:
        self.block = {name: r for r in repeats for name in r.stages}

    def last(self, name: str) -> str:
        r = self.block.get(name)
        return f"{name}@{r.rounds}" if r is not None else name

    def resolve(self, ref: Ref, stage: str, k: int | None) -> str | None:
        """The stage ``ref`` means from round ``k`` of ``stage`` (None: round 1 has none).

        Inside a block a reference means the latest run of that stage: this round's when it
        comes earlier in the round, else the previous round's (or, in round 1, the stage
        named in ``start``). Outside the block it means the last round.
        """
        r = self.block.get(ref.stage)
        if r is None or k is None or r is not self.block.get(stage):
            return self.last(ref.stage)
        if r.stages.index(ref.stage) < r.stages.index(stage):
            return f"{ref.stage}@{k}"
        if k > 1:
            return f"{ref.stage}@{k - 1}"
        start = r.start.get(ref.stage)
        return None if start is None else self.last(start)


def _rename(src: Source, spec: StageSpec, k: int | None, rounds: _Rounds,
            problems: Problems) -> StageSpec:
    def fn(ref: Ref, path: str) -> str:
        if "@" in ref.stage:  # an explicit round: already concrete
            return ref.text()
        target = rounds.resolve(ref, spec.base, k)
        if target is None:
            problems.add(src.where(f"{spec.path}.{path}"), f"{ref.text()} in round 1 means the "
                         f"round before it; set repeat.start.{ref.stage} to the stage it "
                         "starts from", stage=spec.name, key=path)
            return ref.text()
        return Ref(target, ref.attr).text()

    try:
        keys = substitute(spec.keys, fn)
    except RefError as err:
        problems.add(src.where(f"{spec.path}.{err.key}"), str(err), stage=spec.name, key=err.key)
        keys = spec.keys
    name = spec.base if k is None else f"{spec.base}@{k}"
    return dataclasses.replace(spec, name=name, keys=keys)


def _expand(src: Source, specs: list[StageSpec], repeats: list[RepeatSpec],
            problems: Problems) -> list[StageSpec]:
    """Each repeated block becomes its rounds (a@1, b@1, a@2, b@2, ...) where the block's
    first stage stood; references are rewritten to name concrete stages."""
    rounds = _Rounds(repeats)
    by_name = {s.base: s for s in specs}
    out: list[StageSpec] = []
    for spec in specs:
        r = rounds.block.get(spec.base)
        if r is None:
            out.append(_rename(src, spec, None, rounds, problems))
        elif spec.base == next(s.base for s in specs if s.base in r.stages):
            out += [_rename(src, by_name[name], k, rounds, problems)
                    for k in range(1, r.rounds + 1) for name in r.stages]
    return out


def _no_refs_in_defaults(src: Source, defaults: dict[str, Any], problems: Problems) -> None:
    # A default goes to every stage: its reference would make every stage depend on one.
    try:
        found = find_refs(defaults)
    except RefError as err:
        problems.add(src.where(f"defaults.{err.key}"), str(err), key=err.key)
        return
    for ref, key in found:
        problems.add(src.where(f"defaults.{key}"), f"{ref.text()}: references belong in "
                     "stages, not in defaults", key=key)


def read_spec(src: Source) -> PipelineSpec:
    """Check the file's shape and expand its repeats; raises PipelineError listing every
    problem found at this level (configs are checked by ``plan``)."""
    problems = Problems()
    _check_top(src, problems)
    problems.check()
    raw = src.data["stages"]
    specs = [s for name, body in raw.items() if (s := _stage(src, name, body, problems))]
    defaults = src.data.get("defaults") or {}
    _check_owned(src, "defaults", defaults, problems)
    if "kind" in defaults:
        problems.add(src.where("defaults.kind"), "a stage's kind cannot be a default",
                     key="kind")
    _no_refs_in_defaults(src, defaults, problems)
    repeats = _repeats(src, list(raw), problems)
    problems.check()
    stages = _expand(src, specs, repeats, problems)
    alone = _alone(src, list(raw), problems)
    problems.check()
    return PipelineSpec(src, str(src.data["output_dir"]), src.data.get("seed"),
                        src.data.get("workers", 1), dict(defaults), stages, alone)


def _alone(src: Source, names: list[str], problems: Problems) -> tuple[str, ...]:
    """``alone:``, the stages that run with every core while nothing runs beside them: a
    bottleneck every branch waits for (with ``workers > 1`` it would otherwise get a worker's
    share of the cores whenever some small stage could run beside it)."""
    raw = src.data.get("alone") or []
    if not isinstance(raw, list) or any(n not in names for n in raw):
        problems.add(src.where("alone"), f"alone: expected a list of the file's stages, got "
                     f"{raw!r}", key="alone")
        return ()
    return tuple(str(n) for n in raw)
