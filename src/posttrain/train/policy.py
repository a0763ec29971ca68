"""The policy a training run starts from: the config's model, or a checkpoint's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.models.attention import enable_packed_attention
from posttrain.models.device import pick_device
from posttrain.models.io import load_model, load_tokenizer, resize_for_tokenizer
from posttrain.models.lora import apply_lora, is_adapter_dir
from posttrain.train import checkpoint as ckpt
from posttrain.train.config import TrainConfig


def load_policy(cfg: TrainConfig, resume_from: Path | None) -> tuple[Any, Any]:
    """(model, tokenizer) from the config's spec, or from the checkpoint when resuming (a
    sharded checkpoint's weights are loaded into the sharded model by ``Engine.restore``:
    here the starting model, of the same shapes)."""
    # Under LoRA a checkpoint holds only the adapter: resume = base from cfg.model + adapter.
    if resume_from is not None and ckpt.is_sharded(resume_from):
        resume_from = None
    saved = resume_from / "model" if resume_from is not None else None
    adapter = saved if saved is not None and is_adapter_dir(saved) else None
    spec = str(saved) if saved is not None and adapter is None else cfg.model
    tokenizer = load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)
    model = load_model(spec, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    resize_for_tokenizer(model, tokenizer)
    enable_packed_attention(model)
    model = apply_lora(model, cfg.lora, adapter_dir=adapter)  # unchanged when lora.r == 0
    return model.to(pick_device()), tokenizer
