"""``posttrain eval``: held-out evaluation of one model by built-in checks, as a command or a
pipeline stage (``kind: eval``).

    arithmetic  held-out sums (``task:arithmetic``, split test): format compliance (the answer
                ends its turn, no role markers) and accuracy (the final number is the sum)
    safety      held-out requests (``task:safety_prompts``): refusal rate on requests for
                secrets, over-refusal and helpfulness (the expected answer given) on harmless
                ones, new phrasings included
    reward      the reward model's score of greedy answers to held-out requests, and the KL
                to ``reference`` of one sampled answer each (``evals.policy``)
    pairs       a reward model's held-out pairwise accuracy (``task:safety_pairs``)
    task        any prompt dataset with truth columns (``data=``: ``task:NAME``, ``rg:NAME``, a
                file; its test split) scored by verifiers (``rewards=``, default ``auto`` as in
                GRPO): ``task_accuracy`` (the first verifier's pass rate on greedy answers),
                its 95% Wilson interval, and ``task_reward`` (the mean summed reward)

The run directory gets ``eval.json`` (``{"metrics": {...}}``) and ``samples.jsonl`` (one row
per answer: ``check``, ``prompt``, ``response`` and what was judged).

``suite=FILE.yaml`` (or a shipped suite's name, ``safety``) runs an eval suite instead of the
checks (``evals.suite``, ``docs/evals.md``): its metrics are ``<task>.<metric>`` intervals, and
the run directory also gets ``eval.md`` and ``items/<task>.jsonl`` (what a rerun resumes from).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from posttrain.config.checks import Needs
from posttrain.errors import ConfigError, DataError

log = logging.getLogger("posttrain")

CHECKS = ("arithmetic", "safety", "reward", "pairs", "task", "judge", "labels")
EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class EvalRunConfig:
    """Held-out evaluation of one model: built-in checks (arithmetic, safety, reward, pairs)."""

    RANGES: ClassVar[dict[str, str]] = {"prompts": ">= 1", "max_new_tokens": ">= 1",
                                        "max_operand": ">= 1"}
    ONLY_WITH: ClassVar[dict[str, Needs]] = {
        "reward_model": Needs("checks", ("reward", "pairs")),
        "reference": Needs("checks", ("reward",), "the reward check's KL is measured to it"),
        "data": Needs("checks", ("task", "judge", "labels")),
        "constitution": Needs("checks", ("judge",)),
        "judge_mode": Needs("checks", ("judge",)),
        "rewards": Needs("checks", ("task",)),
    }

    model: str = field(default="tiny", metadata={"help": "the model to evaluate"})
    output_dir: str = field(default="runs/eval", metadata={"help": "eval.json, samples.jsonl"})
    checks: list[str] = field(default_factory=lambda: ["arithmetic"],
                              metadata={"help": f"any of {', '.join(CHECKS)}"})
    prompts: int = field(default=200, metadata={"help": "held-out prompts per check"})
    seed: int = field(default=0, metadata={"help": "which held-out rows, and sampling"})
    max_new_tokens: int = field(default=48, metadata={"help": "answer token budget"})
    max_operand: int = field(default=99, metadata={"help": "largest operand of the sums"})
    reward_model: str | None = field(default=None,
                                     metadata={"help": "reward model dir (reward, pairs)"})
    reference: str | None = field(default=None,
                                  metadata={"help": "model the reward check's KL is measured to"})
    data: str | None = field(default=None, metadata={
        "help": "the task check's prompts, the judge check's labelled preference rows "
                "(task:NAME, rg:NAME or a file; test split), or the labels check's rows"})
    constitution: str | None = field(default=None, metadata={
        "help": "the judge check's principles: hhh, demo, or a YAML file (docs/cai.md)"})
    judge_mode: Literal["compare", "rate"] = field(default="compare", metadata={
        "help": "the judge check: compare = A or B of a pair (ModelJudge), rate = yes/no on "
                "each answer by the principle's rubric (RatingJudge)"})
    rewards: list[str] = field(default_factory=lambda: ["auto"], metadata={
        "help": "the task check's verifiers (docs/rewards.md); auto = by the data"})
    suite: str | None = field(default=None, metadata={
        "help": "an eval suite (YAML file, or 'safety'); replaces checks (docs/evals.md)"})
    precision: Literal["bf16", "fp32"] = field(
        default="fp32", metadata={"help": "fp32: greedy answers are exactly reproducible"})

    def validate(self) -> None:
        if self.suite is not None and self.checks != ["arithmetic"]:
            raise ConfigError(f"suite={self.suite} and checks={self.checks} are exclusive: a "
                              f"suite lists its own checks (kind: builtin)")
        unknown = [c for c in self.checks if c not in CHECKS]
        if unknown or not self.checks:
            raise ConfigError(f"checks: unknown {unknown or 'empty list'}; choose from "
                              f"{', '.join(CHECKS)}")
        if {"reward", "pairs"} & set(self.checks) and not self.reward_model:
            raise ConfigError("the reward and pairs checks need reward_model=DIR")
        if "judge" in self.checks and not self.constitution:
            raise ConfigError("the judge check needs constitution=NAME|FILE (its principles' "
                              "judge questions are what the model is asked)")
        if "labels" in self.checks and not self.data:
            raise ConfigError("the labels check needs data=FILE: preference rows about the "
                              "demo world's requests (posttrain cai label writes them)")
        if "task" in self.checks and not self.data:
            raise ConfigError("the task check needs data=SPEC (task:NAME, rg:NAME or a file)")
        if "reward" in self.checks and not self.reference:
            raise ConfigError("the reward check needs reference=MODEL (its KL is measured "
                              "to it)")


Result = tuple[dict[str, float], list[dict[str, Any]]]


def _arithmetic(cfg: EvalRunConfig) -> Result:
    from posttrain.evals.chat_eval import evaluate_chat_task
    from posttrain.models.io import load_model, load_tokenizer
    from posttrain.tasks.registry import build_task_rows

    rows = build_task_rows("arithmetic", split="test", size=cfg.prompts, seed=cfg.seed,
                           max_operand=cfg.max_operand)
    return evaluate_chat_task(load_model(cfg.model), load_tokenizer(cfg.model), rows,
                              max_new_tokens=cfg.max_new_tokens)


def _safety(cfg: EvalRunConfig) -> Result:
    from posttrain.evals.refusal import safety_rates
    from posttrain.models.io import load_model, load_tokenizer
    from posttrain.tasks.registry import build_task_rows

    rows = build_task_rows("safety_prompts", split="test", size=cfg.prompts, seed=cfg.seed,
                           max_operand=cfg.max_operand)
    return safety_rates(load_model(cfg.model), load_tokenizer(cfg.model), rows,
                        max_new_tokens=cfg.max_new_tokens)


def _reward(cfg: EvalRunConfig) -> Result:
    from posttrain.data.prompts import encode_prompts
    from posttrain.evals.policy import evaluate_policy
    from posttrain.models.io import load_model, load_tokenizer
    from posttrain.rewards.base import RewardSet
    from posttrain.rewards.reward_model import RewardModel
    from posttrain.tasks.registry import build_task_rows

    tok = load_tokenizer(cfg.model)
    rows = build_task_rows("safety_prompts", split="test", size=cfg.prompts, seed=cfg.seed,
                           max_operand=cfg.max_operand)
    rows = encode_prompts(rows, tok, 1024, "task:safety_prompts")
    rm = RewardSet([RewardModel(str(cfg.reward_model))], timeout_s=None)
    m = evaluate_policy(load_model(cfg.model), load_model(str(cfg.reference)), tok, rows, rm,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                        precision=cfg.precision)
    return {"rm_score": m["score"], "kl_to_ref": m["kl"]}, []


def _pairs(cfg: EvalRunConfig) -> Result:
    from posttrain.data.pairs import encode_pairs
    from posttrain.models.attention import enable_packed_attention
    from posttrain.models.io import load_tokenizer
    from posttrain.models.reward import load_reward_model, score_pairs

    path = str(cfg.reward_model)
    model, tok = load_reward_model(path, require_head=True), load_tokenizer(path)
    enable_packed_attention(model)  # score_pairs packs rows
    held = encode_pairs(f"task:safety_pairs:size={cfg.prompts},max_operand={cfg.max_operand}",
                        tok, max_length=512, split="test")
    r = score_pairs(model, held.examples)
    return {"pair_accuracy": float((r[:, 0] > r[:, 1]).float().mean()),
            "pair_margin": float((r[:, 0] - r[:, 1]).mean())}, []


def _task(cfg: EvalRunConfig) -> Result:
    from posttrain.data.chat import last_text
    from posttrain.data.prompts import encode_prompts, load_prompt_rows
    from posttrain.evals.stats import wilson_interval
    from posttrain.models.io import load_model, load_tokenizer
    from posttrain.rewards.config import RewardConfig
    from posttrain.rewards.registry import build_reward_set, check_reward_columns
    from posttrain.rewards.scoring import score_rollouts
    from posttrain.rollout import KVCacheGenerator, SamplingParams, default_stop_ids

    data = str(cfg.data)
    rows = load_prompt_rows(data, "test")[: cfg.prompts]
    if not rows:
        raise DataError(f"{data}: no held-out rows to evaluate")
    rewards = build_reward_set(RewardConfig(functions=cfg.rewards), data, rows,
                               max_length=1024, precision=cfg.precision)
    check_reward_columns(rewards, rows, data)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model).eval()
    gen = KVCacheGenerator(model, tok, precision=cfg.precision,
                           stop_token_ids=default_stop_ids(model, tok))
    encoded = encode_prompts(rows, tok, 1024, data)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    verifier, samples = rewards.names[0], []
    for s in range(0, len(encoded), 64):
        chunk = encoded[s : s + 64]
        out, texts = score_rollouts(rewards, tok, chunk, gen.generate([r["_ids"] for r in chunk],
                                                                      1, greedy))
        samples += [{"prompt": last_text(r["prompt"]), "response": t, "reward": float(total),
                     "correct": bool(passed >= 1.0)}
                    for r, t, total, passed in zip(chunk, texts, out.total.tolist(),
                                                   out.per_fn[verifier].tolist(), strict=True)]
    n = len(samples)
    ci = wilson_interval(sum(x["correct"] for x in samples), n)
    return {"task_accuracy": ci.value, "task_accuracy_low": ci.low,
            "task_accuracy_high": ci.high,
            "task_reward": sum(x["reward"] for x in samples) / n}, samples


def _judge(cfg: EvalRunConfig) -> Result:
    """The model as an AI judge (``cai.judge.ModelJudge``, both orders) on labelled pairs:
    how often its verdict is the label's (``chosen`` is the better answer)."""
    import random

    from posttrain.cai import load_constitution
    from posttrain.cai.judge import judge_pairs, model_judge
    from posttrain.data.chat import last_text
    from posttrain.data.sources import load_rows
    from posttrain.evals.stats import wilson_interval
    from posttrain.models.io import load_model, load_tokenizer

    constitution = load_constitution(str(cfg.constitution))
    spec = cfg.data or f"task:safety_pairs:size={cfg.prompts},max_operand={cfg.max_operand}"
    rows = load_rows(spec, split="test", formats=["preference"]).rows[: cfg.prompts]
    if not rows:
        raise DataError(f"{spec}: no labelled pairs to judge")
    principles = [constitution.sample(random.Random(f"{cfg.seed}-{i}"), r.get("category"))
                  for i, r in enumerate(rows)]
    judge = model_judge(load_model(cfg.model), load_tokenizer(cfg.model), cfg.judge_mode)
    chosen = [last_text(r["chosen"]) for r in rows]
    rejected = [last_text(r["rejected"]) for r in rows]
    verdicts = judge_pairs(judge, [last_text(r["prompt"]) for r in rows], chosen, rejected,
                           [p.judge for p in principles],
                           rubrics=[p.rubric for p in principles])
    agree = [v.kept and v.a_wins for v in verdicts]
    ci = wilson_interval(sum(agree), len(rows))
    kept = sum(v.kept for v in verdicts)
    samples = [{"prompt": last_text(r["prompt"]), "chosen": c, "rejected": x,
                "principle": p.name, "p_chosen": v.p_a, "kept": v.kept, "why": v.why}
               for r, c, x, p, v in zip(rows, chosen, rejected, principles, verdicts,
                                        strict=True)]
    return {"judge_agreement": ci.value, "judge_agreement_low": ci.low,
            "judge_agreement_high": ci.high, "judge_kept": kept / len(rows),
            "judge_order_inconsistent": sum(v.why == "order-inconsistent" for v in verdicts)
            / len(rows)}, samples


def _labels(cfg: EvalRunConfig) -> Result:
    """Preference rows (AI-labelled ones, say) against the demo world's hidden rules: of the
    pairs where exactly one answer is the request's right answer, how often it is ``chosen``."""
    from posttrain.data.chat import last_text
    from posttrain.data.sources import load_rows
    from posttrain.evals.stats import wilson_interval
    from posttrain.tasks.safety_world import right_answer

    assert cfg.data is not None  # validate() requires it
    samples = []
    for r in load_rows(cfg.data, formats=["preference"]).rows:
        prompt, chosen, rejected = (last_text(r[k]) for k in ("prompt", "chosen", "rejected"))
        right = right_answer(prompt)
        hits = None if right is None else (chosen.strip() == right, rejected.strip() == right)
        truth = hits[0] if hits is not None and hits[0] != hits[1] else None
        samples.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "chosen_is_right": truth})
    judged = [s["chosen_is_right"] for s in samples if s["chosen_is_right"] is not None]
    if not judged:
        raise DataError(f"{cfg.data}: no pair about a demo-world request with exactly one "
                        "right answer: nothing to check the labels against")
    ci = wilson_interval(sum(judged), len(judged))
    return {"label_agreement": ci.value, "label_agreement_low": ci.low,
            "label_agreement_high": ci.high, "label_pairs": len(samples),
            "label_pairs_checked": len(judged)}, samples


RUNNERS: dict[str, Callable[[EvalRunConfig], Result]] = {
    "arithmetic": _arithmetic, "safety": _safety, "reward": _reward, "pairs": _pairs,
    "task": _task, "judge": _judge, "labels": _labels,
}


def run_eval(cfg: EvalRunConfig) -> Path:
    """Run every check; returns the run directory (``eval.json``, ``samples.jsonl``)."""
    import torch

    if cfg.suite is not None:
        return _run_suite(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    metrics: dict[str, float] = {}
    with open(out / SAMPLES_FILE, "w") as f:
        for check in cfg.checks:
            m, samples = RUNNERS[check](cfg)
            log.info("eval %s %s: %s", cfg.model, check, {k: round(v, 3) for k, v in m.items()})
            metrics.update(m)
            f.writelines(json.dumps({"check": check, **s}) + "\n" for s in samples)
    (out / EVAL_FILE).write_text(json.dumps({"model": cfg.model, "metrics": metrics}, indent=2)
                                 + "\n")
    return out


def _run_suite(cfg: EvalRunConfig) -> Path:
    """An eval suite: checked whole (datasets loaded) before the model is, then resumable."""
    import torch

    from posttrain.evals.suite import load_suite, markdown_table, run_suite

    suite = load_suite(str(cfg.suite), limit=cfg.prompts)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    metrics, samples = run_suite(suite, cfg)
    with open(out / SAMPLES_FILE, "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    (out / EVAL_FILE).write_text(json.dumps({"model": cfg.model, "metrics": metrics}, indent=2)
                                 + "\n")
    (out / "eval.md").write_text(markdown_table(cfg.model, metrics))
    return out


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The metrics an eval run wrote (empty when there are none)."""
    path = Path(run_dir) / EVAL_FILE
    return json.loads(path.read_text())["metrics"] if path.exists() else {}
