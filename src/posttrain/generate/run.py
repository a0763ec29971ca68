"""``posttrain generate``: ``n`` completions per prompt from any model, batched through the
KV-cache engine, optionally scored by rewards and filtered, written as training rows.

    keep=all      every sample: SFT rows ``{"prompt", "completion"}`` (+ ``reward``)
    keep=best     best-of-n: the highest-reward sample per prompt (ties: the first), if its
                  reward is >= ``min_reward`` (when set)
    keep=passing  rejection sampling: every sample with reward >= ``min_reward`` (default 1,
                  a verifier's pass)
    keep=pairs    preference rows ``{"prompt", "chosen", "rejected"}``: the best and the
                  worst sample, when their rewards differ by > 0 and >= ``min_margin``
    keep=judged   AI feedback (RLAIF): two different samples per prompt compared by a judge
                  (``judge_model``: a model dir, or ``module:function``) under a principle
                  drawn from ``constitution`` (by the row's ``category`` when it has one),
                  asked in both orders; preference rows with ``principle`` and ``judge_p``
                  (the judge's order-averaged probability for ``chosen``). Ties, order-
                  inconsistent verdicts and prompts whose samples are all the same are
                  dropped and counted (``cai/judge.py``)

Samples with no text are dropped and counted (``empty_answer``) in every mode: no trainer
learns from an empty answer, and the row formats refuse one.

Every row carries ``prompt_id`` (the prompt's index in the data and a hash of it). Rows are
appended batch by batch; ``<output>.meta.json`` records the config's fingerprint and how many
prompts (and bytes of output) are finished. A rerun with the same config truncates the output
to the last finished batch (a torn line or a batch killed half-written goes) and continues
after it, so each row is written exactly once; batch ``b``'s sampling seed depends only on
``seed`` and the batch's first prompt, so a resumed run writes what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from posttrain.config.checks import Needs
from posttrain.data.mixture import describe
from posttrain.errors import ConfigError, DataError

log = logging.getLogger("posttrain")

KEEP = ("all", "best", "passing", "pairs", "judged")
ROWS_FILE = "rows.jsonl"
# Options that do not change which rows a prompt gets: a run may continue under new values
# (``limit`` raised = more prompts).
_NOT_FINGERPRINTED = ("output", "output_dir", "resume", "overwrite", "limit")

Row = dict[str, Any]
# One prompt's samples: (text, reward or None, finish reason), in sampling order.
Sample = tuple[str, float | None, str]


@dataclass
class RowsConfig:
    """What every command that writes rows from a model's answers to prompts shares: the
    model, the prompts, the output file (resumable) and the generation budget."""

    RANGES: ClassVar[dict[str, str]] = {
        "temperature": ">= 0", "max_new_tokens": ">= 1", "max_length": ">= 2",
        "batch_size": ">= 1", "limit": ">= 1"}

    model: str = field(default="tiny", metadata={"help": "the model that writes the answers"})
    data: str | list | None = field(default=None, metadata={
        "help": "prompts: task:NAME, rg:NAME, a file of prompt rows, or a list of them (a "
                "mixture, docs/data.md)"})
    output_dir: str = field(default="runs/generate", metadata={
        "help": f"the rows go to OUTPUT_DIR/{ROWS_FILE} unless output is set"})
    output: str | None = field(default=None, metadata={"help": "the rows file (.jsonl)"})
    split: str = field(default="train", metadata={"help": "the data split to read"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per answer"})
    max_length: int = field(default=1024, metadata={
        "help": "prompt + answer tokens; longer prompts are skipped"})
    batch_size: int = field(default=16, metadata={"help": "prompts per engine call"})
    limit: int | None = field(default=None, metadata={"help": "at most this many prompts"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    precision: Literal["bf16", "fp32"] = field(default="fp32", metadata={
        "help": "fp32: greedy and seeded samples are exactly reproducible"})
    resume: bool = field(default=True, metadata={
        "help": "continue an output written with the same config"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("config key 'data' is required (task:NAME, rg:NAME or a file of "
                              "prompts)")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} leaves no room for a "
                              f"prompt in max_length={self.max_length}")

    @property
    def path(self) -> Path:
        return Path(self.output) if self.output else Path(self.output_dir) / ROWS_FILE


@dataclass
class GenerateConfig(RowsConfig):
    """Completions of a prompt dataset, filtered by rewards into SFT or preference rows."""

    RANGES: ClassVar[dict[str, str]] = {
        **RowsConfig.RANGES, "n": ">= 1", "top_p": "(0, 1]", "min_reward": "finite",
        "min_margin": ">= 0"}
    ONLY_WITH: ClassVar[dict[str, Needs]] = {
        "min_reward": Needs("keep", ("best", "passing")),
        "min_margin": Needs("keep", ("pairs", "judged")),
        "constitution": Needs("keep", ("judged",)),
        "judge_model": Needs("keep", ("judged",)),
        "judge_mode": Needs("keep", ("judged",)),
    }

    model: str = field(default="tiny", metadata={"help": "the model that writes the "
                                                         "completions (a teacher, to distil)"})
    n: int = field(default=4, metadata={"help": "samples per prompt"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; 1 = off"})
    rewards: list[str] = field(default_factory=list, metadata={
        "help": "reward functions / verifiers (docs/rewards.md); auto = by the data"})
    reward_model: str | None = field(default=None, metadata={
        "help": "a reward model dir whose score is the first reward"})
    keep: Literal["all", "best", "passing", "pairs", "judged"] = field(default="all", metadata={
        "help": "all | best (best-of-n) | passing (rejection sampling) | pairs (preference "
                "by reward) | judged (preference by an AI judge)"})
    constitution: str | None = field(default=None, metadata={
        "help": "keep=judged: the principles (hhh, demo, or a YAML file; docs/cai.md)"})
    judge_model: str | None = field(default=None, metadata={
        "help": "keep=judged: the judge, a model dir or module:function (default: model)"})
    judge_mode: Literal["compare", "rate"] = field(default="compare", metadata={
        "help": "keep=judged, a model judge: compare = A or B (ModelJudge); rate = yes/no on "
                "each answer by the principle's rubric (RatingJudge)"})
    min_reward: float | None = field(default=None, metadata={
        "help": "keep=best: drop prompts whose best is below; keep=passing: threshold "
                "(default 1)"})
    min_margin: float = field(default=0.0, metadata={
        "help": "keep=pairs: least reward gap; keep=judged: least |judge_p - 1/2|"})

    def validate(self) -> None:
        super().validate()
        if self.keep == "judged":
            if not self.constitution or self.n < 2:
                raise ConfigError("keep=judged needs constitution=NAME|FILE and n >= 2 "
                                  f"samples per prompt (got n={self.n})")
        elif self.keep != "all" and not (self.rewards or self.reward_model):
            raise ConfigError(f"keep={self.keep} ranks samples by reward: set rewards=[...] "
                              f"(e.g. [auto]) or reward_model=DIR")
        if self.keep == "pairs" and self.n < 2:
            raise ConfigError(f"keep=pairs needs n >= 2 samples per prompt, got n={self.n}")



def run_generate(cfg: GenerateConfig) -> Path:
    """Generate, filter and append rows; returns the rows file (see the module docstring)."""
    rows = load_prompts(cfg)  # every input error is raised before the model loads
    rewards = _rewards(cfg, rows)
    dropped: Counter[str] = Counter()  # by reason, this run's: the sidecar sums every run's
    feedback = _Feedback(cfg, dropped) if cfg.keep == "judged" else None

    def batches(model: Any, tok: Any) -> BatchFn:
        from posttrain.rollout import KVCacheGenerator, default_stop_ids

        gen = KVCacheGenerator(model, tok, precision=cfg.precision,
                               stop_token_ids=default_stop_ids(model, tok))

        def batch(chunk: list[tuple[str, Row]], start: int) -> list[Row]:
            ro = gen.generate([r["_ids"] for _, r in chunk], cfg.n, _sampling(cfg, start))
            samples = [_answered(s, dropped)
                       for s in _score(rewards, tok, [r for _, r in chunk], ro)]
            if feedback is not None:
                return feedback.label(chunk, samples, model, tok)
            return [x for (pid, r), s in zip(chunk, samples, strict=True) if s
                    for x in SELECT[cfg.keep](cfg, pid, r["prompt"], s)]

        return batch

    path = write_rows(cfg, rows, "generate", batches,
                      lambda: {f"dropped_{why}": n for why, n in dropped.items()})
    if dropped:
        log.info("generate: dropped %s", dict(dropped))
    return path


def _answered(samples: list[Sample], dropped: Counter[str]) -> list[Sample]:
    """The samples with some text, counting the others as ``empty_answer``: an empty answer
    makes a row that every trainer refuses (it has nothing to learn from)."""
    kept = [s for s in samples if s[0].strip()]
    if len(kept) < len(samples):
        dropped["empty_answer"] += len(samples) - len(kept)
    return kept


BatchFn = Callable[[list[tuple[str, Row]], int], list[Row]]


def write_rows(cfg: RowsConfig, rows: list[Row], what: str,
               batches: Callable[[Any, Any], BatchFn],
               tally: Callable[[], dict[str, int]] | None = None) -> Path:
    """The resumable loop every row-writing command shares: open (or continue) the output,
    then for each batch of prompts after the finished ones append ``batch(chunk, start)``'s
    rows; ``batches(model, tokenizer)`` makes ``batch`` once the model is loaded (it is not
    loaded when every prompt is done). ``tally()``, when given, returns this run's counts so
    far (pairs dropped by reason); the sidecar's ``counts`` sums them over every run that
    wrote the output, batch by batch with the rows."""
    from posttrain.models.io import load_model, load_tokenizer

    path = cfg.path
    done = open_output(cfg, path)
    before: dict[str, int] = json.loads(meta_path(path).read_text()).get("counts", {})
    tok = load_tokenizer(cfg.model)
    prompts = encode_prompts(cfg, rows, tok)
    check_same_prompts(path, prompts, done)
    if done >= len(prompts):
        log.info("%s: %s already holds all %d prompts", what, path, len(prompts))
        return path
    batch = batches(load_model(cfg.model).eval(), tok)
    with progress(len(prompts), done, what) as advance:
        for start in range(done, len(prompts), cfg.batch_size):
            chunk = prompts[start : start + cfg.batch_size]
            out = batch(chunk, start)
            extra = {} if tally is None else {"counts": _summed(before, tally())}
            append_rows(path, out, start + len(chunk), chunk[-1][0], **extra)
            advance(len(chunk), len(out))
    return path


# --- inputs (checked before the model loads) ------------------------------------------------


def load_prompts(cfg: RowsConfig) -> list[Row]:
    from posttrain.data.prompts import load_prompt_rows

    assert cfg.data is not None  # validate() requires it
    rows = load_prompt_rows(cfg.data, cfg.split)[: cfg.limit]
    if not rows:
        raise DataError(f"{describe(cfg.data)}: no prompt rows in split {cfg.split!r}")
    return rows


def _rewards(cfg: GenerateConfig, rows: list[Row]) -> Any:
    if not (cfg.rewards or cfg.reward_model):
        return None
    from posttrain.rewards.config import RewardConfig
    from posttrain.rewards.registry import build_reward_set, check_reward_columns

    rc = RewardConfig(model=cfg.reward_model, functions=list(cfg.rewards))
    assert cfg.data is not None  # validate() requires it
    rewards = build_reward_set(rc, cfg.data, rows, max_length=cfg.max_length,
                               precision=cfg.precision)
    check_reward_columns(rewards, rows, cfg.data)
    return rewards


def prompt_id(index: int, prompt: Any) -> str:
    """A prompt's stable id: its index in the data and a hash of its content."""
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()
    return f"{index}-{digest[:10]}"


def encode_prompts(cfg: RowsConfig, rows: list[Row], tok: Any) -> list[tuple[str, Row]]:
    """(prompt_id, row + ``_ids``) of every prompt that leaves room to generate."""
    from posttrain.data.chat import render_prompt

    max_prompt = cfg.max_length - cfg.max_new_tokens
    out = [(prompt_id(i, r["prompt"]), {**r, "_ids": render_prompt(tok, r["prompt"])})
           for i, r in enumerate(rows)]
    kept = [x for x in out if len(x[1]["_ids"]) <= max_prompt]
    if len(kept) < len(out):
        log.warning("%s: %d prompts longer than max_length - max_new_tokens = %d tokens; "
                    "skipped", describe(cfg.data), len(out) - len(kept), max_prompt)
    if not kept:
        raise DataError(f"{describe(cfg.data)}: no prompt fits in max_length - max_new_tokens = "
                        f"{max_prompt} tokens")
    return kept


# --- the output file and its sidecar --------------------------------------------------------


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def fingerprint(cfg: RowsConfig) -> dict[str, Any]:
    """The options that decide what a prompt's rows are (what a resumed run must share)."""
    d = asdict(cfg)
    return {k: v for k, v in d.items() if k not in _NOT_FINGERPRINTED}


def open_output(cfg: RowsConfig, path: Path) -> int:
    """Prompts already finished in ``path`` (0 for a fresh output); refuses an output written
    under another config, and cuts what follows the last finished batch."""
    meta = meta_path(path)
    if cfg.overwrite or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        _write_meta(meta, {"config": fingerprint(cfg), "prompts_done": 0, "bytes": 0})
        return 0
    if not meta.exists():
        raise ConfigError(f"{path} exists but has no {meta.name} (not written by posttrain "
                          f"generate); overwrite=true replaces it")
    state = json.loads(meta.read_text())
    old, new = state["config"], fingerprint(cfg)
    if old != new:
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ConfigError(f"{path} was generated with a different config ({', '.join(diff)} "
                          f"differ); overwrite=true replaces it")
    if not cfg.resume:
        raise ConfigError(f"{path} exists; resume=true continues it, overwrite=true replaces it")
    size, committed = path.stat().st_size, int(state["bytes"])
    if size < committed:
        raise DataError(f"{path} is shorter ({size} bytes) than {meta.name} records "
                        f"({committed}): it was edited; overwrite=true regenerates it")
    if size > committed:  # a torn line, or a batch killed before it was recorded
        log.warning("generate: %s: dropping %d bytes after the last finished batch", path,
                    size - committed)
        os.truncate(path, committed)
    log.info("generate: resuming %s after %d prompts", path, state["prompts_done"])
    return int(state["prompts_done"])


def _write_meta(meta: Path, state: dict[str, Any]) -> None:
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, meta)  # atomic: the sidecar is always one whole state


def check_same_prompts(path: Path, prompts: list[tuple[str, Row]], done: int) -> None:
    """A resumed output must continue the same prompts: the last finished one still sits at
    its place (the data file, or the tokenizer's prompt lengths, may have changed)."""
    if done == 0:
        return
    last = json.loads(meta_path(path).read_text()).get("last_prompt_id")
    here = prompts[done - 1][0] if done <= len(prompts) else None
    if last != here:
        raise DataError(f"{path}: its last finished prompt {last} is not prompt {done} of the "
                        f"data any more (the data changed?); overwrite=true regenerates it")


def _summed(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(a.keys() | b.keys())}


def append_rows(path: Path, rows: list[Row], prompts_done: int, last_id: str,
                counts: dict[str, int] | None = None) -> None:
    """Append one batch's rows, then record it finished (rows first: a kill in between only
    leaves bytes that the next run cuts and regenerates), with ``counts`` when given."""
    with open(path, "ab") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    meta = meta_path(path)
    state = json.loads(meta.read_text())
    _write_meta(meta, {**state, "prompts_done": prompts_done, "bytes": size,
                       "last_prompt_id": last_id, **({} if counts is None else
                                                     {"counts": counts})})


# --- sampling, scoring and selection --------------------------------------------------------


def _sampling(cfg: GenerateConfig, start: int) -> Any:
    from posttrain.rollout import SamplingParams

    # A seed per batch, fixed by its first prompt: a resumed batch samples what it did.
    return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                          max_new_tokens=cfg.max_new_tokens,
                          seed=(cfg.seed * 1_000_003 + start) % 2**62)


def _score(rewards: Any, tok: Any, rows: list[Row], ro: Any) -> list[list[Sample]]:
    """Each prompt's samples: (text, reward, finish reason)."""
    if rewards is None:
        texts = tok.batch_decode(ro.completion_ids, skip_special_tokens=True)
        scores: list[float | None] = [None] * len(texts)
    else:
        from posttrain.rewards.scoring import score_rollouts

        out, texts = score_rollouts(rewards, tok, rows, ro)
        scores = [float(x) for x in out.total.tolist()]
    flat = list(zip(texts, scores, ro.finish_reasons, strict=True))
    return [flat[i * ro.n : (i + 1) * ro.n] for i in range(len(rows))]


def _completion(prompt: Any, text: str) -> Any:
    """A completion in its prompt's form: text after a text prompt, else an assistant turn."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _sft(pid: str, prompt: Any, s: Sample) -> Row:
    row = {"prompt_id": pid, "prompt": prompt, "completion": _completion(prompt, s[0]),
           "finish_reason": s[2]}
    return row if s[1] is None else {**row, "reward": s[1]}


def _reward(s: Sample) -> float:
    return float(s[1]) if s[1] is not None else 0.0


def _keep_all(cfg: GenerateConfig, pid: str, prompt: Any, samples: list[Sample]) -> list[Row]:
    return [_sft(pid, prompt, s) for s in samples]


def _keep_best(cfg: GenerateConfig, pid: str, prompt: Any, samples: list[Sample]) -> list[Row]:
    best = max(samples, key=_reward)  # max keeps the first of equals
    if cfg.min_reward is not None and _reward(best) < cfg.min_reward:
        return []
    return [_sft(pid, prompt, best)]


def _keep_passing(cfg: GenerateConfig, pid: str, prompt: Any,
                  samples: list[Sample]) -> list[Row]:
    low = 1.0 if cfg.min_reward is None else cfg.min_reward
    return [_sft(pid, prompt, s) for s in samples if _reward(s) >= low]


def _keep_pairs(cfg: GenerateConfig, pid: str, prompt: Any, samples: list[Sample]) -> list[Row]:
    hi, lo = max(samples, key=_reward), min(samples, key=_reward)
    gap = _reward(hi) - _reward(lo)
    if gap <= 0 or gap < cfg.min_margin:
        return []
    return [{"prompt_id": pid, "prompt": prompt, "chosen": _completion(prompt, hi[0]),
             "rejected": _completion(prompt, lo[0]), "chosen_reward": _reward(hi),
             "rejected_reward": _reward(lo)}]


class _Feedback:
    """keep=judged: the constitution and the judge, and the dropped pairs by reason."""

    def __init__(self, cfg: GenerateConfig, dropped: Counter[str]) -> None:
        from posttrain.cai import load_constitution
        from posttrain.cai.judge import LazyJudge

        self.cfg = cfg
        self.constitution = load_constitution(str(cfg.constitution))
        self.model: tuple[Any, Any] | None = None  # the policy, once loaded: the default judge
        same = cfg.judge_model in (None, cfg.model)
        self.judge = LazyJudge(None if same else cfg.judge_model, "judge_model",
                               fallback=lambda: self.model,  # type: ignore[arg-type,return-value]
                               mode=cfg.judge_mode)
        self.dropped = dropped

    def label(self, chunk: list[tuple[str, Row]], samples: list[list[Sample]], model: Any,
              tok: Any) -> list[Row]:
        import random

        from posttrain.cai.judge import judge_pairs
        from posttrain.data.chat import last_text

        todo = []
        for (pid, row), s in zip(chunk, samples, strict=True):
            other = next((x for x in s[1:] if x[0] != s[0][0]), None)
            if other is None:  # all the same, or fewer than two answers with text
                self.dropped["identical" if len(s) >= 2 else "too_few_answers"] += 1
                continue
            principle = self.constitution.sample(random.Random(f"{self.cfg.seed}-{pid}"),
                                                 row.get("category"))
            todo.append((pid, row["prompt"], s[0][0], other[0], principle))
        self.model = (model, tok)
        verdicts = judge_pairs(self.judge, [last_text(t[1]) for t in todo],
                               [t[2] for t in todo], [t[3] for t in todo],
                               [t[4].judge for t in todo], self.cfg.min_margin,
                               rubrics=[t[4].rubric for t in todo])
        out = []
        for (pid, prompt, a, b, principle), v in zip(todo, verdicts, strict=True):
            if not v.kept:
                self.dropped[v.why] += 1
                continue
            chosen, rejected = (a, b) if v.a_wins else (b, a)
            out.append({"prompt_id": pid, "prompt": prompt,
                        "chosen": _completion(prompt, chosen),
                        "rejected": _completion(prompt, rejected),
                        "principle": principle.name, "judge_p": max(v.p_a, 1 - v.p_a)})
        return out


SELECT: dict[str, Callable[[GenerateConfig, str, Any, list[Sample]], list[Row]]] = {
    "all": _keep_all, "best": _keep_best, "passing": _keep_passing, "pairs": _keep_pairs}


@contextmanager
def progress(total: int, done: int, label: str = "generate",
             unit: str = "prompts") -> Iterator[Callable[[int, int], None]]:
    """A rich bar (``unit`` done, rows kept) on a terminal; a log line per batch elsewhere
    (a log file gets lines, not a bar's redraws)."""
    kept = 0
    if not (sys.stderr.isatty() and os.environ.get("POSTTRAIN_PROGRESS") != "plain"):
        def line(n: int, rows: int) -> None:
            nonlocal done, kept
            done, kept = done + n, kept + rows
            log.info("%s: %d/%d %s%s", label, done, total, unit,
                     f", {kept} rows kept" if unit == "prompts" else "")

        yield line
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if unit == "prompts":
        columns.insert(3, TextColumn("rows {task.fields[rows]}"))
    bar = Progress(*columns)
    task = bar.add_task(label, total=total, completed=done, rows=0)

    def step(n: int, rows: int) -> None:
        nonlocal kept
        kept += rows
        bar.update(task, advance=n, rows=kept)

    with bar:
        yield step
