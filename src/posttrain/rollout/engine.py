"""The built-in rollout engine: batched sampling with a KV cache (DESIGN.md §2, §5.1).

    prompts (B) --prefill once--> cache (B) --repeat n--> cache (B*n) --decode--> completions

Each distinct prompt is prefilled once; its keys/values are then repeated for its ``n``
samples, so a GRPO group pays for its prompt once. Decoding is a plain loop over the model's
forward (no ``generate`` machinery per step), and rows that have finished are dropped from the
batch (and the cache) as they finish, so long-tail completions do not keep the finished ones
computing.

The KV cache is preallocated for the whole call (prompt width + ``max_new_tokens``) and
written in place, where ``DynamicCache`` concatenates (copies) every layer's keys and values
at every step. On CPU it holds fp32, the dtype posttrain's attention computes in there
(``models/attention.py``), so no step re-casts the cache. The generator switches sdpa/eager
models to that attention (identical results in fp32; see its module doc).

``generate(..., on_step=fn)`` calls ``fn(DecodeStep)`` after every decode step with the
tokens just sampled (how ``posttrain serve`` streams); without it the loop does no extra work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from posttrain.models.attention import enable_packed_attention
from posttrain.models.device import autocast_context
from posttrain.models.forward import unwrap_model
from posttrain.rollout.protocol import FinishReason, Rollouts, SamplingParams
from posttrain.rollout.sampling import sample_tokens

# Drop finished rows from the batch once this fraction of it has finished (a cache copy
# per finished row would cost more than it saves for tiny models).
_COMPACT_FRAC = 0.25


def default_stop_ids(model: nn.Module, tokenizer: Any | None = None) -> tuple[int, ...]:
    """The model's EOS ids (generation config), plus the tokenizer's EOS and end-of-turn."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer is not None:
        from posttrain.data.chat import end_of_turn_token_id

        ids.update(i for i in (tokenizer.eos_token_id, end_of_turn_token_id(tokenizer))
                   if i is not None)
    return tuple(sorted(ids))


@dataclass(frozen=True)
class DecodeStep:
    """The tokens one decode step sampled: completion ``rows[i]`` (``k = prompt * n + sample``,
    as in ``Rollouts``) got ``tokens[i]`` with ``logprobs[i]``. ``stopped`` are the rows that
    this token ended (a stop token or a completed stop string); a row that is in neither list
    any more has finished, and a row still running after ``max_new_tokens`` steps ends there."""

    rows: list[int]
    tokens: list[int]
    logprobs: list[float]
    stopped: list[int]


StepCallback = Callable[[DecodeStep], None]


class _PreallocatedLayer(DynamicLayer):
    """One layer's keys/values: zero-initialised (B, H_kv, capacity, D) buffers written in
    place. Attention reads views of the filled slots (and masks of that width), so no step
    copies the cache and none attends over slots not written yet."""

    def __init__(self, capacity: int, dtype: torch.dtype | None):
        super().__init__()
        self.capacity, self.dtype, self.length = capacity, dtype, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        dtype = self.dtype or value_states.dtype
        B, H, _, D = key_states.shape
        self.keys = key_states.new_zeros(B, H, self.capacity, D, dtype=dtype)
        self.values = value_states.new_zeros(B, value_states.shape[1], self.capacity,
                                             value_states.shape[-1], dtype=dtype)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        self.keys[:, :, start:end].copy_(key_states)
        self.values[:, :, start:end].copy_(value_states)
        self.length = end
        # Views of the filled slots: attention then reads only those (posttrain's attention
        # cuts the capacity-wide mask to the keys it is given).
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # the filled slots after this step's update

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]


class PreallocatedCache(DynamicCache):
    """A KV cache of ``capacity`` tokens per layer, allocated once (for attention-only decoders:
    every layer a full or sliding-window attention layer)."""

    def __init__(self, num_layers: int, capacity: int, dtype: torch.dtype | None = None):
        Cache.__init__(self, layers=[_PreallocatedLayer(capacity, dtype)
                                     for _ in range(num_layers)])


def _attention_layers(model: nn.Module) -> int | None:
    """The decoder's layer count if every layer is an attention layer, else None."""
    config = model.config.get_text_config(decoder=True)
    kinds = getattr(config, "layer_types", None) or ["full_attention"]
    if any(k not in ("full_attention", "sliding_attention") for k in kinds):
        return None
    return getattr(config, "num_hidden_layers", None)


class KVCacheGenerator:
    """Samples from ``model`` itself (no weight copy: after an optimizer step the next
    ``generate`` already uses the new weights).

    ``stop_token_ids`` are always stop tokens, in addition to each call's own;
    ``tokenizer`` is needed only for ``stop_strings``; ``precision='bf16'`` autocasts.
    """

    def __init__(self, model: nn.Module, tokenizer: Any | None = None, *,
                 stop_token_ids: Sequence[int] = (), precision: str = "fp32",
                 pad_token_id: int | None = None):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        enable_packed_attention(unwrap_model(model))
        self.stop_token_ids = tuple(stop_token_ids)
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = 0 if pad is None else int(pad)

    def update_weights(self, model: nn.Module) -> None:
        self.model = model
        enable_packed_attention(unwrap_model(model))

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams, on_step: StepCallback | None = None) -> Rollouts:
        """``on_step``, when given, is called in this thread after each decode step (an
        exception it raises ends the call)."""
        if not prompt_token_ids or any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("generate needs at least one prompt, and no empty prompt")
        if sampling.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer")
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast_context(self.precision, self._device):
                out = self._generate(prompt_token_ids, n, sampling, on_step)
        finally:
            self.model.train(was_training)
        dt = time.perf_counter() - t0
        tokens = sum(map(len, out.completion_ids))
        out.stats = {"rollout/time_s": dt, "rollout/tokens": float(tokens),
                     "rollout/tokens_per_s": tokens / max(dt, 1e-9)}
        return out

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 ) -> tuple[DynamicCache, Tensor, Tensor, bool]:
        """Left-padded prompts through the model once: (cache, mask (B, P + max_new_tokens),
        last logits (B, V), whether the cache is preallocated). The mask is 1 on prompt tokens,
        0 on left padding and on completion slots not written yet."""
        dev, width = self._device, max(map(len, prompts))
        ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + list(p) for p in prompts],
                           device=dev)
        mask = torch.zeros(len(prompts), width + max_new_tokens, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            mask[i, width - len(p):width] = 1
        pos = (mask[:, :width].cumsum(-1) - 1).clamp_min(0)
        layers = _attention_layers(unwrap_model(self.model))
        if layers is None:  # recurrent/linear-attention layers: transformers' own cache
            cache, prealloc = DynamicCache(config=unwrap_model(self.model).config), False
        else:  # on CPU fp32, the dtype posttrain's attention computes in there
            cache = PreallocatedCache(layers, width + max_new_tokens,
                                      torch.float32 if dev.type == "cpu" else None)
            prealloc = True
        logits = self.model(input_ids=ids, attention_mask=mask if prealloc else mask[:, :width],
                            position_ids=pos, cache=cache, use_cache=True,
                            logits_to_keep=1).logits
        return cache, mask, logits[:, -1], prealloc

    def _generate(self, prompts: Sequence[Sequence[int]], n: int, sp: SamplingParams,
                  on_step: StepCallback | None) -> Rollouts:
        dev, width = self._device, max(map(len, prompts))
        cache, mask, logits, prealloc = self._prefill(prompts, sp.max_new_tokens)
        cache.batch_repeat_interleave(n)  # the prompt's K/V, computed once, for n samples
        mask, logits = mask.repeat_interleave(n, 0), logits.repeat_interleave(n, 0)
        R = mask.shape[0]
        next_pos = mask[:, :width].sum(-1)  # (R,) position of each row's next token
        rows = torch.arange(R, device=dev)  # original row of each batch slot
        gen = torch.Generator(device=dev)
        gen.manual_seed(sp.seed if sp.seed is not None else int(torch.randint(2**62, ())))
        stop_ids = torch.tensor(sorted(set(self.stop_token_ids) | set(sp.stop_token_ids)),
                                device=dev, dtype=torch.long)
        toks: list[list[int]] = [[] for _ in range(R)]
        lps: list[list[float]] = [[] for _ in range(R)]
        reasons: list[FinishReason] = ["length"] * R
        alive = torch.ones(R, dtype=torch.bool, device=dev)  # per batch slot
        for step in range(sp.max_new_tokens):
            tok, lp = sample_tokens(logits, sp.temperature, sp.top_k, sp.top_p, gen)
            done = torch.isin(tok, stop_ids) & alive
            live_rows, live_toks, live_lps = (rows[alive].tolist(), tok[alive].tolist(),
                                              lp[alive].tolist())
            for slot, r, t, logp in zip(alive.nonzero().squeeze(-1).tolist(), live_rows,
                                        live_toks, live_lps, strict=True):
                toks[r].append(t)
                lps[r].append(logp)
                if sp.stop_strings and not done[slot] and self._hit_stop_string(toks[r], sp):
                    done[slot] = True
            stopped = rows[done].tolist()
            for r in stopped:
                reasons[r] = "stop"
            if on_step is not None:
                on_step(DecodeStep(live_rows, live_toks, live_lps, stopped))
            alive &= ~done
            if not alive.any() or step == sp.max_new_tokens - 1:
                break
            if (~alive).float().mean() >= _COMPACT_FRAC:
                keep = alive.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                mask, next_pos, rows, tok = mask[keep], next_pos[keep], rows[keep], tok[keep]
                alive = alive[keep]
            mask[:, width + step] = 1  # the slot this step's token is written to
            logits = self.model(input_ids=tok[:, None],
                                attention_mask=mask if prealloc else mask[:, :width + step + 1],
                                position_ids=next_pos[:, None], cache=cache,
                                use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        return Rollouts([list(p) for p in prompts], toks, lps, reasons, n)

    def _hit_stop_string(self, ids: list[int], sp: SamplingParams) -> bool:
        # Only the tail can newly contain a stop string; decode just enough of it.
        longest = max(map(len, sp.stop_strings))
        tail = self.tokenizer.decode(ids[-(longest + 4):], skip_special_tokens=False)
        return any(s in tail for s in sp.stop_strings)
