"""``posttrain demo``: the post-training stack on a tiny model, offline, on a laptop CPU.

Stages (seed Fig 5.A): build a tiny model -> pretrain it on a synthetic corpus (the "base
model") -> SFT on chat demonstrations (sums, plus refusal and everyday-answer turns) ->
a reward model, then DPO (branch 1) and PPO against that reward model (branch 2) on toy
safety preferences, and GRPO on verifiable arithmetic rewards (branch 3), all from the SFT
model -> evaluate every stage on held-out prompts. The RLHF branches share one yardstick:
the reward model's held-out score (``rm_score``) and KL to the SFT model (``kl_to_sft``).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain import demo_ppo
from posttrain import demo_preference as pref
from posttrain.algorithms.sft import SFTConfig, train_sft
from posttrain.config import load_config
from posttrain.demo_grpo import run_grpo_stage
from posttrain.evals.chat_eval import evaluate_chat_task
from posttrain.models.io import load_model, load_tokenizer
from posttrain.report.stages import write_report
from posttrain.tasks.registry import build_task_rows

log = logging.getLogger("posttrain")


@dataclass(frozen=True)
class DemoPlan:
    """Budgets per stage; ``quick`` fits in 2 minutes on 2 cores, ``full`` in 10."""

    pretrain_docs: int
    pretrain_steps: int
    sft_rows: int
    sft_steps: int
    eval_prompts: int
    # Many small steps: the tiny model learns to copy operands only after a few hundred
    # updates (measured: 100 steps of 32 rows leave it at bigram level, 500 of 8 rows copy).
    batch_size: int = 8
    sft_batch_size: int = 16
    pretrain_lr: float = 3e-3
    max_operand: int = 9


# Full plan: sums of single digits, which a 1.6M-parameter model learns from ~500 small
# steps. Worksheets in the corpus cover every pair (pretraining "knows" the facts); chat and
# RL prompts hold out 10% of pairs, so held-out accuracy measures what post-training elicits.
# The quick plan keeps session 1's measured budgets (two-digit sums, 32-row batches): its
# safety stages pass their thresholds there; 500 small steps do not fit in 2 minutes.
MAX_OPERAND = 9

PLANS = {
    "quick": DemoPlan(pretrain_docs=3000, pretrain_steps=100, sft_rows=2000, sft_steps=60,
                      eval_prompts=60, batch_size=32, sft_batch_size=32, max_operand=99),
    "full": DemoPlan(pretrain_docs=12000, pretrain_steps=900, sft_rows=3000, sft_steps=200,
                     eval_prompts=200),
}


def train_stage(name: str, out: Path, model: str, data: str, steps: int, lr: float,
                 batch_size: int, seed: int) -> Path:
    """One SFT/pretraining stage of the demo; returns its final model directory."""
    cfg = load_config(SFTConfig, None, [
        f"model={model}", f"data={data}", f"output_dir={out / name}", f"max_steps={steps}",
        f"batch_size={batch_size}", f"lr={lr}", "warmup_steps=10", "max_length=512",
        "lr_scheduler=cosine", f"seed={seed}", "logging_steps=10",
    ])
    log.info("stage %s: %d steps on %s", name, steps, data)
    return train_sft(cfg)


def _evaluate(name: str, model_dir: str, rows: list[dict[str, Any]]) -> tuple[dict, list]:
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    metrics, samples = evaluate_chat_task(model, tok, rows, max_new_tokens=48)
    log.info("stage %s: %s", name, {k: round(v, 3) for k, v in metrics.items()})
    return metrics, samples


def _samples_section(samples: dict[str, list[dict[str, Any]]], k: int = 4) -> str:
    lines = []
    for stage, rows in samples.items():
        lines.append(f"**{stage}**\n")
        for r in rows[:k]:
            resp = r["response"].replace("\n", "\\n")[:160]
            lines.append(f"- `{r['prompt']}` -> `{resp}` (format_ok={r['format_ok']}, "
                         f"correct={r['correct']})")
        lines.append("")
    return "\n".join(lines)


def run_demo(output_dir: str | Path = "demo-run", quick: bool = False, seed: int = 0) -> dict:
    """Run every demo stage; returns the report dict also written to ``report.json``."""
    plan = PLANS["quick" if quick else "full"]
    out = Path(output_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    ops = plan.max_operand
    held_out = build_task_rows("arithmetic", split="test", size=plan.eval_prompts, seed=seed,
                               max_operand=ops)
    corpus = (f"task:corpus:size={plan.pretrain_docs},max_operand={ops},"
              f"every_pair={ops == MAX_OPERAND}")
    base = train_stage("base", out, "tiny:tiny", corpus, plan.pretrain_steps, plan.pretrain_lr,
                        plan.batch_size, seed)
    sft = train_stage("sft", out, str(base),
                       f"task:chat_safety:size={plan.sft_rows},max_operand={ops}",
                       plan.sft_steps, 2e-3, plan.sft_batch_size, seed)
    stages, samples = [], {}
    for name, path in (("base", base), ("sft", sft)):
        metrics, samples[name] = _evaluate(name, str(path), held_out)
        stages.append({"name": name, "metrics": metrics, "model": str(path)})
    plan_name = "quick" if quick else "full"
    stages[-1]["metrics"].update(pref.safety_metrics(sft, plan_name, seed))  # before DPO
    rm = pref.run_rm_stage(out, plan_name, sft, seed)
    dpo = pref.run_dpo_stage(out, plan_name, sft, seed)
    ppo = demo_ppo.run_ppo_stage(out, plan_name, sft, rm["model"], seed)
    # One yardstick for both RLHF branches: the demo RM's held-out score and KL to SFT.
    stages[-1]["metrics"].update(demo_ppo.rm_kl_metrics(sft, sft, rm["model"], plan_name, seed))
    dpo["metrics"].update(demo_ppo.rm_kl_metrics(dpo["model"], sft, rm["model"], plan_name, seed))
    stages += [rm, dpo, ppo]
    grpo = run_grpo_stage(out, sft, held_out, quick=quick, seed=seed)
    samples["grpo"] = grpo.pop("samples")
    stages.append(grpo)
    extra = {"plan": "quick" if quick else "full", "seconds": round(time.perf_counter() - t0, 1),
             "held_out_prompts": len(held_out)}
    write_report(out, "posttrain demo", stages,
                 {"Samples (held-out prompts)": _samples_section(samples)}, extra)
    return {"stages": stages, **extra}
