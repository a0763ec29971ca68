"""Data parallelism: 2 processes (torchrun, gloo, DDP) == 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from posttrain.data.batching import BatchStream
from posttrain.train.metrics import read_metrics


def test_rank_slices_tile_the_single_process_batches():
    data = list(range(12))
    one = BatchStream(data, 4, list, seed=3)
    ranks = [BatchStream(data, 2, list, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(7):  # crosses epoch boundaries
        assert one.next() == ranks[0].next() + ranks[1].next()


def _args(out, data, batch_size):
    return ["-m", "posttrain.cli", "sft", "model=tiny:nano", f"data={data}", f"output_dir={out}",
            "max_steps=4", f"batch_size={batch_size}", "lr=3e-3", "precision=fp32",
            "grad_accum=2", "save_steps=2"]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, chat_jsonl):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *_args(tmp_path / "one", chat_jsonl, 4)], check=True,
                   env=env, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", *_args(tmp_path / "two", chat_jsonl, 2)],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    la = [r["train/loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")
          if "train/loss" in r]
    lb = [r["train/loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")
          if "train/loss" in r]
    assert la == pytest.approx(lb, rel=1e-4)
    assert (tmp_path / "two" / "checkpoints" / "step-2").exists()
