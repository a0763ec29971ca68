"""The frozen reference policy pi_ref that PPO and GRPO regularise towards (the DPO family
wraps ``load_frozen_model`` in its cached-log-prob references, ``models/logprobs.py``).

Under LoRA the reference is the policy itself with its adapters switched off (no second copy
of the weights: ``models.lora.reference_mode``); under full fine-tuning it is a frozen copy of
the starting model, loaded once with the attention posttrain's packed and prefix-shared
forwards need.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from posttrain.models.attention import enable_packed_attention
from posttrain.models.io import load_model
from posttrain.models.lora import has_lora, reference_mode
from posttrain.models.prefix import enable_prefix_attention


def load_frozen_model(spec: str, device: torch.device, *, trust_remote_code: bool = False,
                      seed: int = 0, prefix: bool = True) -> tuple[nn.Module, bool]:
    """A frozen (no grad, eval) causal LM from ``spec`` on ``device`` with packed (varlen)
    attention, and with ``prefix`` the prefix-sharing one; returns it and whether it can
    share prefixes (False for flash/flex implementations)."""
    model = load_model(spec, trust_remote_code=trust_remote_code, seed=seed)
    enable_packed_attention(model)
    can_share = prefix and enable_prefix_attention(model)
    return model.requires_grad_(False).eval().to(device), can_share


def load_reference(policy: nn.Module, spec: str, device: torch.device, *,
                   trust_remote_code: bool = False, seed: int = 0) -> nn.Module | None:
    """The reference for ``policy``: None under LoRA (use ``reference_policy``, which turns
    the adapters off), else a frozen copy of the model ``spec``."""
    if has_lora(policy):
        return None
    return load_frozen_model(spec, device, trust_remote_code=trust_remote_code, seed=seed)[0]


@contextmanager
def reference_policy(policy: nn.Module, frozen: nn.Module | None) -> Iterator[nn.Module]:
    """Inside the block, the model that computes pi_ref, without grad: ``frozen`` if given,
    else ``policy`` with its LoRA adapters off (see ``load_reference``)."""
    if frozen is not None:
        with torch.no_grad():
            yield frozen
        return
    with reference_mode(policy) as ref:
        yield ref
