"""Reports of real tiny runs: the recipes write instruments.jsonl (INSTRUMENT 5.1 margins,
INSTRUMENT 5.2 advantages), resume keeps it in step, and the report draws both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_report import assert_png_ok

from posttrain.algorithms.grpo import GRPOConfig, train_grpo
from posttrain.algorithms.preference import (
    DPOConfig,
    make_collate,
    pair_margins,
    train_preference,
)
from posttrain.config import load_config
from posttrain.data.pairs import encode_pairs
from posttrain.models.attention import enable_packed_attention
from posttrain.models.logprobs import FrozenReference, sequence_logprobs
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.report import build_report, load_source
from posttrain.report.instruments import read_rows

_DPO = ["model=tiny:nano", "data=task:safety_pairs:size=24", "batch_size=8", "lr=2e-3",
        "max_length=128", "max_steps=3", "eval_data=task:safety_pairs:size=8"]
_GRPO = ["model=tiny:nano", "data=task:arithmetic:size=64", "max_steps=3", "prompts_per_step=4",
         "num_generations=4", "max_new_tokens=8", "lr=3e-3", "max_length=64",
         "rewards=[golden_runs:digit_frac]", "eval_data=task:arithmetic:size=8"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_dpo_run_writes_margins_and_its_report_has_instrument_5_1(tmp_path: Path) -> None:
    run = tmp_path / "dpo"
    train_preference(load_config(DPOConfig, None, [*_DPO, f"output_dir={run}",
                                                   f"ref_cache_dir={tmp_path / 'ref'}"]))
    [row] = read_rows(run, "margins")
    assert row["step"] == 3 and row["loss"] == "dpo" and row["split"] == "train"
    assert row["n"] == len(row["margins"]) == 24 and row["margins"] == sorted(row["margins"])
    build_report(run)
    for name in ("instrument-5-1-margins", "instrument-5-1-fractions", "implicit-reward",
                 "loss", "accuracy"):
        assert_png_ok(run / "plots" / f"{name}.png")
    assert load_source(run).stages[0].kind == "dpo"
    assert "INSTRUMENT 5.1" in (run / "report.html").read_text()


def test_grpo_run_writes_advantages_per_logged_step(tmp_path: Path) -> None:
    run = tmp_path / "grpo"
    train_grpo(load_config(GRPOConfig, None, [*_GRPO, f"output_dir={run}"]))
    rows = read_rows(run, "advantages")
    logged = [r["step"] for r in _lines(run / "metrics.jsonl") if "grpo/zero_std_frac" in r]
    assert [r["step"] for r in rows] == logged == [1, 2, 3]
    assert all(r["n"] == 16 == len(r["adv"]) for r in rows)
    # group-relative advantages sum to zero within each group, so over the step too
    assert all(abs(sum(r["adv"])) < 1e-3 for r in rows)
    build_report(run)
    for name in ("instrument-5-2-advantages", "instrument-5-2-zero-spread", "reward", "length",
                 "entropy", "accuracy"):
        assert_png_ok(run / "plots" / f"{name}.png")


def test_grpo_resume_rewrites_instrument_rows_after_the_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "grpo"
    args = [*_GRPO, f"output_dir={run}", "save_steps=2", "logging_steps=2"]
    train_grpo(load_config(GRPOConfig, None, args))
    first = read_rows(run, "advantages")
    assert [r["step"] for r in first] == [1, 2, 3]  # one row per step
    train_grpo(load_config(GRPOConfig, None, [*args, "resume=true", "overwrite=true"]))  # step-2
    again = read_rows(run, "advantages")
    assert [r["step"] for r in again] == [1, 2, 3]  # step 3 truncated, written once more
    assert again == first  # resume is exact on CPU


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_pair_margins_are_the_losses_margins(loss: str) -> None:
    tok, model = build_tokenizer(), build_model("nano", seed=0)
    enable_packed_attention(model)
    pairs = encode_pairs("task:safety_pairs:size=5", tok, max_length=128).examples
    cfg = load_config(DPOConfig, None, ["model=tiny:nano", "data=x", f"loss={loss}",
                                        "precision=fp32", "batch_size=2"])
    ref = FrozenReference(model)  # a frozen copy
    collate = make_collate(torch.device("cpu"), None, kto=False)
    got = pair_margins(cfg, model, pairs, collate, ref if loss == "dpo" else None)
    assert len(got) == 5
    if loss == "dpo":  # the policy is its own reference: every log-ratio, so margin, is 0
        assert got == pytest.approx([0.0] * 5, abs=1e-5)
        return
    with torch.no_grad():  # SimPO: beta * (mean logp chosen - mean logp rejected) - gamma
        logps, n = sequence_logprobs(model, collate(pairs))
    avg = logps / n
    want = cfg.beta_value * (avg[0::2] - avg[1::2]) - cfg.simpo_gamma
    assert got == pytest.approx(want.tolist(), abs=1e-4)
