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
concatenated with its own. Without prefix sharing, each completion is packed padding-free
as ``prompt + completion`` and runs through the varlen path of ``models/attention.py``.

Only the positions that predict a completion token are projected through the LM head.
Notation: ``Ng`` groups, ``Nc`` completions, ``N`` packed tokens, ``P``/``L`` padded prompt and
completion lengths, ``H`` heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from posttrain.models.attention import packed_attention_forward, packed_kwargs

PREFIX_ATTENTION = "posttrain_prefix"

# (prompt ids, [completion ids, ...]) for one group.
Group = tuple[Sequence[int], Sequence[Sequence[int]]]


@dataclass
class PrefixLayout:
    """Index tensors of a prefix-shared packed row (built once per micro-batch)."""

    prompt_idx: Tensor  # (Ng, P) row position of each prompt token (padding -> 0)
    prompt_mask: Tensor  # (Ng, 1, P, P) bool: causal, real keys only
    comp_idx: Tensor  # (Nc, L) row position of each completion token (padding -> 0)
    kv_idx: Tensor  # (Nc, P + L) row positions of each completion's keys: prompt, then own
    comp_mask: Tensor  # (Nc, 1, L, P + L) bool
    inverse: Tensor  # (N,) where each row position sits in cat(prompt outputs, comp outputs)

    def to(self, device: torch.device) -> PrefixLayout:
        return PrefixLayout(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def prefix_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
    attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """query (1, H, N, D), key/value (1, H_kv, N, D) -> (1, N, H, D). Any forward without a
    ``prefix_layout`` kwarg goes to the varlen/SDPA path unchanged."""
    lay: PrefixLayout | None = kwargs.pop("prefix_layout", None)
    if lay is None:
        return packed_attention_forward(module, query, key, value, attention_mask,
                                        dropout=dropout, scaling=scaling, **kwargs)
    q, k, v = query[0], key[0], value[0]  # (H, N, D), (H_kv, N, D)
    gqa = q.shape[0] != k.shape[0]
    sdpa = lambda qq, kk, vv, m: F.scaled_dot_product_attention(  # noqa: E731
        qq, kk, vv, attn_mask=m, scale=scaling, enable_gqa=gqa)
    bhld = lambda x, idx: x[:, idx].transpose(0, 1)  # (H, N, D) -> (B, H, len, D)  # noqa: E731
    out_p = sdpa(bhld(q, lay.prompt_idx), bhld(k, lay.prompt_idx), bhld(v, lay.prompt_idx),
                 lay.prompt_mask)  # (Ng, H, P, D)
    out_c = sdpa(bhld(q, lay.comp_idx), bhld(k, lay.kv_idx), bhld(v, lay.kv_idx),
                 lay.comp_mask)  # (Nc, H, L, D)
    real_p = lay.prompt_mask[:, 0].diagonal(dim1=-2, dim2=-1)  # (Ng, P) a real token sees itself
    real_c = lay.comp_mask[:, 0, :, lay.prompt_idx.shape[1]:].diagonal(dim1=-2, dim2=-1)
    flat = torch.cat([out_p.transpose(1, 2)[real_p], out_c.transpose(1, 2)[real_c]])  # (N, H, D)
    return flat[lay.inverse].unsqueeze(0), None


def enable_prefix_attention(model: nn.Module) -> bool:
    """Switch an sdpa/eager/varlen model to the prefix-sharing attention (a superset of the
    varlen one). Returns False (and changes nothing) for flash/flex implementations."""
    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX_ATTENTION, sdpa_mask)
    current = getattr(model.config, "_attn_implementation", None)
    if current not in ("sdpa", "eager", "posttrain_packed", PREFIX_ATTENTION):
        return False
    model.set_attn_implementation(PREFIX_ATTENTION)
    return True


def _pad(rows: list[list[int]], value: int = 0) -> Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


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
        batch: dict[str, Any] = {"prefix_layout": _layout(prompt_rows, comp_rows, comp_group,
                                                          len(ids))}
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
        "pred_pos": _pad(pred), "targets": _pad(targets),
        "mask": torch.arange(lengths.max())[None, :] < lengths[:, None],
        "num_tokens": len(ids), "num_sequences": len(targets),
        "num_completion_tokens": int(lengths.sum()),
    })
    return batch


def _layout(prompt_rows: list[list[int]], comp_rows: list[list[int]], comp_group: list[int],
            n: int) -> PrefixLayout:
    p_len = torch.tensor(list(map(len, prompt_rows)))
    c_len = torch.tensor(list(map(len, comp_rows)))
    P, L = int(p_len.max()), int(c_len.max())
    p_real = torch.arange(P)[None] < p_len[:, None]  # (Ng, P)
    c_real = torch.arange(L)[None] < c_len[:, None]  # (Nc, L)
    causal_p = torch.ones(P, P, dtype=torch.bool).tril()
    causal_c = torch.ones(L, L, dtype=torch.bool).tril()
    prompt_idx, comp_idx = _pad(prompt_rows), _pad(comp_rows)
    grp = torch.tensor(comp_group)
    # Padded query rows still see at least one real key, so SDPA never returns NaN.
    prompt_mask = causal_p[None] & p_real[:, None, :]
    comp_keys = torch.cat([p_real[grp][:, None, :].expand(-1, L, -1),
                           causal_c[None] & c_real[:, None, :]], dim=-1)  # (Nc, L, P + L)
    order = torch.cat([prompt_idx[p_real], comp_idx[c_real]])
    inverse = torch.empty(n, dtype=torch.long)
    inverse[order] = torch.arange(n)
    return PrefixLayout(prompt_idx, prompt_mask[:, None], comp_idx,
                        torch.cat([prompt_idx[grp], comp_idx], dim=1), comp_keys[:, None],
                        inverse)


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
        # A 4D mask makes transformers skip building an (N, N) mask; our attention ignores it.
        kwargs["attention_mask"] = torch.ones(1, 1, 1, 1, dtype=torch.bool,
                                              device=batch["input_ids"].device)
        kwargs["prefix_layout"] = batch["prefix_layout"]
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
