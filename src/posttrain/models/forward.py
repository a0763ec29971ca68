"""Model forwards that project the LM head only where a loss needs it (DESIGN.md §5.5)."""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from posttrain.models.attention import packed_kwargs


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/FSDP (``.module``) and peft (``get_base_model()``)."""
    while True:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else None  # peft
        if inner is None and isinstance(getattr(model, "module", None), nn.Module):  # DDP
            inner = model.module
        if inner is None or inner is model:
            return model
        model = inner


def _supports_logits_to_keep(model: nn.Module) -> bool:
    # Wrappers (peft, DDP) forward **kwargs to the HF model, so ask the model they wrap.
    fwd = getattr(unwrap_model(model), "forward", None)
    return fwd is not None and "logits_to_keep" in inspect.signature(fwd).parameters


def target_logits(model: nn.Module, batch: dict, upcast: bool = True) -> tuple[Tensor, Tensor]:
    """Logits at target positions and their targets.

    ``batch`` follows ``posttrain.data.batching``: ``input_ids`` (B, T), ``position_ids``
    (B, T), optional ``attention_mask`` (B, T) (absent for packed rows, which carry
    ``cu_seq_lens`` for varlen attention instead), ``labels`` (B, T)
    already shifted (-100 = no target). Returns fp32 ``logits`` (N, V) and ``targets`` (N,)
    for the N positions with a label, in row-major order.

    The logits are cast to fp32 here (under bf16 autocast the head emits bf16): every loss
    takes its log-softmax in fp32 anyway, and metrics such as argmax then run on fp32 too
    (a bf16 argmax over (N, 49k) on CPU costs ~3x the fp32 one). ``upcast=False`` returns
    the head's own dtype instead, for a loss that upcasts chunk by chunk itself
    (``posttrain.losses.sft``: the (N, V) fp32 copy and its backward cast are ~10% of a
    SmolLM2 SFT step on CPU).
    """
    labels = batch["labels"]
    keep = labels != -100  # (B, T)
    kwargs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": batch.get("attention_mask"),
        "use_cache": False,
        **packed_kwargs(batch),
    }
    if _supports_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=keep).logits
        logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    else:
        logits = model(**kwargs).logits[keep]  # (N, V)
    return (logits.float() if upcast else logits), labels[keep]
