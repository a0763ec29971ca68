"""LoRA adapters (peft) and the reference policy as "the base with adapters disabled".

LoRA (Hu et al. 2021) freezes the base weight W and learns a low-rank update:
``h = W x + (alpha / r) * B A x`` with A (r, d_in), B (d_out, r), B initialised to zero, so a
fresh adapter starts as the base model exactly.

Under LoRA the frozen base *is* the reference policy pi_ref that DPO/PPO/GRPO regularise
towards, so :func:`reference_mode` computes it by switching the adapters off inside one model:
no second copy of the weights in memory. Full fine-tuning still needs a separate reference
model (``models/reference.py`` picks one or the other).

Run directories: checkpoints hold the adapter (``adapter_config.json``,
``adapter_model.safetensors``) plus the tokenizer; ``final/`` holds the adapter too, or with
``lora.merge=true`` the merged full model (plain transformers loads it) and the adapter in
``final/adapter/``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from posttrain.config.checks import Needs
from posttrain.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraConfig:
    """Low-rank adapters; ``r: 0`` trains the full model instead."""

    RANGES: ClassVar[dict[str, str]] = {"r": ">= 0", "alpha": "> 0", "dropout": "[0, 1)"}
    # Without r every other key is ignored and the run silently fine-tunes the full model.
    ONLY_WITH: ClassVar[dict[str, Needs]] = {
        key: Needs("r", ">= 1", "LoRA is off; set lora.r to turn it on")
        for key in ("alpha", "dropout", "target_modules", "merge")
    }

    r: int = field(default=0, metadata={"help": "LoRA rank; 0 = LoRA off (full fine-tuning)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (scale = alpha/r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "names of the linear layers that get adapters"},
    )
    merge: bool = field(
        default=False, metadata={"help": "merge adapters into the base weights in final/"}
    )

    def validate(self) -> None:
        if self.r > 0 and not self.target_modules:
            raise ConfigError("lora.target_modules is empty but lora.r > 0 asks for LoRA")


def _peft_model(model: nn.Module) -> Any | None:
    """The PeftModel inside ``model`` (itself, or under a DDP ``.module``), else None."""
    from peft import PeftModel

    while not isinstance(model, PeftModel):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


def has_lora(model: nn.Module) -> bool:
    return _peft_model(model) is not None


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a saved peft adapter (rather than a full model)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, cfg: LoraConfig, adapter_dir: str | Path | None = None):  # noqa: ANN201
    """Wrap ``model`` with trainable LoRA adapters (base frozen); ``cfg.r == 0`` returns it as is.

    ``adapter_dir`` resumes a saved adapter (its own rank/targets win over ``cfg``'s).
    Forward kwargs (``logits_to_keep``, ``cu_seq_lens_q``...) pass through peft unchanged.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    if cfg.r <= 0:
        return model
    available = _linear_names(model)
    missing = [t for t in cfg.target_modules if t not in available]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {missing} not found in the model; its linear layers are "
            f"{available}"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def save_pretrained_for_run(model: nn.Module, tokenizer: Any, path: str | Path,
                            merge: bool = False) -> Path:
    """Save into ``path``: the full model, or under LoRA the adapter (``merge`` -> merged model).

    Merging works on a copy, so the live model keeps training with its adapters afterwards.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    peft_model = _peft_model(model)
    if peft_model is None:
        model.save_pretrained(out, safe_serialization=True)
    elif merge:
        merged = copy.deepcopy(peft_model).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        peft_model.save_pretrained(out / "adapter", safe_serialization=True)
        del merged
    else:
        peft_model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ---- the reference policy ------------------------------------------------------------------


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model`` computes pi_ref: base weights, adapters off, no grad, eval.

    Raises ``ValueError`` for a model without adapters: full fine-tuning changes the base
    weights themselves, so its reference must be a separate (frozen) model.
    """
    peft_model = _peft_model(model)
    if peft_model is None:
        raise ValueError("reference_mode needs a LoRA model; under full fine-tuning pass a "
                         "separate reference model")
    was_training = model.training
    model.eval()  # LoRA dropout is bypassed anyway; base dropout must be off for pi_ref
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            yield model
    finally:
        model.train(was_training)
