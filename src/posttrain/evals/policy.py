"""Evaluating a policy on held-out prompts: its reward, its pass rate, its KL to a reference.

Prompt rows carry ``_ids`` (``data.prompts.encode_prompts``). Generation uses the same
KV-cache engine as RL rollouts, so an evaluation samples exactly as training does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.data.batching import move_batch
from posttrain.data.prompts import Row
from posttrain.models.completion import completion_logits
from posttrain.models.reference import reference_policy
from posttrain.rewards.base import RewardSet
from posttrain.rewards.scoring import no_eos_frac, pass_rate, score_rollouts
from posttrain.rollout import KVCacheGenerator, Rollouts, SamplingParams, default_stop_ids
from posttrain.rollout.batching import build_batch


@torch.no_grad()
def sequence_kl(policy: nn.Module, ref: nn.Module | None, ro: Rollouts,
                batch_size: int = 16) -> Tensor:
    """KL(policy || ref) of each completion (S,): the exact per-token KL over the whole
    vocabulary, summed over the completion's tokens. On completions sampled from the policy
    this is an unbiased, low-variance estimate of the sequence KL (the sampled-token k1 sum
    has the same mean and a higher variance). ``ref=None``: the LoRA policy, adapters off."""
    out = []
    for s in range(0, len(ro), batch_size):
        groups = [(ro.prompt_ids[ro.prompt_of(k)], [ro.completion_ids[k]])
                  for k in range(s, min(s + batch_size, len(ro)))]
        mb = move_batch(build_batch(groups, prefix_sharing=False),
                        next(policy.parameters()).device)
        logp = torch.log_softmax(completion_logits(policy, mb), -1)  # (M, V)
        with reference_policy(policy, ref) as r:
            ref_logp = torch.log_softmax(completion_logits(r, mb), -1)
        tok_kl = (logp.exp() * (logp - ref_logp)).sum(-1).clamp_min(0.0)  # (M,) rounding
        per = torch.zeros(mb["mask"].shape).masked_scatter(mb["mask"].cpu(), tok_kl.cpu())
        out.append(per.sum(-1))
    return torch.cat(out)


def _generate(gen: KVCacheGenerator, rows: Sequence[Row], sampling: SamplingParams,
              batch_size: int) -> Rollouts:
    """One completion per row, ``batch_size`` prompts per engine call."""
    parts = [gen.generate([r["_ids"] for r in rows[s : s + batch_size]], 1, sampling)
             for s in range(0, len(rows), batch_size)]
    return Rollouts([p for ro in parts for p in ro.prompt_ids],
                    [c for ro in parts for c in ro.completion_ids],
                    [lp for ro in parts for lp in ro.logprobs],
                    [f for ro in parts for f in ro.finish_reasons], 1)


def evaluate_rewards(generator: KVCacheGenerator, rewards: RewardSet, tokenizer: Any,
                     rows: Sequence[Row], max_new_tokens: int, accuracy_of: Sequence[str],
                     batch_size: int = 64) -> dict[str, float]:
    """Greedy completions of held-out rows: ``eval/reward_mean`` and, when a verifier of
    ``accuracy_of`` scores any row, ``eval/accuracy`` (``pass_rate``)."""
    correct, scored, total, n = 0.0, 0, 0.0, 0
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        ro = generator.generate([r["_ids"] for r in chunk], 1, greedy)
        out, _ = score_rollouts(rewards, tokenizer, chunk, ro)
        rate, k = pass_rate(out, accuracy_of)
        correct, scored = correct + (rate * k if k else 0.0), scored + k
        total += float(out.total.sum())
        n += len(chunk)
    metrics = {"eval/reward_mean": total / max(n, 1)}
    if scored:
        metrics = {"eval/accuracy": correct / scored, **metrics}
    return metrics


def evaluate_policy(policy: nn.Module, ref: nn.Module | None, tokenizer: Any,
                    rows: Sequence[Row], rewards: RewardSet, *, max_new_tokens: int,
                    seed: int = 0, precision: str = "fp32",
                    batch_size: int = 64) -> dict[str, float]:
    """Held-out prompts: ``score`` = mean reward of greedy completions; ``score_sampled`` and
    ``kl`` (mean ``sequence_kl`` to ``ref``; None: the LoRA policy's adapters off) on one
    fixed-seed sample per prompt at temperature 1; ``no_eos_frac`` of the greedy
    completions."""
    gen = KVCacheGenerator(policy, tokenizer, precision=precision,
                           stop_token_ids=default_stop_ids(policy, tokenizer))
    was_training = policy.training
    policy.eval()
    try:
        greedy = _generate(gen, rows, SamplingParams(temperature=0.0,
                                                     max_new_tokens=max_new_tokens), batch_size)
        sampled = _generate(gen, rows, SamplingParams(temperature=1.0, seed=seed,
                                                      max_new_tokens=max_new_tokens), batch_size)
        kl = sequence_kl(policy, ref, sampled)
    finally:
        policy.train(was_training)
    return {"score": float(score_rollouts(rewards, tokenizer, rows, greedy)[0].total.mean()),
            "score_sampled": float(score_rollouts(rewards, tokenizer, rows, sampled)[0]
                                   .total.mean()),
            "kl": float(kl.mean()),
            "no_eos_frac": no_eos_frac(greedy)}
