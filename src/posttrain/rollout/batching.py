"""Log-probs of rollouts under a model, for the training forward (DESIGN.md §5.1-5.2).

A GRPO group is one prompt and its G completions. With ``prefix_sharing`` the group is packed
as one segment ``[prompt, c_1, ..., c_G]`` and the prompt's tokens go through the model once:

    position ids   0..P-1 | P..P+L_1-1 | P..P+L_2-1 | ...
    prompt tokens  attend causally among themselves
    c_j's tokens   attend to the prompt's keys/values, then causally to c_j's own

This is exact (the same attention each completion would see in its own forward), and it
saves (G-1) * P tokens of every projection and MLP. The attention is a custom attention
function (``prefix_attention_forward``): two batched SDPA calls per layer, one for all
prompts and one for all completions, each completion's keys being its prompt's keys
concatenated with its own (``posttrain.models.prefix``, shared with the DPO family's pair
forward). Without prefix sharing, each completion is packed padding-free
as ``prompt + completion`` and runs through the varlen path of ``models/attention.py``.

Only the positions that predict a completion token are projected through the LM head.
Notation: ``Ng`` groups, ``Nc`` completions, ``N`` packed tokens, ``P``/``L`` padded prompt and
completion lengths, ``H`` heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.models.attention import packed_kwargs
from posttrain.models.prefix import (  # noqa: F401  (re-exported: this module's public API)
    PREFIX_ATTENTION,
    PrefixLayout,
    build_layout,
    enable_prefix_attention,
    pad_rows,
    prefix_attention_forward,
    prefix_forward_kwargs,
)

# (prompt ids, [completion ids, ...]) for one group.
Group = tuple[Sequence[int], Sequence[Sequence[int]]]


def build_batch(groups: Sequence[Group], prefix_sharing: bool = True) -> dict[str, Any]:
    """Pack groups into one row (no padding) plus what ``completion_logprobs`` needs.

    Returns ``input_ids``/``position_ids`` (1, N); ``pred_pos`` (Nc, L) the row position whose
    logits predict each completion token; ``targets`` (Nc, L); ``mask`` (Nc, L) bool (real
    completion tokens); ``prefix_layout`` or ``cu_seq_lens``; ``num_tokens`` (N),
    ``num_sequences`` (Nc), ``num_completion_tokens``.
    """
    ids: list[int] = []
    pos: list[int] = []
    pred: list[list[int]] = []
    targets: list[list[int]] = []
    if prefix_sharing:
        prompt_rows, comp_rows, comp_group = [], [], []
        for g, (prompt, comps) in enumerate(groups):
            P, start = len(prompt), len(ids)
            prompt_rows.append(list(range(start, start + P)))
            ids += prompt
            pos += range(P)
            for c in comps:
                s = len(ids)
                comp_rows.append(list(range(s, s + len(c))))
                comp_group.append(g)
                pred.append([start + P - 1] + comp_rows[-1][:-1])
                targets.append(list(c))
                ids += c
                pos += range(P, P + len(c))
        layout = build_layout(prompt_rows, comp_rows, comp_group, len(ids))
        batch: dict[str, Any] = {"prefix_layout": layout}
    else:
        cu = [0]
        for prompt, comps in groups:
            for c in comps:
                s, P = len(ids), len(prompt)
                ids += [*prompt, *c]
                pos += range(P + len(c))
                pred.append(list(range(s + P - 1, s + P - 1 + len(c))))
                targets.append(list(c))
                cu.append(len(ids))
        batch = {"cu_seq_lens": torch.tensor(cu)}
    lengths = torch.tensor([len(t) for t in targets])
    batch.update({
        "input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
        "pred_pos": pad_rows(pred), "targets": pad_rows(targets),
        "mask": torch.arange(lengths.max())[None, :] < lengths[:, None],
        "num_tokens": len(ids), "num_sequences": len(targets),
        "num_completion_tokens": int(lengths.sum()),
    })
    return batch


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def completion_logprobs(
    model: nn.Module, batch: dict[str, Any], temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (Nc, L) of each completion token under ``softmax(logits / temperature)``
    (0 on padding), and optionally the per-token entropy (Nc, L) of that distribution
    (detached). The temperature matches the sampler's, so on the sampling policy these
    equal the sampler's log-probs when top-k/top-p are off."""
    decoder, head = _decoder_and_head(model)
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"],
                              "position_ids": batch["position_ids"], "use_cache": False}
    if "prefix_layout" in batch:
        kwargs = prefix_forward_kwargs(batch)
    else:
        kwargs.update(packed_kwargs(batch))
    hidden = decoder(**kwargs).last_hidden_state[0]  # (N, d_model)
    mask = batch["mask"]
    logits = head(hidden[batch["pred_pos"][mask]]).float()  # (M, V), M real completion tokens
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    tok_logp = logits.gather(-1, batch["targets"][mask][:, None]).squeeze(-1) - logz  # (M,)
    logp = torch.zeros(mask.shape, dtype=tok_logp.dtype, device=tok_logp.device)
    logp = logp.masked_scatter(mask, tok_logp)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            ent = logz - (probs * logits).sum(-1)
            entropy = torch.zeros_like(logp).masked_scatter(mask, ent)
    return logp, entropy
