"""SFT end to end on the tiny model: it learns, saves an HF model, and resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.algorithms.sft import SFTConfig, train_sft
from posttrain.config import load_config
from posttrain.train.metrics import read_metrics


def _run(tmp_path: Path, *overrides: str) -> Path:
    cfg = load_config(SFTConfig, None, [f"output_dir={tmp_path}", *overrides])
    return train_sft(cfg)


def test_sft_learns_and_saves_plain_hf_model(tmp_path, chat_jsonl):
    final = _run(tmp_path, "model=tiny:nano", f"data={chat_jsonl}", f"eval_data={chat_jsonl}",
                 "max_steps=40", "batch_size=8", "lr=3e-3", "eval_steps=20", "warmup_steps=2")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    evals = [r["eval/token_accuracy"] for r in rows if "eval/token_accuracy" in r]
    assert len(evals) == 2 and evals[-1] > 0.3
    assert {"perf/tokens_per_s", "train/lr", "train/grad_norm", "sft/token_accuracy",
            "data/truncated_rows"} <= set().union(*rows)
    assert (tmp_path / "config.yaml").exists()
    # A plain transformers user loads the result.
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and (final / "model.safetensors").exists()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_pretraining_on_text_rows(tmp_path):
    _run(tmp_path, "model=tiny:nano", "data=task:corpus:size=64", "max_steps=20",
         "batch_size=8", "lr=3e-3", "max_length=64")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["data/truncated_rows"] > 0  # the corpus documents exceed 64 tokens
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]


def _cli(out: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "sft", "model=tiny:nano", f"data={data}",
            f"output_dir={out}", "max_steps=60", "save_steps=5", "batch_size=4", "lr=2e-3",
            "save_total_limit=3", "seed=7"]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(final / "model.safetensors")


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, chat_jsonl):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    ref = tmp_path / "ref"
    subprocess.run(_cli(ref, chat_jsonl), check=True, env=env, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(run, chat_jsonl), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-10").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "killed too late to test resume"

    resumed = subprocess.run([*_cli(run, chat_jsonl), "resume=true"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(ref / "final"), _weights(run / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no step logged twice


def test_tensorboard_sink_and_gradient_checkpointing(tmp_path, chat_jsonl):
    _run(tmp_path, "model=tiny:nano", f"data={chat_jsonl}", "max_steps=3", "batch_size=4",
         "report_to=jsonl,tensorboard", "gradient_checkpointing=true", "packing=false")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["train/loss"] > 0 for r in rows if "train/loss" in r)


def test_packed_and_padded_runs_agree(tmp_path, chat_jsonl):
    finals = [_run(tmp_path / p, "model=tiny:nano", f"data={chat_jsonl}", "max_steps=3",
                   "batch_size=4", "precision=fp32", f"packing={p == 'packed'}")
              for p in ("packed", "padded")]
    a, b = (_weights(f) for f in finals)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
