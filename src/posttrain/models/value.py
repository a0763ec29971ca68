"""The value model of PPO (the critic): a per-token scalar head on a transformer body.

A value model is the same architecture as a reward model, ``AutoModelForSequenceClassification``
with one label (body + linear ``score`` head), but read at *every* completion position
instead of only the last: ``V(s_t) = score(h_t)``, with ``h_t`` the hidden state of the
position that predicts completion token ``t`` (state = prompt + the tokens before ``t``).
So a value model saves and loads like a reward model, and it can start from one:

    load_value_model(rm_dir)        the reward model's body and head (its score is a good
                                    first guess of the return; the usual RLHF choice)
    load_value_model(policy_spec)   the policy's body and a fresh head

Forwards run over the rollout micro-batches of ``posttrain.rollout.scoring.build_batch``
(prefix-shared or padding-free packed rows). ``policy_logprobs_entropy`` is the policy-side
twin with a differentiable entropy, for PPO's entropy bonus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.config import LoraConfig
from posttrain.errors import ConfigError
from posttrain.models.attention import packed_kwargs
from posttrain.models.io import _tiny_size
from posttrain.models.lora import is_adapter_dir, save_pretrained_for_run
from posttrain.models.resolve import resolve_spec
from posttrain.models.reward import load_reward_model
from posttrain.rollout.scoring import enable_prefix_attention


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def completion_hidden(body: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Hidden states (M, d) at the positions predicting each real completion token, in
    ``batch["mask"]`` order, from one forward of ``body`` over the packed row."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"],
                              "position_ids": batch["position_ids"], "use_cache": False}
    if "prefix_layout" in batch:
        # As in rollout/scoring.py: a dummy 4D mask stops transformers building an N^2 one.
        kwargs["attention_mask"] = torch.ones(1, 1, 1, 1, dtype=torch.bool,
                                              device=batch["input_ids"].device)
        kwargs["prefix_layout"] = batch["prefix_layout"]
    else:
        kwargs.update(packed_kwargs(batch))
    hidden = body(**kwargs).last_hidden_state[0]  # (N, d)
    return hidden[batch["pred_pos"][batch["mask"]]]


def _scatter(mask: Tensor, flat: Tensor) -> Tensor:
    """(M,) values of the real tokens -> (Nc, L), 0 on padding."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


def token_values(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """``V(s_t)`` (Nc, L) fp32 for every completion token of a rollout micro-batch."""
    base = _base(model)
    body = getattr(base, base.base_model_prefix)
    v = base.score(completion_hidden(body, batch)).squeeze(-1).float()  # (M,)
    return _scatter(batch["mask"], v)


def completion_logits(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """A causal LM's fp32 logits (M, V) at the positions predicting each real completion
    token (``batch["mask"]`` order)."""
    base = _base(model)
    body = getattr(base, base.base_model_prefix)
    return base.get_output_embeddings()(completion_hidden(body, batch)).float()


def policy_logprobs_entropy(model: nn.Module, batch: dict[str, Any],
                            temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies (Nc, L) of ``softmax(logits / temperature)``, both with grad
    (``completion_logprobs`` detaches its entropy; the entropy bonus needs its gradient)."""
    logits = completion_logits(model, batch)  # (M, V)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    tok = logp_all.gather(-1, batch["targets"][batch["mask"]][:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return _scatter(batch["mask"], tok), _scatter(batch["mask"], ent)


def load_value_model(spec: str, tokenizer: Any, *, lora: LoraConfig | None = None,
                     adapter_dir: str | Path | None = None, trust_remote_code: bool = False,
                     seed: int = 0) -> nn.Module:
    """A value model from ``spec`` (a saved reward/value model, or a causal LM whose body gets
    a fresh head), on the policy's ``tokenizer``; with LoRA (``lora.r > 0``) the body is
    frozen and gets adapters while the head trains in full; ``adapter_dir`` resumes them."""
    # GGUF / pkg: policies -> their converted HF directory (tiny specs build in code).
    spec = spec if _tiny_size(spec) else resolve_spec(spec)
    model = load_reward_model(spec, trust_remote_code=trust_remote_code, seed=seed)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ConfigError(
            f"value model {spec!r} has {rows} token embeddings but the policy's tokenizer has "
            f"{len(tokenizer)} tokens: the value model must share the policy's tokenizer "
            "(value_model=policy always does)")
    model.config.pad_token_id = tokenizer.pad_token_id
    enable_prefix_attention(model)
    if adapter_dir is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    if lora is None or lora.r <= 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # SEQ_CLS keeps the 'score' head fully trainable (peft's modules_to_save).
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), bias="none",
                         task_type="SEQ_CLS")
    return get_peft_model(model, cfg)


def save_value_model(model: nn.Module, tokenizer: Any, path: str | Path,
                     merge: bool = False) -> Path:
    """Full weights (a sequence classifier HF loads), or under LoRA the adapter + head."""
    return save_pretrained_for_run(model, tokenizer, path, merge=merge)


def value_adapter_dir(path: str | Path) -> Path | None:
    """``path`` if it holds a saved adapter (a LoRA value model's checkpoint), else None."""
    return Path(path) if is_adapter_dir(path) else None
