"""LoRA: only adapters train, adapters save/load with peft, merge gives a plain model, resume is
exact, and the reference policy (adapters disabled) is the base model bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.algorithms.sft import SFTConfig, train_sft
from posttrain.config import load_config
from posttrain.data.batching import pack
from posttrain.data.chat import encode_row
from posttrain.errors import ConfigError
from posttrain.models.attention import enable_packed_attention
from posttrain.models.forward import _supports_logits_to_keep, target_logits
from posttrain.models.lora import (
    LoraConfig,
    apply_lora,
    reference_mode,
)
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.tasks.registry import build_task_rows
from posttrain.train.metrics import read_metrics


def _batch(n: int = 4) -> dict:
    tok = build_tokenizer()
    return pack([encode_row(tok, r, "messages") for r in build_task_rows("chat", size=n, seed=5)])


def _lora_model(r: int = 4) -> torch.nn.Module:
    model = build_model("nano", seed=1)
    enable_packed_attention(model)
    model = apply_lora(model, LoraConfig(r=r, alpha=8.0))
    with torch.no_grad():  # B starts at 0 (adapter = identity); make it matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_reference_mode_is_the_base_model_exactly():
    batch = _batch()
    base = build_model("nano", seed=1)
    enable_packed_attention(base)
    with torch.no_grad():
        want, targets = target_logits(base, batch)
    policy = _lora_model()
    assert _supports_logits_to_keep(policy)  # peft passes logits_to_keep/cu_seq_lens through
    policy.train()
    with reference_mode(policy) as ref:
        assert not ref.training  # base dropout off for pi_ref
        got, got_targets = target_logits(ref, batch)
    assert torch.equal(got, want) and torch.equal(got_targets, targets)
    assert not got.requires_grad and policy.training  # no graph, and train mode restored
    # The adapters are back on afterwards, and they do change the logits.
    assert not torch.allclose(target_logits(policy, batch)[0], want, atol=1e-3)
    with pytest.raises(ValueError, match="LoRA"), reference_mode(base):
        pass


def test_only_lora_parameters_train():
    policy = _lora_model()
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and trainable < total / 5
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    logits, targets = target_logits(policy, _batch())
    torch.nn.functional.cross_entropy(logits, targets).backward()
    torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2).step()
    for n, p in policy.named_parameters():
        assert torch.equal(p, before[n]) != ("lora_" in n), n


def test_unknown_target_module_is_a_config_error():
    with pytest.raises(ConfigError, match="q_proj"):
        apply_lora(build_model("nano"), LoraConfig(r=4, target_modules=["attn_qkv"]))


def _run(out: Path, data: Path, *extra: str) -> Path:
    cfg = load_config(SFTConfig, None, [
        "model=tiny:nano", f"data={data}", f"output_dir={out}", "batch_size=8", "lr=2e-2",
        "lora.r=8", "lora.alpha=16", "seed=3", "max_length=128", *extra])
    return train_sft(cfg)


def test_lora_sft_learns_saves_adapter_and_merged_model(tmp_path, chat_jsonl):
    final = _run(tmp_path / "run", chat_jsonl, "max_steps=12", "lora.merge=true")
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if "train/loss" in r]
    # A random-init base only lets the adapters learn the byte statistics (ln 256 = 5.55 -> ~5.2).
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses
    # merge=true: final/ is a plain model; the adapter sits in final/adapter.
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora" in k for k in load_file(final / "model.safetensors"))
    adapted = PeftModel.from_pretrained(build_model("nano", seed=3), final / "adapter").eval()
    ids = torch.tensor([build_tokenizer().encode("<|im_start|>user\nhello<|im_end|>\n")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
        base_logits = build_model("nano", seed=3).eval()(ids).logits
    assert not torch.allclose(merged(ids).logits, base_logits, atol=1e-3)  # training did something
    # Non-target weights are the base's.
    base_sd = build_model("nano", seed=3).state_dict()
    merged_sd = merged.state_dict()
    assert torch.equal(merged_sd["model.layers.0.mlp.up_proj.weight"],
                       base_sd["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(merged_sd["model.layers.0.self_attn.q_proj.weight"],
                           base_sd["model.layers.0.self_attn.q_proj.weight"])


def test_lora_checkpoint_is_an_adapter_and_resume_is_exact(tmp_path, chat_jsonl):
    run = tmp_path / "run"
    final = _run(run, chat_jsonl, "max_steps=8", "save_steps=4")
    assert (run / "checkpoints" / "step-4" / "model" / "adapter_config.json").exists()
    assert not (run / "checkpoints" / "step-4" / "model" / "model.safetensors").exists()
    PeftModel.from_pretrained(build_model("nano", seed=3), final)  # final/ loads with peft
    want = load_file(final / "adapter_model.safetensors")
    shutil.rmtree(final)  # as if killed after the step-4 checkpoint
    resumed = _run(run, chat_jsonl, "max_steps=8", "save_steps=4", "resume=true")
    got = load_file(resumed / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
