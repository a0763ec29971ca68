"""``compile=true``: the decoder layers' training forward runs through torch.compile, and
gives the eager step's loss and gradients; forwards without gradients stay eager."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import posttrain.models.compile as compile_mod
from posttrain.algorithms.sft import count_targets, sft_step
from posttrain.data.batching import pack
from posttrain.data.chat import encode_row
from posttrain.models.attention import enable_packed_attention
from posttrain.models.compile import compile_decoder_layers
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.tasks.registry import build_task_rows
from posttrain.train.metrics import read_metrics


def _batch():
    tok = build_tokenizer()
    return pack([encode_row(tok, r, "messages") for r in build_task_rows("chat", size=6, seed=3)])


def _step(model: torch.nn.Module, batch: dict) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = sft_step(model, batch, float(count_targets(batch)))
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def test_compiled_step_equals_eager_step():
    batch = _batch()
    eager, compiled = build_model("nano", seed=1), build_model("nano", seed=1)
    for m in (eager, compiled):
        enable_packed_attention(m)
        m.train()
    assert compile_decoder_layers(compiled) == compiled.config.num_hidden_layers
    assert compile_decoder_layers(compiled) == 0  # idempotent
    loss_e, grads_e = _step(eager, batch)
    loss_c, grads_c = _step(compiled, batch)
    # fp32; inductor fuses and reorders the elementwise chains, nothing else changes
    assert abs(loss_c - loss_e) < 1e-5 * abs(loss_e)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)


def test_only_training_forwards_take_the_compiled_layer(monkeypatch):
    calls: list[bool] = []

    def fake_compile(fn, dynamic):  # noqa: ANN001, ANN202
        assert dynamic
        return lambda *a, **k: calls.append(torch.is_grad_enabled()) or fn(*a, **k)

    monkeypatch.setattr(compile_mod.torch, "compile", fake_compile)
    model = build_model("nano", seed=1)
    enable_packed_attention(model)
    layers = compile_decoder_layers(model)
    batch = _batch()
    model.train()
    _step(model, batch)
    assert calls == [True] * layers
    calls.clear()
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:, :8])
    model.eval()
    model.generate(batch["input_ids"][:, :8], max_new_tokens=3, do_sample=False)
    assert calls == []  # log-prob passes and decoding run the eager layers


def test_sft_cli_with_compile_learns(tmp_path: Path, chat_jsonl: Path):
    cmd = [sys.executable, "-m", "posttrain.cli", "sft", "model=tiny:nano", f"data={chat_jsonl}",
           f"output_dir={tmp_path}", "max_steps=30", "batch_size=8", "lr=3e-3", "compile=true"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "metrics.jsonl")
              if "train/loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert any(tmp_path.glob("**/model.safetensors"))  # saved like an eager run


def test_grpo_first_step_compiled_equals_eager(tmp_path: Path, monkeypatch):
    """GRPO (prefix-shared training forward, eager sampling): the same rollouts, and the
    compiled first update's loss and gradient norm equal the eager one's."""
    from posttrain.algorithms.grpo import GRPOConfig, train_grpo
    from posttrain.config import load_config
    from posttrain.rewards import registry

    def digit_frac(prompts, completions, **columns):  # noqa: ANN001, ANN003, ANN202
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    monkeypatch.setitem(registry.REWARDS, "digit_frac", lambda: digit_frac)
    firsts = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        train_grpo(load_config(GRPOConfig, None, [
            "model=tiny:nano", "data=task:arithmetic:size=64", f"output_dir={out}",
            "max_steps=1", "prompts_per_step=4", "num_generations=4", "max_new_tokens=8",
            "lr=3e-3", "rewards=[digit_frac]", "precision=fp32", f"compile={flag}"]))
        firsts.append([r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r][0])
    eager, compiled = firsts
    assert eager["reward/mean"] == compiled["reward/mean"] and eager["train/grad_norm"] > 0
    loss_e, loss_c = eager["train/loss"], compiled["train/loss"]
    assert abs(loss_c - loss_e) < 1e-5 + 1e-4 * abs(loss_e)
    assert abs(compiled["train/grad_norm"] / eager["train/grad_norm"] - 1) < 1e-4
