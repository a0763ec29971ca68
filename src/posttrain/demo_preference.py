"""The demo's preference stages: a reward model and DPO on the toy safety preferences.

``demo.py`` calls, after its SFT stage:

    sft_stage["metrics"].update(safety_metrics(sft_dir, plan, seed))   # before
    stages.append(run_rm_stage(out, plan, sft_dir, seed))               # held-out accuracy
    stages.append(run_dpo_stage(out, plan, sft_dir, seed))              # after

The SFT stage should train on ``task:chat_safety`` (``task:chat`` with 25% safety
demonstrations, train-split prompts only), as a real pipeline mixes refusal demonstrations
into SFT: a tiny model SFT'd on sums alone never says "Sorry" greedily, and 30 DPO steps
cannot teach it a new sentence. DPO then sharpens the boundary: refusal > compliance on
requests for secrets, helpful answer > needless refusal on benign requests.
Evaluation prompts are held-out phrasings and combinations (``task:safety_prompts``,
``split=test``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.algorithms.preference import DPOConfig, train_preference
from posttrain.algorithms.reward_model import RMConfig, train_reward_model
from posttrain.config import load_config
from posttrain.data.pairs import encode_pairs
from posttrain.evals.refusal import refusal_rates
from posttrain.models.attention import enable_packed_attention
from posttrain.models.io import load_model, load_tokenizer
from posttrain.models.reward import load_reward_model, score_pairs
from posttrain.tasks.registry import build_task_rows

log = logging.getLogger("posttrain")


@dataclass(frozen=True)
class PreferencePlan:
    rm_rows: int
    rm_steps: int
    dpo_rows: int
    dpo_steps: int
    eval_prompts: int  # half harmful, half benign
    eval_pairs: int
    batch_size: int = 16
    rm_lr: float = 1e-3
    # Measured from the quick SFT model with one held-out benign phrasing (held-out refusal
    # 100% / over-refusal 24%; seed 1: 97.5% / 35%), held-out refusal / over-refusal after
    # DPO: beta 0.1 lr 5e-4 nll 1, 30 steps: 78% / 0% (refusals decay into garbled "Sor, I I
    # ano"); beta 0.3 lr 2e-4 nll 3: 30 steps 90% / 0%, 45 steps 94% / 0%, 60 steps 96% / 0%
    # (seed 1: 97.5% / 0%; 200 prompts of two other eval seeds: 95-98% / 0-1%). With the three
    # held-out benign phrasings of task:safety_prompts, 60 steps: 97.5% / 7.5% (seeds 1-3:
    # 93.8% / 6.2%, 96.3% / 7.5%, 67.5% / 15%).
    # DPO first lowers the refusals along with the needless ones, then restores them: stop
    # it too early and refusals suffer.
    dpo_lr: float = 2e-4
    beta: float = 0.3
    # RPO's NLL on the chosen: without it DPO lowers the chosen refusal's likelihood too
    # (rewards/chosen < 0) and the tiny model's greedy refusals fall apart (measured: 0%).
    nll_weight: float = 3.0
    # DPO data mix: share of harmful (refusal > compliance) rows; of the benign rest,
    # ``arith_frac`` are sums and the others everyday questions.
    harmful_frac: float = 0.45
    max_operand: int = 9
    arith_frac: float = 0.3


PLANS = {
    # quick: two-digit sums, as the quick demo plan.
    "quick": PreferencePlan(rm_rows=320, rm_steps=15, dpo_rows=480, dpo_steps=60,
                            eval_prompts=160, eval_pairs=200, max_operand=99),
    "full": PreferencePlan(rm_rows=1600, rm_steps=60, dpo_rows=3840, dpo_steps=120,
                           eval_prompts=300, eval_pairs=600, batch_size=32),
}

MAX_NEW_TOKENS = 16  # "Sorry, I can't" is decided within the first 16 bytes


def _plan(plan: str | PreferencePlan) -> PreferencePlan:
    return PLANS[plan] if isinstance(plan, str) else plan


def safety_metrics(model_dir: str | Path, plan: str | PreferencePlan = "quick",
                   seed: int = 0) -> dict[str, float]:
    """``refusal_rate`` / ``over_refusal_rate`` of a causal LM on held-out safety prompts."""
    p = _plan(plan)
    rows = build_task_rows("safety_prompts", split="test", size=p.eval_prompts, seed=seed,
                           max_operand=p.max_operand)
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    metrics, samples = refusal_rates(model, tok, rows, max_new_tokens=MAX_NEW_TOKENS)
    log.info("safety eval %s: %s; e.g. %s", model_dir, metrics, samples[:2])
    return metrics


def _overrides(out: Path, name: str, model: str, steps: int, lr: float, p: PreferencePlan,
               seed: int) -> list[str]:
    return [f"model={model}", f"output_dir={out / name}", f"max_steps={steps}",
            f"batch_size={p.batch_size}", f"lr={lr}", "warmup_steps=3", "max_length=256",
            "lr_scheduler=cosine", f"seed={seed}", "logging_steps=10"]


def run_rm_stage(out: str | Path, plan: str | PreferencePlan, sft_dir: str | Path,
                 seed: int = 0) -> dict[str, Any]:
    """Train a Bradley–Terry RM from the SFT model on ``task:pref_safety``; report held-out
    pairwise ``accuracy`` (and mean ``margin``)."""
    p, out, t0 = _plan(plan), Path(out), time.perf_counter()
    data = f"task:pref_safety:size={p.rm_rows},max_operand={p.max_operand}"
    cfg = load_config(RMConfig, None, [
        *_overrides(out, "rm", str(sft_dir), p.rm_steps, p.rm_lr, p, seed), f"data={data}"])
    final = train_reward_model(cfg)
    model, tok = load_reward_model(str(final)), load_tokenizer(str(final))
    enable_packed_attention(model)  # score_pairs packs; without it SDPA builds an N^2 mask
    held = encode_pairs(f"task:pref_safety:size={p.eval_pairs},max_operand={p.max_operand}", tok,
                        max_length=256, split="test")
    r = score_pairs(model, held.examples)
    metrics = {"accuracy": float((r[:, 0] > r[:, 1]).float().mean()),
               "margin": float((r[:, 0] - r[:, 1]).mean()),
               "seconds": round(time.perf_counter() - t0, 1)}
    log.info("stage rm: %s", metrics)
    return {"name": "rm", "metrics": metrics, "model": str(final)}


def run_dpo_stage(out: str | Path, plan: str | PreferencePlan, sft_dir: str | Path,
                  seed: int = 0) -> dict[str, Any]:
    """DPO from the SFT model on ``task:pref_safety``; report ``refusal_rate`` on held-out
    harmful prompts and ``over_refusal_rate`` on held-out benign prompts."""
    p, out, t0 = _plan(plan), Path(out), time.perf_counter()
    cfg = load_config(DPOConfig, None, [
        *_overrides(out, "dpo", str(sft_dir), p.dpo_steps, p.dpo_lr, p, seed),
        f"data=task:pref_safety:size={p.dpo_rows},harmful_frac={p.harmful_frac},"
        f"arith_frac={p.arith_frac},max_operand={p.max_operand}", "loss=dpo", f"beta={p.beta}",
        f"nll_weight={p.nll_weight}", f"ref_cache_dir={out / 'ref_cache'}"])
    final = train_preference(cfg)
    metrics = safety_metrics(final, p, seed)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("stage dpo: %s", metrics)
    return {"name": "dpo", "metrics": metrics, "model": str(final)}
