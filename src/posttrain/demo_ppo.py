"""The demo's classic-RLHF stage: PPO from the SFT model against the demo's reward model.

``demo.py`` calls, after its RM stage (the RM's run directory holds ``final/``):

    stages.append(run_ppo_stage(out, plan, sft_dir, rm_dir, seed))        # rm_score, kl_to_sft
    stage["metrics"].update(rm_kl_metrics(model_dir, sft_dir, rm_dir, plan, seed))  # sft, dpo

PPO samples answers to ``task:safety_prompts`` (train split: requests for secrets, everyday
questions and sums), the RM trained on ``task:pref_safety`` scores them, and the policy
moves towards what the RM prefers (refusing the secrets, helping with the rest) while the
KL penalty keeps it near the SFT model. Every stage is then compared on held-out prompts
(``split=test``: new phrasings and combinations) by the same two numbers:

- ``rm_score``: mean RM score of the greedy completions;
- ``kl_to_sft``: mean KL(model || SFT) per completion, in nats, on one fixed-seed sample per
  prompt at temperature 1 (the exact per-token KL over the vocabulary, summed over the
  completion: ``posttrain.evals.policy.sequence_kl``); 0 for the SFT model itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.algorithms.ppo import PPOConfig, train_ppo
from posttrain.config import load_config
from posttrain.data.prompts import encode_prompts
from posttrain.evals.policy import evaluate_policy
from posttrain.models.io import load_model, load_tokenizer
from posttrain.rewards.base import RewardSet
from posttrain.rewards.reward_model import RewardModel
from posttrain.tasks.registry import build_task_rows

log = logging.getLogger("posttrain")


@dataclass(frozen=True)
class PPOPlan:
    steps: int
    eval_prompts: int
    prompts_per_step: int = 16
    mini_batch_size: int = 4  # 4 optimizer steps per rollout: cheap updates, more of them
    ppo_epochs: int = 1
    max_new_tokens: int = 40  # a refusal is 27 tokens, a worked sum ~37 (byte tokens)
    lr: float = 2e-4
    value_lr: float = 1e-3
    beta: float = 0.05
    precision: str = "bf16"
    kind: str = "both"  # task:safety_prompts kind of the training prompts
    # The tiny SFT model's T=1 samples are mostly garbled text, which the RM cannot judge.
    temperature: float = 0.7


PLANS = {"quick": PPOPlan(steps=6, eval_prompts=32), "full": PPOPlan(steps=24, eval_prompts=100)}


def _plan(plan: str | PPOPlan) -> PPOPlan:
    return PLANS[plan] if isinstance(plan, str) else plan


def ppo_config(out: Path, sft_dir: str | Path, rm_dir: str | Path, plan: PPOPlan, seed: int = 0,
               beta: float | None = None, name: str = "ppo") -> PPOConfig:
    p = plan
    return load_config(PPOConfig, None, [
        f"model={sft_dir}", f"reward_model={rm_dir}", "value_model=reward_model",
        f"data=task:safety_prompts:split=train,kind={p.kind},"
        f"size={p.steps * p.prompts_per_step}",
        f"output_dir={out / name}", f"max_steps={p.steps}",
        f"prompts_per_step={p.prompts_per_step}", f"mini_batch_size={p.mini_batch_size}",
        f"batch_size={p.prompts_per_step}",
        f"ppo_epochs={p.ppo_epochs}", f"max_new_tokens={p.max_new_tokens}", f"lr={p.lr}",
        f"temperature={p.temperature}",
        f"value_lr={p.value_lr}", f"beta={p.beta if beta is None else beta}",
        "lr_scheduler=constant", "warmup_steps=0", "max_length=256", f"seed={seed}",
        "logging_steps=1", f"precision={p.precision}"])


def rm_kl_metrics(model_dir: str | Path, sft_dir: str | Path, rm_dir: str | Path,
                  plan: str | PPOPlan = "quick", seed: int = 0) -> dict[str, float]:
    """``rm_score`` and ``kl_to_sft`` of a causal LM on held-out safety prompts (see the
    module docstring); also ``rm_score_sampled`` (the RM score of the KL samples)."""
    p = _plan(plan)
    tok = load_tokenizer(str(model_dir))
    rows = build_task_rows("safety_prompts", split="test", size=p.eval_prompts, seed=seed)
    rows = encode_prompts(rows, tok, 256 - p.max_new_tokens, "task:safety_prompts")
    model, sft = load_model(str(model_dir)), load_model(str(sft_dir))
    rm = RewardSet([RewardModel(rm_dir, max_length=256)], timeout_s=None)
    m = evaluate_policy(model, sft, tok, rows, rm, max_new_tokens=p.max_new_tokens, seed=seed)
    out = {"rm_score": m["score"], "kl_to_sft": m["kl"], "rm_score_sampled": m["score_sampled"]}
    log.info("rm/kl eval %s: %s", model_dir, {k: round(v, 3) for k, v in out.items()})
    return out


def run_ppo_stage(out: str | Path, plan: str | PPOPlan, sft_dir: str | Path,
                  rm_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """PPO from ``sft_dir`` with the RM in ``rm_dir`` as reward (and value-model init);
    returns the report stage ``{"name": "ppo", "metrics": {...}, "model": path}``."""
    p, t0 = _plan(plan), time.perf_counter()
    final = train_ppo(ppo_config(Path(out), sft_dir, rm_dir, p, seed))
    train_s = time.perf_counter() - t0
    metrics = rm_kl_metrics(final, sft_dir, rm_dir, p, seed)
    metrics.update({"train_seconds": round(train_s, 1),
                    "seconds": round(time.perf_counter() - t0, 1)})
    log.info("stage ppo: %s", metrics)
    return {"name": "ppo", "metrics": metrics, "model": str(final)}
