"""A posttrain checkpoint runs unchanged under EleutherAI's lm-evaluation-harness.

Trains the nano model for two SFT steps, then runs the stock ``lm_eval --model hf`` CLI
on its ``final/`` directory with the local task in ``tests/lm_eval_tasks`` (8 project-written
multiple-choice sums), fully offline: HF offline flags set and an empty HF cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

TASKS = Path(__file__).with_name("lm_eval_tasks")
N_ITEMS = sum(1 for line in (TASKS / "sums.jsonl").read_text().splitlines() if line.strip())


def test_lm_eval_runs_local_task_on_trained_checkpoint(tmp_path: Path) -> None:
    from posttrain.cli import main

    run = tmp_path / "sft"
    assert main(["sft", "model=tiny:nano", "data=task:chat", "max_steps=2",
                 f"output_dir={run}"]) == 0
    ckpt = run / "final"
    assert (ckpt / "config.json").is_file()

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf",
         "--model_args", f"pretrained={ckpt},dtype=float32",
         "--tasks", "posttrain_sums", "--include_path", str(TASKS),
         "--device", "cpu", "--batch_size", "8", "--output_path", str(out), "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results_files = sorted(out.rglob("results_*.json"))
    assert len(results_files) == 1, list(out.rglob("*"))
    results = json.loads(results_files[0].read_text())
    task = results["results"]["posttrain_sums"]
    for metric in ("acc,none", "acc_norm,none"):
        assert 0.0 <= task[metric] <= 1.0, task
    assert results["n-samples"]["posttrain_sums"] == {"original": N_ITEMS, "effective": N_ITEMS}

    samples_files = sorted(out.rglob("samples_posttrain_sums_*.jsonl"))
    assert len(samples_files) == 1
    samples = [json.loads(line) for line in samples_files[0].read_text().splitlines()]
    assert len(samples) == N_ITEMS == 8
    # Every item scored all four choices; acc is the mean of per-item correctness.
    assert all(len(s["filtered_resps"]) == 4 for s in samples)
    assert task["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / N_ITEMS)
