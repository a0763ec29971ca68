"""From a checked file to a plan: stage order, every stage's resolved config, fingerprints.

Each stage's config is built with the real config class, exactly as its command would build
it, with references replaced by the referenced stage's future paths; so a wrong key or value
is found here, before anything runs, and reported at its line. A stage's fingerprint is a
hash of its kind, its resolved config with referenced stages' paths replaced by their
fingerprints, and the package version: it changes when the stage or anything upstream does.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain import __version__
from posttrain.config.checks import UnusedOptionError
from posttrain.config.loader import config_from_dict
from posttrain.config.schema import aliases, config_fields
from posttrain.config.serialize import config_to_dict
from posttrain.data.mixture import MIXTURE_KEYS, parse_mixture
from posttrain.errors import ConfigError
from posttrain.pipeline.kinds import get_kind
from posttrain.pipeline.refs import ATTRS, Ref, find_refs, substitute
from posttrain.pipeline.source import Problems, apply_overrides, read_source
from posttrain.pipeline.spec import OWNED, PipelineSpec, StageSpec, read_spec

_MSG_KEY = re.compile(r"config key '([^']+)'(: )?")


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    run_dir: Path
    output: Path  # what ${name.output} means: a model directory, a data stage's rows file
    config: dict[str, Any]  # resolved, as its config.yaml will say (resume: false)
    inputs: tuple[str, ...]  # stages it refers to
    fingerprint: str


@dataclass(frozen=True)
class Plan:
    file: str
    output_dir: Path
    workers: int
    stages: tuple[Stage, ...]  # in run order: every stage after the stages it refers to
    alone: frozenset[str] = frozenset()  # run with every core, nothing beside them

    def __getitem__(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def _graph(spec: PipelineSpec, problems: Problems) -> dict[str, list[tuple[Ref, str]]]:
    """Each stage's references (with the key they sit under); unknown targets are problems."""
    known = [s.name for s in spec.stages]
    refs: dict[str, list[tuple[Ref, str]]] = {}
    for s in spec.stages:
        refs[s.name] = find_refs(s.keys)
        for ref, key in refs[s.name]:
            if ref.stage not in known:
                close = [n for n in known if n.partition("@")[0] == ref.stage.partition("@")[0]]
                close = close or difflib.get_close_matches(ref.stage, known, n=1)
                hint = f"; did you mean {close[-1]!r}?" if close else ""
                problems.add(spec.source.where(f"{_spec(spec, s.name).path}.{key}"),
                             f"{ref.text()} refers to no stage{hint}", stage=s.base, key=key)
    return refs


def _spec(spec: PipelineSpec, name: str) -> StageSpec:
    return next(s for s in spec.stages if s.name == name)


def _order(spec: PipelineSpec, refs: dict[str, list[tuple[Ref, str]]],
           problems: Problems) -> list[str]:
    """Stages in file order, each moved after the stages it refers to; cycles are problems."""
    order: list[str] = []
    state: dict[str, str] = {}  # "visiting" | "done"

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = trail[trail.index(name):] + [name]
            first = next(key for ref, key in refs[cycle[0]] if ref.stage == cycle[1])
            problems.add(spec.source.where(f"{_spec(spec, cycle[0]).path}.{first}"),
                         f"reference cycle: {' -> '.join(cycle)}", stage=cycle[0], key=first)
            raise _Cycle
        state[name] = "visiting"
        for ref, _ in refs[name]:
            if ref.stage in refs:  # an unknown stage is reported already
                visit(ref.stage, [*trail, name])
        state[name] = "done"
        order.append(name)

    for s in spec.stages:
        try:
            visit(s.name, [])
        except _Cycle:
            return []
    return order


class _Cycle(Exception):
    pass


def _merged(spec: PipelineSpec, s: StageSpec, cls: type) -> tuple[dict[str, Any], dict[str, str]]:
    """The stage's keys over ``defaults`` over the top-level seed, with each key's source path.

    A later layer's key is moved to the end, so it also wins over another spelling of the same
    option earlier on (``max_new_tokens`` vs ``sampling.max_new_tokens``); mappings merge.
    """
    layers = [({"seed": spec.seed} if spec.seed is not None else {}, ""),
              (spec.defaults, "defaults."), (s.keys, f"{s.path}.")]
    values: dict[str, Any] = {}
    paths: dict[str, str] = {}
    for layer, prefix in layers:
        for key, value in layer.items():
            if prefix != f"{s.path}." and not accepts(cls, key):
                continue  # a default for other kinds of stage
            old = values.pop(key, None)
            both = isinstance(old, dict) and isinstance(value, dict)
            values[key] = {**old, **value} if both else value
            paths.update(_key_paths(key, value, prefix))
    return values, paths


def accepts(cls: type, key: str) -> bool:
    """Whether config class ``cls`` has the option ``key`` (dotted, or a flat alias)."""
    return key.partition(".")[0] in {*config_fields(cls), *aliases(cls)}


def _unused_defaults(spec: PipelineSpec, problems: Problems) -> None:
    classes = [get_kind(s.kind).config_cls() for s in spec.stages]
    for key in spec.defaults:
        if not any(accepts(cls, key) for cls in classes):
            problems.add(spec.source.where(f"defaults.{key}"), "no stage of this pipeline has "
                         "this option", key=key)


def _key_paths(key: str, value: Any, prefix: str) -> dict[str, str]:
    """{dotted key in the stage: dotted path in the file}, nested mappings included."""
    out = {key: prefix + key}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update({f"{key}.{sub}": p for sub, p in _key_paths(str(k), v, prefix + key + ".")
                        .items()})
    return out


def _blame(message: str, paths: dict[str, str], cls: type) -> tuple[str | None, str]:
    """(the key as the user wrote it, the message without a repeated key prefix)."""
    flat = aliases(cls)

    def canonical(key: str) -> str:
        head, dot, rest = key.partition(".")
        return flat.get(head, head) + dot + rest

    m = _MSG_KEY.search(message)
    if m is not None:
        named = re.sub(r"\[\d+\]", "", m[1])
        text = message[m.end():] if m[2] and m.start() == 0 else message
        hits = [k for k in paths if named == canonical(k) or named.startswith(canonical(k) + ".")]
        return (max(hits, key=len) if hits else named), text
    # validate() messages name the option first: "batch_size must be >= 1, got 0".
    found = [(m.start(), -len(k), k) for k in paths for name in {k, canonical(k)}
             if (m := re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message))]
    return (min(found)[2] if found else None), message


def _owned(cls: type, run_dir: Path) -> dict[str, Any]:
    """The keys the pipeline sets (see spec.OWNED), for the kinds that have them."""
    owned = {"output_dir": str(run_dir), "resume": False, "overwrite": False, "output": None}
    return {k: v for k, v in owned.items() if k in config_fields(cls)}


def _config(spec: PipelineSpec, s: StageSpec, run_dir: Path, paths_of: dict[str, Any],
            problems: Problems) -> dict[str, Any] | None:
    """The stage's resolved config with references replaced by ``paths_of``, or None after
    recording the problem."""
    cfg = _built(spec, s, run_dir, paths_of, problems)
    return None if cfg is None else config_to_dict(cfg)


def _built(spec: PipelineSpec, s: StageSpec, run_dir: Path, paths_of: dict[str, Any],
           problems: Problems) -> Any | None:
    """The stage's config object (``_config``), or None after recording the problem."""
    kind = get_kind(s.kind)
    cls = kind.config_cls()
    values, paths = _merged(spec, s, cls)
    # an unknown stage is reported already: leave its reference as written
    values = substitute(values, lambda ref, _: str(paths_of.get(f"{ref.stage}.{ref.attr}",
                                                                 ref.text())))
    try:
        cfg = _from_values(cls, values, paths, _owned(cls, run_dir))
    except ConfigError as err:
        key, text = _blame(str(err), paths, cls)
        where = spec.source.where(paths.get(key, s.path) if key else s.path)
        problems.add(where, text, stage=s.base, key=key)  # one line for all rounds
        return None
    for key in kind.required:
        if getattr(cfg, key, None) is None:
            problems.add(spec.source.where(s.path), f"config key {key!r} is required",
                         stage=s.base, key=key)
            return None
    bad = _bad_mixture(cfg)
    if bad is not None:
        key, text = bad
        problems.add(spec.source.where(paths.get(key, s.path)), text, stage=s.base, key=key)
        return None
    return cfg


def _bad_mixture(cfg: Any) -> tuple[str, str] | None:
    """(key, error) for a data mixture with a bad entry: found now, not when the stage's
    data is loaded, after the stages before it have run."""
    for key in MIXTURE_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, list):
            try:
                parse_mixture(value)
            except ConfigError as err:
                return key, str(err)
    return None


def _from_values(cls: type, values: dict[str, Any], paths: dict[str, str],
                 owned: dict[str, Any]) -> Any:
    """The config from ``values``, leaving out a ``defaults`` key that has no effect in this
    stage (an ``eval_steps`` default does nothing for a stage without ``eval_data``); the same
    key written in the stage itself stays an error."""
    while True:
        try:
            return config_from_dict(cls, {**values, **owned})
        except UnusedOptionError as err:
            key = _default_key(err.key, values, paths, cls)
            if key is None:
                raise
            values = {k: v for k, v in values.items() if k != key}


def _default_key(dotted: str, values: dict[str, Any], paths: dict[str, str],
                 cls: type) -> str | None:
    """The key of ``values`` that sets option ``dotted`` when it comes from ``defaults``."""
    flat = {v: k for k, v in aliases(cls).items()}
    for key in values:
        sets = key == dotted or dotted.startswith(f"{key}.") or key == flat.get(dotted)
        if sets and paths.get(key, "").startswith("defaults."):
            return key
    return None


def _file_digests(value: Any) -> dict[str, str]:
    """Content hashes of the local files a config value names (data files): editing a data
    file changes the stage's fingerprint, as editing the pipeline file does."""
    if isinstance(value, dict):
        return {k: v for item in value.values() for k, v in _file_digests(item).items()}
    if isinstance(value, list | tuple):
        return {k: v for item in value for k, v in _file_digests(item).items()}
    if not isinstance(value, str) or "\n" in value or len(value) > 4096:
        return {}
    path = Path(value)
    try:
        if not path.is_file():
            return {}
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return {}
    return {value: digest.hexdigest()}


def fingerprint(kind: str, config: dict[str, Any]) -> str:
    """Hash of what a stage computes: its kind, config (paths of inputs already replaced by
    their fingerprints; its own place and resume flag left out), the content of the local
    files it reads, and the package version."""
    same = {k: v for k, v in config.items() if k not in OWNED}
    blob = json.dumps({"kind": kind, "config": same, "files": _file_digests(same),
                       "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _paths(stage: str, run_dir: Path, output: Path) -> dict[str, Path]:
    return {f"{stage}.dir": run_dir, f"{stage}.output": output}


def build_plan(spec: PipelineSpec) -> Plan:
    """Check every stage's config and order; raises PipelineError listing each problem."""
    problems = Problems()
    _unused_defaults(spec, problems)
    refs = _graph(spec, problems)
    order = _order(spec, refs, problems)  # empty after a cycle
    out = Path(spec.output_dir)
    real: dict[str, Any] = {}  # "sft.output" -> its future path
    hashed: dict[str, Any] = {}  # "sft.output" -> "${<sft's fingerprint>.output}"
    stages: list[Stage] = []
    for name in order:
        s, run_dir = _spec(spec, name), out / name
        kind = get_kind(s.kind)
        built = _built(spec, s, run_dir, real, problems)
        output = kind.output_path(run_dir, built)
        real.update(_paths(name, run_dir, output))
        if built is None or problems.lines:  # no plan comes of it; later stages still checked
            continue
        config = config_to_dict(built)
        fp = fingerprint(s.kind, _config(spec, s, run_dir, hashed, Problems()) or config)
        hashed.update({f"{name}.{a}": f"${{{fp}.{a}}}" for a in ATTRS})
        inputs = tuple(dict.fromkeys(ref.stage for ref, _ in refs[name]))
        stages.append(Stage(name, s.kind, run_dir, output, config, inputs, fp))
    problems.check()
    alone = frozenset(s.name for s in stages if s.name.partition("@")[0] in spec.alone)
    return Plan(spec.source.file, out, spec.workers, tuple(stages), alone)


def load_plan(source: Any, overrides: list[str] | None = None, output_dir: Any = None,
              workers: int | None = None) -> Plan:
    """Read, check and plan a pipeline file (or mapping); nothing is created on disk.

    ``output_dir`` and ``workers`` (the command's --output-dir and --workers) win over the
    file and over ``key=value`` overrides."""
    src = read_source(source)
    apply_overrides(src, overrides or [])
    if output_dir is not None:
        src.set("output_dir", str(output_dir), f"--output-dir {output_dir}")
    if workers is not None:
        src.set("workers", workers, f"--workers {workers}")
    return build_plan(read_spec(src))
