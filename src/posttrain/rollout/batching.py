"""Rollouts as one packed training row, for the completion forward (DESIGN.md §5.1-5.2).

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

``models/completion.py`` runs the forward over such a batch and projects only the positions
that predict a completion token. Notation: ``Ng`` groups, ``Nc`` completions, ``N`` packed
tokens, ``P``/``L`` padded prompt and completion lengths, ``H`` heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from posttrain.models.prefix import build_layout, pad_rows

# (prompt ids, [completion ids, ...]) for one group.
Group = tuple[Sequence[int], Sequence[Sequence[int]]]


def build_batch(groups: Sequence[Group], prefix_sharing: bool = True) -> dict[str, Any]:
    """Pack groups into one row (no padding) plus what ``models.completion`` needs.

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
