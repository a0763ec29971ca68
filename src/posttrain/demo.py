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
from concurrent.futures import Executor, ProcessPoolExecutor
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
from posttrain.pipeline.workers import quiet_transformers, worker_pool
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
    # Share of SFT rows that are safety demonstrations (refusals and everyday answers).
    # Measured on the quick plan (160 steps): 0.35 -> refusal 100% / over-refusal 11% on
    # held-out prompts; 0.25 -> 100% / 24% at 200 steps, 99% / 33% at 120.
    sft_safety_frac: float = 0.35


# Full plan: sums of single digits, which a 1.6M-parameter model learns from ~500 small
# steps. Worksheets in the corpus cover every pair (pretraining "knows" the facts); chat and
# RL prompts hold out 10% of pairs, so held-out accuracy measures what post-training elicits.
# The quick plan uses two-digit sums and 32-row batches instead: 500 small steps do not fit in
# 2 minutes, and its safety stages pass their thresholds with these measured budgets.
MAX_OPERAND = 9

PLANS = {
    "quick": DemoPlan(pretrain_docs=3000, pretrain_steps=100, sft_rows=4000, sft_steps=160,
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


def rlhf_branch(out: Path, plan: str, sft: Path, seed: int) -> dict[str, Any]:
    """Branch 1+2's reward side: RM, then PPO against it, then the SFT model's RM score."""
    rm = pref.run_rm_stage(out, plan, sft, seed)
    ppo = demo_ppo.run_ppo_stage(out, plan, sft, rm["model"], seed)
    sft_rm_kl = demo_ppo.rm_kl_metrics(sft, sft, rm["model"], plan, seed)
    return {"rm": rm, "ppo": ppo, "sft_rm_kl": sft_rm_kl}


def dpo_grpo_branch(out: Path, plan: str, sft: Path, held_out: list[dict[str, Any]],
                    seed: int) -> dict[str, Any]:
    """DPO (with the SFT model's safety rates as its "before") and GRPO, from the SFT model."""
    sft_safety = pref.safety_metrics(sft, plan, seed)
    dpo = pref.run_dpo_stage(out, plan, sft, seed)
    grpo = run_grpo_stage(out, sft, held_out, quick=plan == "quick", seed=seed)
    return {"sft_safety": sft_safety, "dpo": dpo, "grpo": grpo}


def _run_branches(pool: Executor | None, out: Path, plan: str, sft: Path,
                  held_out: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The post-SFT stages: two independent branches, concurrently when ``pool`` is given."""
    if pool is None:
        return {**rlhf_branch(out, plan, sft, seed),
                **dpo_grpo_branch(out, plan, sft, held_out, seed)}
    rlhf = pool.submit(rlhf_branch, out, plan, sft, seed)
    other = pool.submit(dpo_grpo_branch, out, plan, sft, held_out, seed)
    return {**rlhf.result(), **other.result()}


def _branch_pool(workers: int) -> ProcessPoolExecutor | None:
    if workers < 2:
        return None
    # one thread each; their recipe imports overlap pretraining
    return worker_pool(2, threads=1, preload=("posttrain.algorithms.ppo",
                                              "posttrain.algorithms.preference"))


def run_demo(output_dir: str | Path = "demo-run", quick: bool = False, seed: int = 0,
             workers: int = 2) -> dict:
    """Run every demo stage; returns the report dict also written to ``report.json``.

    ``workers=2`` runs the two post-SFT branches (RM -> PPO, and DPO -> GRPO) in two
    processes of one thread each; ``workers=1`` runs everything here, in order.
    """
    plan = PLANS["quick" if quick else "full"]
    plan_name = "quick" if quick else "full"
    out = Path(output_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    quiet_transformers()
    t0 = time.perf_counter()
    pool = _branch_pool(workers)
    try:
        ops = plan.max_operand
        held_out = build_task_rows("arithmetic", split="test", size=plan.eval_prompts,
                                   seed=seed, max_operand=ops)
        corpus = (f"task:corpus:size={plan.pretrain_docs},max_operand={ops},"
                  f"every_pair={ops == MAX_OPERAND}")
        base = train_stage("base", out, "tiny:tiny", corpus, plan.pretrain_steps,
                            plan.pretrain_lr, plan.batch_size, seed)
        sft = train_stage("sft", out, str(base),
                           f"task:chat_safety:size={plan.sft_rows},max_operand={ops},"
                           f"safety_frac={plan.sft_safety_frac}",
                           plan.sft_steps, 2e-3, plan.sft_batch_size, seed)
        stages, samples = [], {}
        for name, path in (("base", base), ("sft", sft)):
            metrics, samples[name] = _evaluate(name, str(path), held_out)
            stages.append({"name": name, "metrics": metrics, "model": str(path)})
        t_sft = time.perf_counter() - t0
        b = _run_branches(pool, out, plan_name, sft, held_out, seed)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    rm, dpo, ppo, grpo = b["rm"], b["dpo"], b["ppo"], b["grpo"]
    # One yardstick for both RLHF branches: the demo RM's held-out score and KL to SFT.
    stages[-1]["metrics"].update({**b["sft_safety"], **b["sft_rm_kl"]})
    dpo["metrics"].update(demo_ppo.rm_kl_metrics(dpo["model"], sft, rm["model"], plan_name,
                                                 seed))
    stages += [rm, dpo, ppo]
    samples["grpo"] = grpo.pop("samples")
    stages.append(grpo)
    extra = {"plan": plan_name, "seconds": round(time.perf_counter() - t0, 1),
             "seconds_to_sft": round(t_sft, 1), "workers": workers,
             "held_out_prompts": len(held_out)}
    write_report(out, "posttrain demo", stages,
                 {"Samples (held-out prompts)": _samples_section(samples)}, extra)
    return {"stages": stages, **extra}
