"""Golden runs: 20 steps of every recipe on the nano model, recorded as numbers.

A restructuring of the recipes must not change what they compute. Each run here logs its
metrics and ends with a fingerprint of its final weights; ``tests/golden/runs.json`` holds the
numbers of the code as it was when they were recorded, and ``test_golden_runs.py`` replays
every run and compares.

    python tests/golden_runs.py            # re-record every run (after a deliberate change)
    python tests/golden_runs.py grpo dpo   # re-record some

Wall-clock figures (``time/``, ``perf/``, the rollout's timings) are left out: they are not
what a run computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

GOLDEN_FILE = Path(__file__).parent / "golden" / "runs.json"
STEPS = 20
_TIMING = ("time/", "perf/", "rollout/time_s", "rollout/tokens_per_s", "ref/precompute_s")


def digit_frac(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    """A dense toy reward a random model can climb: the fraction of digit characters."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@dataclass(frozen=True)
class GoldenRun:
    command: str
    overrides: tuple[str, ...]
    needs: str | None = None  # a run whose final/ this one uses (``{needs}`` in overrides)


_PREF = ("model=tiny:nano", "data=task:safety_pairs:size=96", "batch_size=8", "lr=2e-3",
         "max_length=128", f"max_steps={STEPS}")
_PREF_EVAL = ("eval_data=task:safety_pairs:size=24", "eval_steps=10")
_GRPO = ("model=tiny:nano", "data=task:arithmetic:size=200", f"max_steps={STEPS}",
         "prompts_per_step=4", "num_generations=4", "max_new_tokens=8", "lr=3e-3",
         "rewards=[golden_runs:digit_frac]", "max_length=64")
_PPO = ("model=tiny:nano", "data=task:safety_prompts:split=train,size=120", f"max_steps={STEPS}",
        "prompts_per_step=4", "num_generations=2", "mini_batch_size=4", "batch_size=4",
        "ppo_epochs=2", "max_new_tokens=8", "lr=2e-3", "value_lr=2e-3", "max_length=96")

RUNS: dict[str, GoldenRun] = {
    "sft": GoldenRun("sft", ("model=tiny:nano", "data=task:chat:size=200", "batch_size=8",
                             "lr=3e-3", f"max_steps={STEPS}", "max_length=128",
                             "eval_data=task:chat:size=16", "eval_steps=10", "grad_accum=2")),
    "sft_lora": GoldenRun("sft", ("model=tiny:nano", "data=task:chat:size=200", "batch_size=8",
                                  "lr=1e-2", f"max_steps={STEPS}", "max_length=128", "lora.r=4",
                                  "lora.merge=true")),
    "rm": GoldenRun("rm", (*_PREF, *_PREF_EVAL, "lr=1e-3")),
    "dpo": GoldenRun("dpo", (*_PREF, *_PREF_EVAL, "nll_weight=1.0")),
    "dpo_ipo_noshare": GoldenRun("dpo", (*_PREF, "loss=ipo", "prefix_sharing=false",
                                         "precompute_ref=false")),
    "dpo_lora": GoldenRun("dpo", (*_PREF, "lora.r=4", "lr=1e-2")),
    "kto": GoldenRun("kto", (*_PREF, *_PREF_EVAL)),
    "orpo": GoldenRun("orpo", (*_PREF, *_PREF_EVAL)),
    "simpo": GoldenRun("simpo", (*_PREF, "precision=fp32")),
    "grpo": GoldenRun("grpo", (*_GRPO, "eval_data=task:arithmetic:size=16", "eval_steps=10")),
    "grpo_dapo": GoldenRun("grpo", (*_GRPO, "loss_type=dapo", "epsilon_high=0.28",
                                    "dynamic_sampling=true", "overlong_buffer=4",
                                    "mask_truncated=true")),
    "grpo_dr": GoldenRun("grpo", (*_GRPO, "loss_type=dr_grpo", "scale_rewards=none",
                                  "batch_size=4")),
    "grpo_gspo": GoldenRun("grpo", (*_GRPO, "importance_sampling=sequence", "beta=0.04",
                                    "num_iterations=2", "precision=fp32")),
    "grpo_rloo": GoldenRun("grpo", (*_GRPO, "advantage=rloo", "batch_size=8")),
    "grpo_rpp": GoldenRun("grpo", (*_GRPO, "advantage=reinforce_pp")),
    "grpo_lora": GoldenRun("grpo", (*_GRPO, "lora.r=4", "lr=1e-2", "beta=0.04",
                                    "prefix_sharing=false")),
    "ppo": GoldenRun("ppo", (*_PPO, "reward_model={needs}", "value_model=reward_model",
                             "eval_data=task:safety_prompts:size=8", "eval_steps=10"),
                     needs="rm"),
    "ppo_fns": GoldenRun("ppo", (*_PPO, "rewards=[golden_runs:digit_frac]",
                                 "value_model=policy", "kl_target=1.0", "entropy_coef=0.01",
                                 "whiten_advantages=false")),
    "ppo_lora": GoldenRun("ppo", (*_PPO, "reward_model={needs}", "lora.r=4", "lr=1e-2"),
                          needs="rm"),
}


def machine() -> str:
    """The CPU and torch build: numbers match bitwise only where these match."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} " \
           f"| threads {torch.get_num_threads()}"


def weights_digest(final: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.blake2b(digest_size=16)
    for f in sorted(final.rglob("*.safetensors")):
        tensors = load_file(f)
        for name in sorted(tensors):
            h.update(f"{f.relative_to(final)}:{name}".encode())
            h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append({k: v for k, v in row.items()
                     if not any(k.startswith(p) for p in _TIMING) and k != "time"})
    return rows


def _trainer(command: str) -> tuple[type, Callable[[Any], Path]]:
    from posttrain.commands import TRAIN_COMMANDS

    cmd = TRAIN_COMMANDS[command]
    return cmd.config_cls(), cmd.run


def run_golden(name: str, workdir: Path, finals: dict[str, Path]) -> dict[str, Any]:
    """Run ``RUNS[name]`` under ``workdir``; returns its metrics rows and weights digest."""
    from posttrain.config import load_config

    spec = RUNS[name]
    cls, train = _trainer(spec.command)
    needs = str(finals[spec.needs]) if spec.needs else ""
    overrides = [o.replace("{needs}", needs) for o in spec.overrides]
    overrides += [f"output_dir={workdir / name}", "logging_steps=1"]
    if spec.command in ("dpo", "kto", "orpo", "simpo"):
        overrides.append(f"ref_cache_dir={workdir / 'ref-cache' / name}")
    final = Path(train(load_config(cls, None, overrides)))
    finals[name] = final
    return {"metrics": _metrics(workdir / name), "weights": weights_digest(final)}


def order(names: list[str]) -> list[str]:
    """``names`` with every run's ``needs`` before it."""
    out: list[str] = []
    for n in names:
        need = RUNS[n].needs
        if need and need not in out:
            out.append(need)
        if n not in out:
            out.append(n)
    return out


def record(names: list[str]) -> None:
    import tempfile

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    golden = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {"runs": {}}
    finals: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in order(names):
            golden["runs"][name] = run_golden(name, Path(tmp), finals)
            print(f"recorded {name}: {len(golden['runs'][name]['metrics'])} rows", flush=True)
    golden["machine"] = machine()
    GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    record(sys.argv[1:] or list(RUNS))
