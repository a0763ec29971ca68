"""Per-sequence log-probabilities from one packed forward, and the reference model seam.

``sequence_logprobs(model, batch)`` runs one forward over a packed (or padded) batch, projects
the LM head only at completion positions, and sums each sequence's token log-probs with
``index_add_`` over ``sequence_ids``: the chosen and rejected completions of every pair in a
micro-batch cost a single forward with no padding. Given a prefix-shared row
(``posttrain.models.prefix.pack_pairs``) the same call computes each pair's prompt once: the
chosen and rejected responses both attend to it (the model needs
``enable_prefix_attention``).

The reference policy of the DPO family is any object with ``logprobs(batch) -> (B,)`` and
``fingerprint() -> str`` (the :class:`Reference` protocol). ``FrozenReference`` is a frozen
copy of the starting policy; ``AdapterDisabledReference`` is the same policy with its LoRA
adapters switched off (peft's ``disable_adapter``), which costs no extra memory.
``precompute_reference`` scores every training sequence once and caches the result on disk
under a fingerprint of (reference weights, token ids, precision): token ids already capture
the data, the chat template and ``max_length``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posttrain.data.batching import pack
from posttrain.data.chat import Encoded
from posttrain.models.forward import _supports_logits_to_keep, target_logits
from posttrain.models.prefix import prefix_forward_kwargs

log = logging.getLogger("posttrain")

LOGIT_CHUNK = 2048  # rows of (N, V) logits upcast to fp32 at a time


def token_sequence_ids(batch: dict[str, Any]) -> Tensor:
    """For each target position (labels != -100, row-major), the sequence it belongs to."""
    keep = batch["labels"] != -100  # (B, T)
    if "sequence_ids" in batch:  # packed: (1, N)
        return batch["sequence_ids"][keep]
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)
    return rows[keep]  # padded: one sequence per row


def token_logprobs(logits: Tensor, targets: Tensor, chunk: int = LOGIT_CHUNK) -> Tensor:
    """log softmax(logits)[target] per row: (N, V), (N,) -> (N,) fp32, upcast in chunks so a
    large vocabulary never needs an (N, V) fp32 copy at once."""
    parts = [
        -F.cross_entropy(logits[i : i + chunk].float(), targets[i : i + chunk], reduction="none")
        for i in range(0, targets.numel(), chunk)
    ]
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def prefix_target_logits(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Logits (M, V) at the ``pred_pos`` of a prefix-shared row (``models.prefix``). The model
    is called as a whole (not its decoder), so DDP and peft wrappers see the forward."""
    kwargs = prefix_forward_kwargs(batch)
    pred = batch["pred_pos"]  # (M,) may repeat: a prompt's last token predicts every suffix
    if _supports_logits_to_keep(model):
        return model(**kwargs, logits_to_keep=pred[None]).logits[0]  # (M, V)
    return model(**kwargs).logits[0, pred]


def sequence_logprobs(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(logps (B,), lengths (B,)): summed completion log-probs and completion token counts.

    ``batch`` is a ``pack``ed row (uses ``sequence_ids``), a ``pad``ded rectangle, or a
    prefix-shared row (``prefix_layout``, ``target_seq``), with ``num_sequences`` = B.
    Sequences without a target token get logp 0 and length 0.
    """
    if "prefix_layout" in batch:
        logits, targets = prefix_target_logits(model, batch), batch["targets"]  # (N, V), (N,)
        seq = batch["target_seq"]  # (N,)
    else:
        logits, targets = target_logits(model, batch)  # (N, V), (N,)
        seq = token_sequence_ids(batch)  # (N,)
    lp = token_logprobs(logits, targets)  # (N,)
    B = int(batch["num_sequences"])
    logps = lp.new_zeros(B).index_add(0, seq, lp)
    lengths = lp.new_zeros(B).index_add_(0, seq, torch.ones_like(lp))
    return logps, lengths


# ---- the reference policy ---------------------------------------------------------------


class Reference(Protocol):
    def logprobs(self, batch: dict[str, Any]) -> Tensor: ...

    def fingerprint(self) -> str: ...


def weights_fingerprint(model: nn.Module) -> str:
    """blake2b of every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FrozenReference:
    """A frozen deep copy of ``model`` (taken before training changes it); ``copy=False``
    for a model loaded for this purpose, which nothing else trains."""

    def __init__(self, model: nn.Module, autocast: Callable[[], Any] | None = None,
                 copy: bool = True):
        self.model = (deepcopy(model) if copy else model).eval().requires_grad_(False)
        self.autocast = autocast
        self._fp: str | None = None

    @torch.no_grad()
    def logprobs(self, batch: dict[str, Any]) -> Tensor:
        with self.autocast() if self.autocast else nullcontext():
            return sequence_logprobs(self.model, batch)[0].float()

    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = weights_fingerprint(self.model)
        return self._fp


class AdapterDisabledReference:
    """The policy itself with its (peft) LoRA adapters disabled: the base model is the
    reference, at no extra memory. ``model`` is a peft ``PeftModel``."""

    def __init__(self, model: nn.Module, autocast: Callable[[], Any] | None = None):
        self.model, self.autocast = model, autocast

    @torch.no_grad()
    def logprobs(self, batch: dict[str, Any]) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            ac = self.autocast() if self.autocast else nullcontext()
            with self.model.disable_adapter(), ac:
                return sequence_logprobs(self.model, batch)[0].float()
        finally:
            self.model.train(was_training)

    def fingerprint(self) -> str:
        with self.model.disable_adapter():
            return weights_fingerprint(self.model.get_base_model())


def _data_fingerprint(seqs: Sequence[Encoded]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for s in seqs:
        h.update(len(s).to_bytes(4, "little"))
        h.update(torch.tensor(s.input_ids, dtype=torch.int64).numpy().tobytes())
        h.update(bytes(s.loss_mask))
    return h.hexdigest()


def default_cache_dir() -> Path:
    import os

    root = os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain"
    return Path(root) / "ref_logps"


def precompute_reference(
    reference: Reference,
    seqs: Sequence[Encoded],
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
    tag: str = "",
    collate: Callable[[Sequence[Encoded]], dict[str, Any]] = pack,
) -> tuple[Tensor, dict[str, float]]:
    """Reference log-prob of each sequence in ``seqs`` -> (len(seqs),) fp32 on CPU.

    ``seqs[i : i + batch_size]`` go through ``collate`` (``pack``, or ``models.prefix.pack_pairs``
    to share each pair's prompt; keep ``batch_size`` even then). Cached at
    ``cache_dir/<fingerprint>.pt`` (``cache_dir=None`` disables the cache); the fingerprint
    covers the reference weights, every token id and loss-mask bit, and ``tag`` (e.g. the
    precision and forward kind). Returns the values and ``{"ref/precompute_s",
    "ref/cache_hit"}``.
    """
    import time

    t0 = time.perf_counter()
    key = hashlib.blake2b(
        f"{reference.fingerprint()}|{_data_fingerprint(seqs)}|{tag}".encode(), digest_size=16
    ).hexdigest()
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.pt"
    if path is not None and path.exists():
        values = torch.load(path, weights_only=True)
        if values.shape == (len(seqs),):
            log.info("reference log-probs: cache hit %s", path)
            return values, {"ref/precompute_s": time.perf_counter() - t0, "ref/cache_hit": 1.0}
    out = []
    for i in range(0, len(seqs), batch_size):
        batch = collate(seqs[i : i + batch_size])
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        out.append(reference.logprobs(batch).cpu())
    values = torch.cat(out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # pid: torchrun's ranks compute the same values at once, each into its own file
        tmp = path.with_suffix(f".tmp{os.getpid()}-{id(values)}")
        torch.save(values, tmp)
        tmp.replace(path)  # atomic: a concurrent run never reads half a file
    dt = time.perf_counter() - t0
    log.info("reference log-probs for %d sequences in %.1f s", len(seqs), dt)
    return values, {"ref/precompute_s": dt, "ref/cache_hit": 0.0}
