"""The completion forward: one pass of a model over a rollout micro-batch, read at the
positions that predict each completion token (DESIGN.md §5.5).

Batches come from ``posttrain.rollout.batching.build_batch``: one packed row, prefix-shared
(``prefix_layout``: each group's prompt computed once) or padding-free (``cu_seq_lens``).
``pred_pos`` (Nc, L) holds the row position whose output predicts each completion token and
``mask`` (Nc, L) marks the real ones; ``M`` is their number.

    completion_hidden    (M, d)  the body's hidden states there
    completion_logits    (M, V)  a causal LM's head over them, fp32
    completion_logprobs  (Nc, L) log-probs of the completion tokens (+ entropy)
    token_values         (Nc, L) a value model's V(s_t) (a sequence classifier's score head)

Every consumer (GRPO and PPO training, PPO's value model, KL evaluation) calls these, so
the forward exists once. Notation: ``Nc`` completions, ``L`` the longest, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from posttrain.models.attention import packed_kwargs
from posttrain.models.prefix import prefix_forward_kwargs

Entropy = Literal["none", "detached", "grad"]


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under DDP (calls of its body run DDP's hooks,
    ``train/distributed.py``) and peft."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def completion_hidden(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Hidden states (M, d) of the body of ``model`` (a causal LM or a sequence classifier)
    at the positions predicting each real completion token, in ``batch["mask"]`` order."""
    base = _base(model)
    body = getattr(base, base.base_model_prefix)
    hidden = body(**_forward_kwargs(batch)).last_hidden_state[0]  # (N, d)
    return hidden[batch["pred_pos"][batch["mask"]]]


def _forward_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    if "prefix_layout" in batch:
        return prefix_forward_kwargs(batch)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "use_cache": False, **packed_kwargs(batch)}


def _data_parallel(model: nn.Module) -> bool:
    """DDP- or FSDP2-wrapped: their hooks (gradient sync, weight gathering) run on the whole
    model's forward, not on a call of its body alone."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, FSDPModule | DistributedDataParallel)


def completion_logits(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """A causal LM's fp32 logits (M, V) at the positions predicting each completion token."""
    if _data_parallel(model):  # the same head over the same rows, via the model's forward
        rows = batch["pred_pos"][batch["mask"]]
        return model(**_forward_kwargs(batch), logits_to_keep=rows).logits[0].float()
    return _base(model).get_output_embeddings()(completion_hidden(model, batch)).float()


def _scatter(mask: Tensor, flat: Tensor) -> Tensor:
    """(M,) values of the real tokens -> (Nc, L), 0 on padding."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


def completion_logprobs(model: nn.Module, batch: dict[str, Any], temperature: float = 1.0,
                        entropy: Entropy = "none") -> tuple[Tensor, Tensor | None]:
    """Log-probs (Nc, L) of each completion token under ``softmax(logits / temperature)``
    (0 on padding), and the per-token entropy (Nc, L) of that distribution: ``"none"``,
    ``"detached"`` (a metric), or ``"grad"`` (PPO's entropy bonus differentiates it).

    The temperature matches the sampler's, so on the sampling policy these equal the
    sampler's log-probs when top-k/top-p are off. Without a differentiable entropy the
    log-probs take ``logits[target] - logsumexp(logits)`` (no (M, V) log-softmax tensor for
    the backward to keep); with one, both come from one log-softmax.
    """
    logits = completion_logits(model, batch)  # (M, V)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    mask, targets = batch["mask"], batch["targets"][batch["mask"]][:, None]  # (M, 1)
    if entropy == "grad":
        logp_all = torch.log_softmax(logits, dim=-1)
        tok = logp_all.gather(-1, targets).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return _scatter(mask, tok), _scatter(mask, ent)
    logz = torch.logsumexp(logits, dim=-1)
    logp = _scatter(mask, logits.gather(-1, targets).squeeze(-1) - logz)
    if entropy == "none":
        return logp, None
    with torch.no_grad():
        ent = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, torch.zeros_like(logp).masked_scatter(mask, ent)


def token_values(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """``V(s_t)`` (Nc, L) fp32 of a value model (``score`` head read at every completion
    position) for every completion token."""
    v = _base(model).score(completion_hidden(model, batch)).squeeze(-1).float()  # (M,)
    return _scatter(batch["mask"], v)
