"""Engine behaviour: accumulation equivalence, NaN guard, atomic checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.algorithms.sft import SFTConfig, count_targets, sft_step
from posttrain.config import load_config
from posttrain.data.batching import pack
from posttrain.data.chat import encode_row
from posttrain.errors import TrainingError
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.tasks.registry import build_task_rows
from posttrain.train import checkpoint as ckpt
from posttrain.train.engine import Engine


def _cfg(tmp_path: Path, **kw) -> SFTConfig:
    base = {"output_dir": str(tmp_path), "precision": "fp32", "lr": 1e-2, "data": "task:chat",
            "max_grad_norm": 0.0, "lr_scheduler": "constant"}
    base.update(kw)
    return load_config(SFTConfig, None, [f"{k}={v}" for k, v in base.items()])


def _examples(n: int):
    tok = build_tokenizer()
    rows = build_task_rows("chat", size=n, seed=3)
    return tok, [encode_row(tok, r, "messages") for r in rows]


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    tok, ex = _examples(6)  # sequences of different lengths and target counts
    params, grads = [], []
    for accum, splits in ((1, [ex]), (3, [ex[:1], ex[1:4], ex[4:]])):
        model = build_model("nano", seed=0)
        eng = Engine(_cfg(tmp_path / f"a{accum}", grad_accum=accum), model, tok,
                     tmp_path / f"a{accum}", total_steps=1)
        out = eng.update([pack(s) for s in splits], sft_step, count_targets)
        eng.close()
        params.append([p.detach().clone() for p in model.parameters()])
        grads.append([p.grad.clone() for p in model.parameters()])  # the step's gradient
        assert math.isfinite(out["train/loss"])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    # Adam's first step is lr * g / (|g| + 1e-8): where |g| is within a few orders of 1e-8,
    # the gradients' fp32 rounding (allowed above) moves that step by up to a few 1e-3 of lr.
    # Compare parameters at 1e-3 of the lr=1e-2 step where the gradient is not that small.
    for a, b, g in zip(*params, grads[0], strict=True):
        clear = g.abs() > 1e-6
        torch.testing.assert_close(a[clear], b[clear], atol=1e-5, rtol=0)


def _nan_loss(model, batch, normalizer):
    loss = sum(p.sum() for p in model.parameters()) * float("nan")
    return loss, {}


def test_nan_guard_skips_step_then_aborts(tmp_path):
    tok, ex = _examples(2)
    model = build_model("nano", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    eng = Engine(_cfg(tmp_path, max_bad_steps=3), model, tok, tmp_path, total_steps=10)
    for _ in range(2):
        out = eng.update([pack(ex)], _nan_loss, count_targets)
        assert out["train/nonfinite"] == 1
    assert eng.policy.skipped_steps == 2
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b), "a non-finite step must not change the weights"
    # A good step resets the streak.
    eng.update([pack(ex)], sft_step, count_targets)
    assert eng.policy.bad_streak == 0
    eng.update([pack(ex)], _nan_loss, count_targets)
    eng.update([pack(ex)], _nan_loss, count_targets)
    with pytest.raises(TrainingError, match="consecutive"):
        eng.update([pack(ex)], _nan_loss, count_targets)
    eng.close()


def test_non_finite_weights_are_never_saved(tmp_path):
    tok, _ = _examples(1)
    model = build_model("nano", seed=0)
    eng = Engine(_cfg(tmp_path), model, tok, tmp_path, total_steps=1)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(TrainingError, match="refusing to save"):
        eng.save({"epoch": 0, "pos": 0})
    assert ckpt.list_checkpoints(tmp_path) == []
    eng.close()


def test_checkpoints_are_pruned_and_temp_dirs_ignored(tmp_path):
    tok, ex = _examples(2)
    model = build_model("nano", seed=0)
    eng = Engine(_cfg(tmp_path, save_total_limit=2), model, tok, tmp_path, total_steps=5)
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-99-1").mkdir()  # a crashed save's leftover
    for _ in range(3):
        eng.update([pack(ex)], sft_step, count_targets)
        eng.save({"epoch": 0, "pos": 0})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    state = ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path))
    assert state["step"] == 3 and "optimizer" in state
    eng.close()


def test_each_rank_takes_back_its_own_rng_streams(tmp_path):
    """A checkpoint holds every rank's RNG state; on resume rank r restores entry r, and a
    rank beyond the saved world size keeps its own streams."""
    from posttrain.train.distributed import DistInfo

    tok = build_tokenizer()
    eng = Engine(_cfg(tmp_path), build_model("nano", seed=0), tok, tmp_path, total_steps=1)
    saved = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        saved.append(ckpt.rng_state())
    want = [torch.rand(3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for rank in (0, 1):
        eng.dist = DistInfo(rank=rank, world_size=2)
        eng._restore_rng(saved)
        torch.testing.assert_close(torch.rand(3), want[rank])
    torch.manual_seed(7)
    eng.dist = DistInfo(rank=2, world_size=3)
    eng._restore_rng(saved)
    fresh = torch.rand(3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.rand(3), fresh)
    eng.close()
