"""Scalar-head reward models: load from a causal-LM checkpoint, score packed batches, save.

A reward model is ``AutoModelForSequenceClassification`` with one label: the causal LM's body
plus a linear ``score`` head. HF's own forward reads the reward at the *last non-pad token*,
found by searching ``input_ids`` for ``pad_token_id``; that breaks on packed rows (no
padding, several sequences per row) and on tokenizers whose pad token is also the
end-of-turn token (SmolLM2 after ``pad = eos``: the search stops early). ``sequence_rewards``
avoids both: it runs the body once over the packed row with varlen attention and applies the
head at each sequence's known last position (from ``cu_seq_lens``, or the attention mask
for padded batches).

A checkpoint without a saved ``score`` head (a plain causal LM) loads with a *random* head;
``require_head=True`` makes that an error wherever a trained reward model is expected
(scoring rewards, evaluating), so a wrong path never trains a policy against noise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

from posttrain.data.batching import move_batch, pack
from posttrain.data.pairs import Pair
from posttrain.errors import PosttrainError
from posttrain.models import tiny
from posttrain.models.attention import packed_kwargs
from posttrain.models.io import _not_found_message, _tiny_size
from posttrain.models.lora import is_adapter_dir
from posttrain.models.resolve import resolve_spec

log = logging.getLogger("posttrain")


def load_reward_model(
    spec: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
    seed: int = 0, require_head: bool = False, role: str = "reward",
) -> nn.Module:
    """A one-label sequence classifier from a saved RM, or from a causal LM (new random head).

    ``tiny`` / ``tiny:SIZE`` builds the tiny Llama's body from ``seed`` with a fresh head.
    ``require_head``: the caller needs a *trained* head (it scores with it); a checkpoint
    without one raises a PosttrainError naming ``spec`` (``role`` words that message).
    Otherwise a new head is expected, and transformers' "score.weight MISSING" report is
    silenced (its other load warnings are kept).
    """
    size = _tiny_size(spec)
    if size:
        if require_head:
            raise PosttrainError(_no_head_message(spec, role))
        causal = tiny.build_model(size, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForSequenceClassification(_one_label(causal.config))
        model.model.load_state_dict(causal.model.state_dict())
        return model.to(dtype)
    path = resolve_spec(spec)  # clear errors for missing dirs, offline hub ids; GGUF -> dir
    try:
        model, missing = _load_classifier(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PosttrainError(_not_found_message(spec, e)) from None
    # An adapter dir's base load always lacks the head; the adapter may carry it.
    if require_head and missing and not is_adapter_dir(path):
        raise PosttrainError(_no_head_message(spec, role))
    _one_label(model.config)
    return model


def _no_head_message(spec: str, role: str) -> str:
    todo = ("train one with posttrain rm, or pass a reward model directory (an rm run's final/)"
            if role == "reward" else
            "pass a saved value or reward model directory, or value_model=policy for a new head")
    return f"model '{spec}' has no trained {role} head (score.weight missing): {todo}"


def _load_classifier(path: str, **kwargs: Any) -> tuple[nn.Module, set[str]]:
    """(model, head keys missing from the checkpoint). transformers' "LOAD REPORT" warning is
    held back and re-emitted only when it says more than "new score head"."""
    logger = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in str(record.msg):
            return True
        held.append(record)
        return False

    logger.addFilter(hold)
    info = None
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, attn_implementation="sdpa", output_loading_info=True, **kwargs)
    finally:
        logger.removeFilter(hold)
        for record in held if info is None or not _only_new_head(info) else ():
            logger.handle(record)
    return model, {k for k in info["missing_keys"] if _is_head_key(k)}


def _is_head_key(key: str) -> bool:
    return key.split(".", 1)[0] == "score"


def _only_new_head(info: dict[str, Any]) -> bool:
    """Whether the load report says nothing beyond "new head, LM head dropped": the expected
    outcome of loading a causal LM as a classifier."""
    return (all(_is_head_key(k) for k in info["missing_keys"])
            and all(k.split(".", 1)[0] == "lm_head" for k in info["unexpected_keys"])
            and not info["mismatched_keys"])


def _one_label(config: Any) -> Any:
    config.num_labels = 1
    config.problem_type = "regression"
    # HF's forward needs a pad id for batch > 1; the tokenizer's pad id is set by the caller.
    if config.pad_token_id is None:
        config.pad_token_id = 0
    return config


def _head_and_body(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):  # its body calls run DDP's hooks
        model = model.module
    head = getattr(model, "score", None)
    body = getattr(model, model.base_model_prefix, None)
    if head is None or body is None:
        raise PosttrainError(
            f"{type(model).__name__}: reward models need a body + 'score' head "
            "(Llama, Qwen, Mistral, Gemma ... sequence classifiers)"
        )
    return head, body


def last_positions(batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(row, column) of each sequence's last token, for packed or padded batches."""
    cu = batch.get("cu_seq_lens")
    if cu is not None:
        cols = cu[1:] - 1
        return torch.zeros_like(cols), cols
    lengths = batch["attention_mask"].sum(-1)  # right padding
    return torch.arange(lengths.numel(), device=lengths.device), lengths - 1


def sequence_rewards(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Scalar reward of every sequence in ``batch`` -> (B,), head applied at last tokens."""
    head, body = _head_and_body(model)
    hidden = body(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"), use_cache=False, **packed_kwargs(batch),
    ).last_hidden_state  # (B_rows, T, H)
    rows, cols = last_positions(batch)
    return head(hidden[rows, cols]).squeeze(-1).float()  # (B,)


def score_pairs(model: nn.Module, pairs: Sequence[Pair], batch_size: int = 64) -> Tensor:
    """Rewards (P, 2) of (chosen, rejected) for each pair, in order. Call
    ``enable_packed_attention(model)`` first: batches are packed rows."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        seqs = [s for p in pairs[i : i + batch_size] for s in (p.a, p.b)]
        with torch.no_grad():
            out.append(sequence_rewards(model, move_batch(pack(seqs), device)).cpu())
    return torch.cat(out).reshape(-1, 2)
