"""The demo's RLVR stage: GRPO on ``task:arithmetic`` after SFT (seed §5.6-5.7).

``run_grpo_stage(out, sft_model, quick=...)`` trains from the SFT model with a verifiable
reward (the final integer equals the answer, the same check as the report's ``accuracy``)
and returns the report stage ``{"name": "grpo", "metrics": {...}, "model": path}`` plus
``"samples"`` (the held-out responses, for the report's samples section: pop it); the
metrics are the held-out evaluation of ``evaluate_chat_task`` on the rows the caller passes,
so SFT and GRPO are compared on the same problems.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.algorithms.grpo import GRPOConfig, train_grpo
from posttrain.config import load_config

log = logging.getLogger("posttrain")


@dataclass(frozen=True)
class GRPOPlan:
    steps: int
    prompts_per_step: int = 16
    num_generations: int = 8
    max_new_tokens: int = 32
    # Measured (docs/grpo.md): from the quick demo's SFT model (47%) 12 steps of 16 prompts
    # lowered held-out accuracy at every lr tried (2e-4: 23%, 1e-4: 32%, 5e-5: 38%); the quick
    # plan keeps the gentlest.
    lr: float = 5e-5
    adam_beta2: float = 0.999
    max_operand: int = 9


# The full plan is the large-batch recipe of docs/grpo.md (64 prompts x 8, lr 1e-4, Adam
# beta2 0.99). Measured from the full demo's SFT model (16% held-out, single-digit sums,
# 1 thread): 40 steps x 16 prompts at lr 5e-5 -> 11.5% (75 s); 64 prompts at lr 1e-4:
# 10 steps 12.5%, 16 steps 20%, 24 steps 23% (128 s); 16 steps at lr 2e-4 9.5%.
PLANS = {"quick": GRPOPlan(steps=6, max_new_tokens=48, max_operand=99),
         "full": GRPOPlan(steps=24, prompts_per_step=64, lr=1e-4, adam_beta2=0.99)}


def grpo_config(out: Path, sft_model: str | Path, plan: GRPOPlan, seed: int = 0) -> GRPOConfig:
    return load_config(GRPOConfig, None, [
        f"model={sft_model}", f"data=task:arithmetic:size=4000,max_operand={plan.max_operand}",
        f"output_dir={out / 'grpo'}",
        f"max_steps={plan.steps}", f"prompts_per_step={plan.prompts_per_step}",
        f"num_generations={plan.num_generations}", f"max_new_tokens={plan.max_new_tokens}",
        f"lr={plan.lr}", f"adam_beta2={plan.adam_beta2}", "lr_scheduler=constant",
        "warmup_steps=0", "rewards=[numeric]", "beta=0.0", "max_length=128", f"seed={seed}",
        "logging_steps=5",
    ])


def run_grpo_stage(out: str | Path, sft_model: str | Path, held_out: list[dict[str, Any]],
                   quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Train the ``grpo`` stage from ``sft_model`` and evaluate it on ``held_out`` rows."""
    from posttrain.evals.chat_eval import evaluate_chat_task
    from posttrain.models.io import load_model, load_tokenizer

    plan = PLANS["quick" if quick else "full"]
    t0 = time.perf_counter()
    final = train_grpo(grpo_config(Path(out), sft_model, plan, seed))
    train_s = time.perf_counter() - t0
    model, tok = load_model(str(final)), load_tokenizer(str(final))
    metrics, samples = evaluate_chat_task(model, tok, held_out, max_new_tokens=48)
    metrics["train_seconds"] = round(train_s, 1)
    log.info("stage grpo: %s", {k: round(v, 3) for k, v in metrics.items()})
    return {"name": "grpo", "metrics": metrics, "model": str(final), "samples": samples}
