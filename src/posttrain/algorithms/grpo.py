"""GRPO and its family (seed §5.6, EQ 5.6; RLVR rewards, EQ 5.7): online RL without a critic.

    for each step:
        prompts  <- next prompts_per_step rows (the cursor is checkpointed)
        rollouts <- G samples per prompt, KV-cache sampler (prompt prefilled once per group)
        rewards  <- weighted reward functions (+ DAPO overlong shaping), failures contained
        [DAPO dynamic sampling: drop zero-spread groups, refill from new prompts, bounded]
        A        <- group-relative advantages (EQ 5.6) | RLOO | REINFORCE++
        repeat mu times: one optimizer step of the clipped surrogate vs the stored old log-probs
                         (the training forward shares each group's prompt: rollout/scoring.py)
        log, evaluate, checkpoint

Variants are config keys: ``loss_type`` grpo|dapo|dr_grpo (aggregation), ``importance_sampling``
token|sequence (GSPO), ``epsilon_low``/``epsilon_high`` (clip-higher), ``beta``/``kl_estimator``,
``advantage`` grpo|rloo|reinforce_pp with ``scale_rewards`` group|batch|none,
``dynamic_sampling``, ``overlong_buffer``, ``mask_truncated``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.config import TrainConfig
from posttrain.data.chat import render_prompt
from posttrain.data.sources import load_rows, parse_task_spec
from posttrain.errors import ConfigError, DataError
from posttrain.losses.advantages import compute_advantages, overlong_penalty, zero_spread_groups
from posttrain.losses.policy_gradient import aggregation_count, grpo_loss
from posttrain.models.io import load_model
from posttrain.rewards.base import RewardSet
from posttrain.rewards.registry import auto_reward_names, build_reward
from posttrain.rollout import KVCacheGenerator, Rollouts, SamplingParams, default_stop_ids
from posttrain.rollout.scoring import build_batch, completion_logprobs, enable_prefix_attention
from posttrain.train.engine import Engine, autocast_context
from posttrain.train.loop import BatchStream, total_steps
from posttrain.train.run import load_policy, move_batch, prepare_run

log = logging.getLogger("posttrain")


@dataclass
class GRPOConfig(TrainConfig):
    """Online RL with group-relative advantages: GRPO, DAPO, Dr. GRPO, GSPO, RLOO, REINFORCE++."""

    max_steps: int = field(
        default=-1, metadata={"help": "GRPO steps (one rollout batch and num_iterations optimizer "
                                      "steps each); -1 = derive from epochs over the prompts"})
    num_generations: int = field(default=8, metadata={"help": "G: completions per prompt"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts (groups) per step"})
    batch_size: int = field(
        default=64, metadata={"help": "max completions per training micro-batch (whole groups)"})
    max_new_tokens: int = field(default=128, metadata={"help": "completion token budget"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; 1 = off"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling; 0 = off"})
    stop: list[str] = field(default_factory=list,
                            metadata={"help": "extra stop strings (EOS/end-of-turn always stop)"})
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = field(
        default="grpo", metadata={"help": "aggregation: per-sequence mean | global token mean | "
                                          "constant normaliser"})
    importance_sampling: Literal["token", "sequence"] = field(
        default="token", metadata={"help": "ratio per token, or GSPO's sequence ratio"})
    epsilon_low: float = field(default=0.2, metadata={"help": "clip ratio below at 1 - this"})
    epsilon_high: float = field(default=0.2, metadata={"help": "clip above at 1 + this "
                                                               "(DAPO clip-higher: 0.28)"})
    num_iterations: int = field(default=1, metadata={"help": "mu: optimizer steps per rollout "
                                                             "batch (vs stored old log-probs)"})
    beta: float = field(default=0.0, metadata={"help": "KL penalty; 0 loads no reference"})
    kl_estimator: Literal["k1", "k3"] = field(default="k3", metadata={"help": "KL estimator"})
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = field(
        default="grpo", metadata={"help": "baseline: group mean | leave-one-out | batch"})
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group", metadata={"help": "grpo advantage divisor: group std | batch std | 1"})
    dynamic_sampling: bool = field(
        default=False, metadata={"help": "DAPO: drop zero-spread groups, refill from new prompts"})
    max_refill_rounds: int = field(default=3, metadata={"help": "dynamic sampling: max refills"})
    skip_zero_spread: bool = field(
        default=True, metadata={"help": "skip the forward of zero-advantage groups (exact "
                                        "when beta = 0: they stay in the normaliser)"})
    overlong_buffer: int = field(
        default=0, metadata={"help": "DAPO soft overlong penalty over the last N tokens; 0=off"})
    overlong_penalty: float = field(default=1.0, metadata={"help": "max overlong penalty"})
    mask_truncated: bool = field(
        default=False, metadata={"help": "no loss on completions cut at max_new_tokens"})
    rewards: list[str] = field(
        default_factory=lambda: ["auto"], metadata={"help": "reward functions (see docs/rewards"
                                                            ".md); auto = fits the data"})
    reward_weights: list[float] = field(default_factory=list,
                                        metadata={"help": "one weight per reward; [] = all 1"})
    reward_timeout_s: float = field(default=60.0, metadata={"help": "per reward call; 0 = none"})
    reward_on_error: float = field(
        default=0.0, metadata={"help": "score of rows whose reward call raised or timed out"})
    prefix_sharing: bool = field(
        default=True, metadata={"help": "training forward computes each group's prompt once"})
    eval_prompts: int = field(default=200, metadata={"help": "max held-out prompts evaluated"})
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW)"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata={"help": "learning-rate decay after warmup"})
    max_length: int = field(default=1024, metadata={"help": "max prompt + completion tokens"})

    def validate(self) -> None:
        super().validate()
        if self.data is None:
            raise ConfigError("config key 'data' is required for grpo (prompt-only rows, "
                              "task:NAME or rg:NAME)")
        for name in ("num_generations", "prompts_per_step", "max_new_tokens", "num_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2 and self.advantage != "reinforce_pp":
            raise ConfigError("num_generations must be >= 2 for group baselines")
        if not self.temperature > 0:
            raise ConfigError("temperature must be > 0 for training rollouts")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError("max_new_tokens must be < max_length (room for the prompt)")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"{len(self.rewards)} rewards but {len(self.reward_weights)} "
                              f"reward_weights")
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ConfigError("epsilon_low, epsilon_high and beta must be >= 0")


# ----------------------------------------------------------------------------- data, rewards


def load_prompt_rows(spec: str, split: str = "train",
                     on_bad_row: str = "error") -> list[dict[str, Any]]:
    """Prompt-only rows (+ truth columns): a file, ``task:NAME[:k=v]``, or ``rg:NAME[:k=v]``."""
    if spec.startswith("rg:"):
        from posttrain.tasks.rl import rg_rows

        name, params = parse_task_spec(spec.removeprefix("rg:"))
        return rg_rows(name, split=str(params.pop("split", split)), **params)
    return load_rows(spec, split=split, formats=("prompt_only",),
                     on_bad_row=on_bad_row).rows  # type: ignore[arg-type]


def build_reward_set(cfg: GRPOConfig, rows: Sequence[dict[str, Any]]) -> RewardSet:
    names = auto_reward_names(cfg.data or "", rows) if cfg.rewards == ["auto"] else cfg.rewards
    return RewardSet([build_reward(n) for n in names], cfg.reward_weights or None,
                     timeout_s=cfg.reward_timeout_s or None, on_error=cfg.reward_on_error)


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = [k for k in rows[0] if k not in ("prompt", "_ids")]
    return {k: [r.get(k) for r in rows] for k in keys}


def score(rewards: RewardSet, tokenizer: Any, rows: Sequence[dict[str, Any]], ro: Rollouts,
          ) -> tuple[torch.Tensor, dict[str, float], list[str]]:
    """Rewards (len(ro),) of every completion; row ``k // n`` is completion ``k``'s prompt row."""
    texts = tokenizer.batch_decode(ro.completion_ids, skip_special_tokens=True)
    expanded = [rows[ro.prompt_of(k)] for k in range(len(ro))]
    out = rewards([r["prompt"] for r in expanded], texts, **_columns(expanded))
    first = next(iter(out.per_fn.values()))
    out.metrics["reward/accuracy"] = float((first >= 1.0).float().mean())
    return out.total, out.metrics, texts


# ----------------------------------------------------------------------------- one step


@dataclass
class StepBatch:
    """What one step trains on: G completions for each of its prompts."""

    ro: Rollouts
    rewards: torch.Tensor  # (B, G) shaped rewards
    spread: torch.Tensor  # (B,) bool: the group's rewards differ
    metrics: dict[str, float]


def _concat(parts: list[StepBatch], keep: list[torch.Tensor]) -> StepBatch:
    """The kept groups of several generation rounds, as one batch."""
    n = parts[0].ro.n
    prompts, comps, lps, reasons, rewards, spread = [], [], [], [], [], []
    for part, k in zip(parts, keep, strict=True):
        for b in k.nonzero().squeeze(-1).tolist():
            prompts.append(part.ro.prompt_ids[b])
            sl = slice(b * n, (b + 1) * n)
            comps += part.ro.completion_ids[sl]
            lps += part.ro.logprobs[sl]
            reasons += part.ro.finish_reasons[sl]
            rewards.append(part.rewards[b])
            spread.append(part.spread[b])
    if not rewards:  # dynamic sampling kept nothing: the step trains on nothing
        return StepBatch(Rollouts([], [], [], [], n), torch.zeros(0, n),
                         torch.zeros(0, dtype=torch.bool), parts[0].metrics)
    return StepBatch(Rollouts(prompts, comps, lps, reasons, n), torch.stack(rewards),
                     torch.stack(spread), parts[0].metrics)


class GRPOTrainer:
    """The state of a GRPO run; ``step`` reads like the algorithm box above."""

    def __init__(self, cfg: GRPOConfig, engine: Engine, rows: list[dict[str, Any]],
                 rewards: RewardSet, reference: torch.nn.Module | None):
        self.cfg, self.engine, self.rows = cfg, engine, rows
        self.rewards, self.ref = rewards, reference
        self.tokenizer = engine.tokenizer
        self.stream = BatchStream(rows, cfg.prompts_per_step, list, seed=cfg.seed)
        self.generator = KVCacheGenerator(
            engine.model, self.tokenizer, precision=cfg.precision,
            stop_token_ids=default_stop_ids(engine.model, self.tokenizer))
        self.warned = {"truncated": 0, "zero_spread": 0}

    # -- generation and rewards ------------------------------------------------------------
    def sampling(self, round_: int, greedy: bool = False) -> SamplingParams:
        seed = (self.cfg.seed * 1_000_003 + self.engine.step * 101 + round_) % 2**62
        return SamplingParams(
            temperature=0.0 if greedy else self.cfg.temperature, top_p=self.cfg.top_p,
            top_k=self.cfg.top_k, max_new_tokens=self.cfg.max_new_tokens,
            stop_strings=tuple(self.cfg.stop), seed=seed)

    def generate(self, rows: list[dict[str, Any]], round_: int) -> tuple[StepBatch, dict]:
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        ro = self.generator.generate([r["_ids"] for r in rows], G, self.sampling(round_))
        t1 = time.perf_counter()
        total, metrics, _ = score(self.rewards, self.tokenizer, rows, ro)
        lengths = torch.tensor([len(c) for c in ro.completion_ids])
        total = total + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer,
                                         cfg.overlong_penalty)
        rewards = total.view(len(rows), G)
        times = {"time/generate_s": t1 - t0, "time/reward_s": time.perf_counter() - t1}
        return StepBatch(ro, rewards, ~zero_spread_groups(rewards), metrics), times

    def collect(self) -> tuple[StepBatch, dict[str, float]]:
        """One step's rollouts; with dynamic sampling, refill dropped groups (bounded)."""
        cfg = self.cfg
        parts, keep, times = [], [], {"time/generate_s": 0.0, "time/reward_s": 0.0}
        want, rounds = cfg.prompts_per_step, 0
        while True:
            part, t = self.generate(self.next_rows(want), rounds)
            times = {k: times[k] + t[k] for k in times}
            parts.append(part)
            keep.append(part.spread if cfg.dynamic_sampling else torch.ones_like(part.spread))
            have = int(sum(int(k.sum()) for k in keep))
            if not cfg.dynamic_sampling or have >= cfg.prompts_per_step \
                    or rounds >= cfg.max_refill_rounds:
                break
            want, rounds = cfg.prompts_per_step - have, rounds + 1
        batch = _concat(parts, keep)
        first = parts[0]
        stats = {**times, "grpo/zero_std_frac": float((~first.spread).float().mean()),
                 **first.metrics, **self.generator_stats(first.ro)}
        if cfg.dynamic_sampling:
            stats.update({"grpo/refill_rounds": float(rounds),
                          "grpo/groups_dropped": float(sum(int((~p.spread).sum()) for p in parts)),
                          "grpo/groups_kept": float(len(batch.ro.prompt_ids))})
        if len(batch.ro.prompt_ids) > cfg.prompts_per_step:  # keep the step's size fixed
            batch = _concat([batch], [torch.arange(len(batch.ro.prompt_ids))
                                      < cfg.prompts_per_step])
        return batch, stats

    def next_rows(self, n: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while len(rows) < n:
            rows += self.stream.next()[: n - len(rows)]
        return rows

    def generator_stats(self, ro: Rollouts) -> dict[str, float]:
        lengths = torch.tensor([len(c) for c in ro.completion_ids], dtype=torch.float)
        truncated = sum(r == "length" for r in ro.finish_reasons) / len(ro)
        return {"completions/mean_length": float(lengths.mean()),
                "completions/max_length": float(lengths.max()),
                "completions/truncated_frac": truncated, **ro.stats}

    # -- training ----------------------------------------------------------------------------
    def micro_batches(self, batch: StepBatch) -> tuple[list[dict[str, Any]], float]:
        """Whole groups per micro-batch; returns them and the normaliser share of the
        skipped zero-advantage groups (they still count, so skipping them is exact)."""
        cfg, n = self.cfg, batch.ro.n
        if not batch.ro.prompt_ids:
            return [], 0.0
        adv = compute_advantages(batch.rewards, cfg.advantage, cfg.scale_rewards)  # (B, G)
        skip_ok = cfg.skip_zero_spread and cfg.beta == 0.0 and cfg.advantage != "reinforce_pp"
        groups, skipped = [], 0.0
        for b, prompt in enumerate(batch.ro.prompt_ids):
            ks = [b * n + j for j in range(n)
                  if not (cfg.mask_truncated and batch.ro.finish_reasons[b * n + j] == "length")]
            if not ks:
                continue
            count = aggregation_count(cfg.loss_type, len(ks),
                                      sum(len(batch.ro.completion_ids[k]) for k in ks),
                                      cfg.max_new_tokens)
            if skip_ok and not batch.spread[b]:
                skipped += count
                continue
            groups.append((prompt, ks, adv.view(-1)[ks]))
        mbs, cur = [], []
        for g in groups:
            if cur and sum(len(x[1]) for x in cur) + len(g[1]) > cfg.batch_size:
                mbs.append(self.make_mb(cur, batch))
                cur = []
            cur.append(g)
        if cur:
            mbs.append(self.make_mb(cur, batch))
        return mbs, skipped

    def make_mb(self, groups: list, batch: StepBatch) -> dict[str, Any]:
        comps = batch.ro.completion_ids
        mb = build_batch([(p, [comps[k] for k in ks]) for p, ks, _ in groups],
                         self.cfg.prefix_sharing)
        lp = [torch.tensor(batch.ro.logprobs[k]) for _, ks, _ in groups for k in ks]
        mb["sampler_logp"] = torch.nn.utils.rnn.pad_sequence(lp, batch_first=True)
        mb["adv"] = torch.cat([a for _, _, a in groups])
        mb["count"] = aggregation_count(self.cfg.loss_type, mb["num_sequences"],
                                        mb["num_completion_tokens"], self.cfg.max_new_tokens)
        mb = move_batch(mb, self.engine.device)
        if "prefix_layout" in mb:
            mb["prefix_layout"] = mb["prefix_layout"].to(self.engine.device)
        mb["num_groups"] = len(groups)
        mb["old_logp"] = None
        if self.ref is not None:
            with torch.no_grad(), autocast_context(self.cfg.precision, self.engine.device):
                mb["ref_logp"] = completion_logprobs(self.ref, mb, self.cfg.temperature)[0]
        return mb

    def loss_fn(self, model: torch.nn.Module, mb: dict[str, Any], normalizer: float):  # noqa: ANN201
        cfg = self.cfg
        first = mb["old_logp"] is None
        logp, ent = completion_logprobs(model, mb, cfg.temperature, with_entropy=first)
        if first:  # the model has not moved yet: these are the old policy's log-probs
            mb["old_logp"] = logp.detach()
        loss, metrics = grpo_loss(
            logp, mb["old_logp"], mb["adv"], mb["mask"], normalizer, eps_low=cfg.epsilon_low,
            eps_high=cfg.epsilon_high, aggregation=cfg.loss_type,
            importance_sampling=cfg.importance_sampling, ref_logp=mb.get("ref_logp"),
            beta=cfg.beta, kl_estimator=cfg.kl_estimator)
        if first:
            m = mb["mask"]
            metrics["grpo/entropy"] = ent[m].mean()
            # Sampler vs trainer log-probs of the same tokens (exact only without top-k/p).
            metrics["grpo/sampler_logp_diff"] = (logp.detach() - mb["sampler_logp"])[m].abs().mean()
        return loss, metrics

    def step(self) -> dict[str, float]:
        batch, stats = self.collect()
        self.warn(batch, stats)
        t0 = time.perf_counter()
        mbs, skipped = self.micro_batches(batch)
        if mbs:
            mbs[0]["count"] += skipped
        metrics: dict[str, float] = {}
        for _ in range(self.cfg.num_iterations):
            metrics.update(self.engine.update(mbs, self.loss_fn, lambda mb: mb["count"]))
        stats["time/train_s"] = time.perf_counter() - t0
        stats["grpo/groups_trained"] = float(sum(mb["num_groups"] for mb in mbs))
        total = sum(stats[k] for k in ("time/generate_s", "time/reward_s", "time/train_s"))
        for k in ("generate", "reward", "train"):
            stats[f"time/{k}_frac"] = stats[f"time/{k}_s"] / max(total, 1e-9)
        return {**metrics, **stats}

    def warn(self, batch: StepBatch, stats: dict[str, float]) -> None:
        """Silent failure modes (DESIGN.md §7), rate-limited to the 1st and every 20th time."""
        checks = {
            "truncated": (stats["completions/truncated_frac"] == 1.0,
                          f"every completion hit max_new_tokens={self.cfg.max_new_tokens}: "
                          "rewards may be meaningless; raise max_new_tokens"),
            "zero_spread": (stats["grpo/zero_std_frac"] == 1.0,
                            "every group's rewards have zero spread: no learning signal this "
                            "step (prompts too easy or too hard, or the reward is broken)"),
        }
        for key, (bad, msg) in checks.items():
            if bad:
                if self.warned[key] % 20 == 0:
                    log.warning("step %d: %s", self.engine.step + 1, msg)
                self.warned[key] += 1

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return evaluate_rewards(self.generator, self.rewards, self.tokenizer, rows,
                                self.cfg.max_new_tokens)


def evaluate_rewards(generator: KVCacheGenerator, rewards: RewardSet, tokenizer: Any,
                     rows: list[dict[str, Any]], max_new_tokens: int,
                     batch_size: int = 64) -> dict[str, float]:
    """Greedy completions of held-out rows: ``eval/accuracy`` (first reward == 1) and
    ``eval/reward_mean``."""
    correct, total, n = 0.0, 0.0, 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        ro = generator.generate([r["_ids"] for r in chunk], 1,
                                SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
        r, m, _ = score(rewards, tokenizer, chunk, ro)
        correct += m["reward/accuracy"] * len(chunk)
        total += float(r.sum())
        n += len(chunk)
    return {"eval/accuracy": correct / max(n, 1), "eval/reward_mean": total / max(n, 1)}


# ----------------------------------------------------------------------------- the run


def encode_prompts(rows: list[dict[str, Any]], tokenizer: Any, max_prompt: int,
                   spec: str) -> list[dict[str, Any]]:
    """Attach token ids (``_ids``); rows whose prompt leaves no room to generate are dropped."""
    out = [{**r, "_ids": render_prompt(tokenizer, r["prompt"])} for r in rows]
    kept = [r for r in out if len(r["_ids"]) <= max_prompt]
    if len(kept) < len(out):
        log.warning("%s: %d prompts longer than max_length - max_new_tokens = %d tokens; dropped",
                    spec, len(out) - len(kept), max_prompt)
    if not kept:
        raise DataError(f"{spec}: no prompt fits in max_length - max_new_tokens = {max_prompt}")
    return kept


def load_reference(cfg: GRPOConfig, device: torch.device) -> torch.nn.Module:
    ref = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    enable_prefix_attention(ref)
    ref.requires_grad_(False)
    return ref.eval().to(device)


def train_grpo(cfg: GRPOConfig) -> Path:
    """Run GRPO end to end; returns the final HF model directory."""
    run_dir, resume_from = prepare_run(cfg)
    model, tokenizer = load_policy(cfg, resume_from)
    if cfg.prefix_sharing and not enable_prefix_attention(model):
        log.info("attention implementation cannot share prefixes; packing padding-free")
        cfg.prefix_sharing = False
    max_prompt = cfg.max_length - cfg.max_new_tokens
    rows = encode_prompts(load_prompt_rows(cfg.data, "train", cfg.on_bad_row), tokenizer,
                          max_prompt, cfg.data)
    held_out = None
    if cfg.eval_data:
        held_out = encode_prompts(load_prompt_rows(cfg.eval_data, "test", cfg.on_bad_row),
                                  tokenizer, max_prompt, cfg.eval_data)[: cfg.eval_prompts]
    rewards = build_reward_set(cfg, rows)
    steps = total_steps(cfg.max_steps, cfg.epochs, -(-len(rows) // cfg.prompts_per_step), 1)
    engine = Engine(cfg, model, tokenizer, run_dir, steps * cfg.num_iterations)
    ref = load_reference(cfg, engine.device) if cfg.beta > 0 else None
    trainer = GRPOTrainer(cfg, engine, rows, rewards, ref)
    if resume_from is not None:
        trainer.stream.load_state(engine.restore(resume_from)["cursor"])
    engine.log({"data/rows": len(rows), "data/held_out_rows": len(held_out or [])})
    every = lambda k: k and (engine.step // cfg.num_iterations) % k == 0  # noqa: E731
    try:
        while engine.step < engine.total_steps:
            metrics = trainer.step()  # num_iterations optimizer steps on one rollout batch
            done = engine.step >= engine.total_steps
            if held_out and (done or every(cfg.eval_steps)):
                metrics.update(trainer.evaluate(held_out))
            if done or every(max(cfg.logging_steps, 1)):
                engine.log(metrics)
            if every(cfg.save_steps) and not done:
                engine.save(trainer.stream.state())
        return engine.save_final()
    finally:
        engine.close()
