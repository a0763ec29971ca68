"""The value model of PPO (the critic): a per-token scalar head on a transformer body.

A value model is the same architecture as a reward model, ``AutoModelForSequenceClassification``
with one label (body + linear ``score`` head), but read at *every* completion position
instead of only the last: ``V(s_t) = score(h_t)``, with ``h_t`` the hidden state of the
position that predicts completion token ``t`` (state = prompt + the tokens before ``t``).
So a value model saves and loads like a reward model, and it can start from one:

    load_value_model(rm_dir)        the reward model's body and head (its score is a good
                                    first guess of the return; the usual RLHF choice)
    load_value_model(policy_spec)   the policy's body and a fresh head
    load_value_model(saved, tok, require_head=True)
                                    a saved value model whose head must be there (resuming);
                                    a checkpoint without one is an error, not a random head

Its forward over rollout micro-batches is ``models.completion.token_values``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from posttrain.errors import ConfigError
from posttrain.models.lora import LoraConfig, is_adapter_dir
from posttrain.models.prefix import enable_prefix_attention
from posttrain.models.reward import load_reward_model


def load_value_model(spec: str, tokenizer: Any, *, lora: LoraConfig | None = None,
                     adapter_dir: str | Path | None = None, trust_remote_code: bool = False,
                     seed: int = 0, require_head: bool = False) -> nn.Module:
    """A value model from ``spec`` (a saved reward/value model, or a causal LM whose body gets
    a fresh head), on the policy's ``tokenizer``; with LoRA (``lora.r > 0``) the body is
    frozen and gets adapters while the head trains in full; ``adapter_dir`` resumes them.
    ``require_head``: ``spec`` must carry a trained head (see ``load_reward_model``)."""
    model = load_reward_model(spec, trust_remote_code=trust_remote_code, seed=seed,
                              require_head=require_head, role="value")
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


def value_adapter_dir(path: str | Path) -> Path | None:
    """``path`` if it holds a saved adapter (a LoRA value model's checkpoint), else None."""
    return Path(path) if is_adapter_dir(path) else None
