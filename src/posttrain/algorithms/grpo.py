"""GRPO and its family (seed §5.6, EQ 5.6; RLVR rewards, EQ 5.7): online RL without a critic.

    for each step:
        prompts  <- next prompts_per_step rows (the cursor is checkpointed)
        rollouts <- G samples per prompt, KV-cache sampler (prompt prefilled once per group)
        rewards  <- weighted reward functions (+ DAPO overlong shaping), failures contained
        [DAPO dynamic sampling: drop zero-spread groups, refill from new prompts, bounded]
        A        <- group-relative advantages (EQ 5.6) | RLOO | REINFORCE++
        old logp <- the sampling policy's log-probs (mu > 1: one no-grad forward first;
                    mu = 1: the update's own, detached; the ratio is then exactly 1)
        repeat mu times: one optimizer step of the clipped surrogate (the training forward
                         shares each group's prompt: rollout/batching.py)

Variants are config keys: ``loss_type`` grpo|dapo|dr_grpo (aggregation), ``importance_sampling``
token|sequence (GSPO), ``epsilon_low``/``epsilon_high`` (clip-higher), ``beta``/``kl_estimator``,
``advantage`` grpo|rloo|reinforce_pp with ``scale_rewards`` group|batch|none,
``dynamic_sampling``, ``overlong_buffer``, ``mask_truncated``. The loop, set-up and checkpoints
are ``train/online.py``'s. Each logged step's advantages go to ``instruments.jsonl``
(INSTRUMENT 5.2; drawn by ``posttrain report``).

Under torchrun each rank takes a contiguous share of the step's prompts and samples, rewards
and trains on their whole groups (no group is split, so group advantages need no
communication); its sampling seed includes its rank. Ranks pad to the same number of
micro-batches with zero-weight ones, since FSDP2's collectives run per forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from posttrain.config.checks import Needs
from posttrain.data.batching import move_batch
from posttrain.data.prompts import PromptCursor, Row
from posttrain.errors import ConfigError
from posttrain.evals.config import EVAL_ONLY_WITH
from posttrain.evals.policy import evaluate_rewards
from posttrain.losses.advantages import compute_advantages, overlong_penalty, zero_spread_groups
from posttrain.losses.policy_gradient import aggregation_count, grpo_loss
from posttrain.models.completion import completion_logprobs
from posttrain.models.device import autocast_context
from posttrain.models.reference import load_reference, reference_policy
from posttrain.report.instruments import append_row, sketch
from posttrain.rewards.base import RewardSet
from posttrain.rewards.config import RewardConfig
from posttrain.rewards.scoring import lengths, no_eos_frac, pass_rate, score_rollouts
from posttrain.rollout import Rollouts
from posttrain.rollout.batching import build_batch
from posttrain.train import distributed as ddp
from posttrain.train import fsdp, online
from posttrain.train.engine import Engine


@dataclass
class GRPOConfig(online.OnlineConfig):
    """Online RL with group-relative advantages: GRPO, DAPO, Dr. GRPO, GSPO, RLOO, REINFORCE++."""

    RANGES: ClassVar[dict[str, str]] = {
        "prompts_per_step": ">= 1", "num_generations": ">= 1", "epsilon_low": "[0, 1]",
        "epsilon_high": ">= 0", "num_iterations": ">= 1", "beta": ">= 0",
        "max_refill_rounds": ">= 0", "overlong_buffer": ">= 0", "overlong_penalty": ">= 0",
    }
    ONLY_WITH: ClassVar[dict[str, Needs]] = {
        **EVAL_ONLY_WITH,
        "kl_estimator": Needs("beta", "> 0", "beta = 0 computes no KL"),
        "scale_rewards": Needs("advantage", ("grpo",), "rloo and reinforce_pp do not scale"),
        "max_refill_rounds": Needs("dynamic_sampling", (True,)),
        "overlong_penalty": Needs("overlong_buffer", ">= 1"),
    }

    batch_size: int = field(
        default=64, metadata={"help": "max completions per training micro-batch (whole groups)"})
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
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(functions=["auto"]),
                                 metadata={"help": "the reward"})

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2 and self.advantage != "reinforce_pp":
            raise ConfigError(f"num_generations must be >= 2 with advantage={self.advantage} "
                              f"(a group baseline), got {self.num_generations}")
        if self.grad_accum != 1:  # the loop never reads it: say so rather than ignore it
            raise ConfigError(f"grad_accum={self.grad_accum} has no effect in grpo: one step "
                              "trains on all its micro-batches (batch_size completions each); "
                              "leave grad_accum at 1")
        if not self.reward.count:
            raise ConfigError("grpo needs a reward: set reward.functions=[...] (rewards) and/or "
                              "reward.model=DIR (reward_model)")
        # The ramp of the soft penalty must fit inside the completion budget.
        if self.overlong_buffer >= self.sampling.max_new_tokens:
            raise ConfigError(f"overlong_buffer={self.overlong_buffer} must be < "
                              f"sampling.max_new_tokens={self.sampling.max_new_tokens}")


@dataclass
class StepBatch:
    """What one step trains on: G completions for each of its prompts."""

    ro: Rollouts
    rewards: Tensor  # (B, G) shaped rewards
    spread: Tensor  # (B,) bool: the group's rewards differ
    metrics: dict[str, float]


def _keep_groups(parts: list[StepBatch], keep: list[Tensor]) -> StepBatch:
    """The kept groups (``keep[i]`` (B_i,) bool) of several generation rounds, as one batch."""
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


class GRPO:
    """The state of a GRPO run; ``step`` reads like the algorithm box above."""

    def __init__(self, cfg: GRPOConfig, engine: Engine, cursor: PromptCursor,
                 rewards: RewardSet, reference: nn.Module | None):
        self.cfg, self.engine, self.cursor = cfg, engine, cursor
        self.rewards, self.ref = rewards, reference
        self.tokenizer = engine.tokenizer
        self.updates_per_step = cfg.num_iterations
        # reward/accuracy: the verifiers' pass rate, each on the rows it applies to (a judge's
        # probability is no pass)
        self.accuracy_of = [n for n in (rewards.names[1:] if cfg.reward.model else rewards.names)
                            if n != "judge"]
        self.generator = online.policy_sampler(engine)
        self.warnings = online.Warnings()

    # -- the step ------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        cfg = self.cfg
        batch, stats = self.collect()
        stats = online.mean_over_ranks(stats, self.engine)
        self.warn(stats)
        t0 = time.perf_counter()
        adv = compute_advantages(batch.rewards, cfg.advantage, cfg.scale_rewards)  # (B, G)
        mbs, skipped = self.micro_batches(batch, adv)
        if cfg.num_iterations > 1:
            self.store_old_logprobs(mbs)
        count = lambda mb: mb["count"]  # noqa: E731
        metrics: dict[str, float] = {}
        for it in range(cfg.num_iterations):
            metrics.update(self.engine.update(mbs, partial(self.loss, first=it == 0), count,
                                              extra_count=skipped))
        stats["time/train_s"] = time.perf_counter() - t0
        stats["grpo/groups_trained"] = ddp.all_reduce_sum(
            float(sum(mb["num_groups"] for mb in mbs)), self.engine.dist, self.engine.device)
        stats.update(online.time_fractions(stats, ("generate", "reward", "train")))
        self.record_advantages(adv)
        return {**metrics, **stats}

    def record_advantages(self, adv: Tensor) -> None:
        """INSTRUMENT 5.2: every step's advantages (B, G), as an ``instruments.jsonl`` row."""
        if self.engine.dist.is_main:
            values = adv.detach().float().flatten().tolist()
            append_row(self.engine.run_dir, {"step": self.engine.step, "kind": "advantages",
                                             "n": len(values), "adv": sketch(values)})

    def loss(self, model: nn.Module, mb: dict[str, Any], normalizer: float, first: bool
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped surrogate of one micro-batch against its old log-probs (stored before
        the updates; without them the policy is the sampling one and the ratio is 1)."""
        cfg = self.cfg
        logp, ent = completion_logprobs(model, mb, cfg.sampling.temperature,
                                        entropy="detached" if first else "none")
        old_logp = mb["old_logp"] if "old_logp" in mb else logp.detach()
        loss, metrics = grpo_loss(
            logp, old_logp, mb["adv"], mb["mask"], normalizer, eps_low=cfg.epsilon_low,
            eps_high=cfg.epsilon_high, aggregation=cfg.loss_type,
            importance_sampling=cfg.importance_sampling, ref_logp=mb.get("ref_logp"),
            beta=cfg.beta, kl_estimator=cfg.kl_estimator)
        if mb.get("pad"):  # a rank's padding (``padding``): the graph runs, nothing counts
            loss = loss * 0.0
        if first:
            m = mb["mask"]
            metrics["grpo/entropy"] = ent[m].mean()
            # Sampler vs trainer log-probs of the same tokens (exact only without top-k/p).
            metrics["grpo/sampler_logp_diff"] = (logp.detach() - mb["sampler_logp"])[m].abs().mean()
        return loss, metrics

    # -- rollouts and rewards ------------------------------------------------------------
    def collect(self) -> tuple[StepBatch, dict[str, float]]:
        """One step's rollouts; with dynamic sampling, refill dropped groups (bounded)."""
        cfg = self.cfg
        parts, keep, times = [], [], {"time/generate_s": 0.0, "time/reward_s": 0.0}
        want, rounds = cfg.prompts_per_step, 0
        while True:
            part, t = self.generate(self.cursor.next(want), rounds)
            times = {k: times[k] + t[k] for k in times}
            parts.append(part)
            keep.append(part.spread if cfg.dynamic_sampling else torch.ones_like(part.spread))
            have = int(sum(int(k.sum()) for k in keep))
            if not cfg.dynamic_sampling or have >= cfg.prompts_per_step \
                    or rounds >= cfg.max_refill_rounds:
                break
            want, rounds = cfg.prompts_per_step - have, rounds + 1
        batch = _keep_groups(parts, keep)
        first = parts[0]
        stats = {**times, "grpo/zero_std_frac": float((~first.spread).float().mean()),
                 **first.metrics, **self.rollout_stats(first.ro)}
        if cfg.dynamic_sampling:
            stats.update({"grpo/refill_rounds": float(rounds),
                          "grpo/groups_dropped": float(sum(int((~p.spread).sum()) for p in parts)),
                          "grpo/groups_kept": float(len(batch.ro.prompt_ids))})
        if len(batch.ro.prompt_ids) > cfg.prompts_per_step:  # keep the step's size fixed
            batch = _keep_groups([batch], [torch.arange(len(batch.ro.prompt_ids))
                                           < cfg.prompts_per_step])
        return batch, stats

    def generate(self, rows: list[Row], round_: int) -> tuple[StepBatch, dict[str, float]]:
        """Sample, score and shape the groups of this rank's share of ``rows``."""
        rows = online.rank_slice(rows, self.engine.dist)
        cfg, G, rank = self.cfg, self.cfg.num_generations, self.engine.dist.rank
        seed = (cfg.seed * 1_000_003 + self.engine.step * 101 + round_ + rank * 7_919) % 2**62
        t0 = time.perf_counter()
        # All ranks sample at once; the gathered weights let their lengths differ (fsdp2).
        with fsdp.gathered(self.engine.model):
            ro = self.generator.generate([r["_ids"] for r in rows], G, cfg.sampling.params(seed))
        t1 = time.perf_counter()
        out, _ = score_rollouts(self.rewards, self.tokenizer, rows, ro)
        metrics = dict(out.metrics)
        rate, scored = pass_rate(out, self.accuracy_of)
        if scored:
            metrics["reward/accuracy"] = rate
        total = out.total + overlong_penalty(lengths(ro), cfg.sampling.max_new_tokens,
                                             cfg.overlong_buffer, cfg.overlong_penalty)
        rewards = total.view(len(rows), G)
        times = {"time/generate_s": t1 - t0, "time/reward_s": time.perf_counter() - t1}
        return StepBatch(ro, rewards, ~zero_spread_groups(rewards), metrics), times

    def rollout_stats(self, ro: Rollouts) -> dict[str, float]:
        n = lengths(ro)
        return {"completions/mean_length": float(n.mean()),
                "completions/max_length": float(n.max()),
                "completions/truncated_frac": no_eos_frac(ro), **ro.stats}

    def warn(self, stats: dict[str, float]) -> None:
        step = self.engine.step // self.updates_per_step + 1
        self.warnings.check("truncated", stats["completions/truncated_frac"] == 1.0, step,
                            f"every completion hit max_new_tokens="
                            f"{self.cfg.sampling.max_new_tokens}: rewards may be meaningless; "
                            "raise max_new_tokens")
        self.warnings.check("zero_spread", stats["grpo/zero_std_frac"] == 1.0, step,
                            "every group's rewards have zero spread: no learning signal this "
                            "step (prompts too easy or too hard, or the reward is broken)")

    # -- micro-batches -------------------------------------------------------------------
    def micro_batches(self, batch: StepBatch, adv: Tensor) -> tuple[list[dict[str, Any]], float]:
        """Whole groups per micro-batch (at most ``batch_size`` completions), and the
        normaliser share of the zero-advantage groups left out: they still count, so leaving
        out their (zero) gradient is exact."""
        cfg, n = self.cfg, batch.ro.n
        skip_ok = cfg.skip_zero_spread and cfg.beta == 0.0 and cfg.advantage != "reinforce_pp"
        groups, skipped = [], 0.0
        for b, prompt in enumerate(batch.ro.prompt_ids):
            ks = [b * n + j for j in range(n)
                  if not (cfg.mask_truncated and batch.ro.finish_reasons[b * n + j] == "length")]
            if not ks:
                continue
            if skip_ok and not batch.spread[b]:
                skipped += aggregation_count(
                    cfg.loss_type, len(ks), sum(len(batch.ro.completion_ids[k]) for k in ks),
                    cfg.sampling.max_new_tokens)
                continue
            groups.append((prompt, ks, adv.view(-1)[ks]))
        chunks, cur = [], []
        for g in groups:
            if cur and sum(len(x[1]) for x in cur) + len(g[1]) > cfg.batch_size:
                chunks.append(cur)
                cur = []
            cur.append(g)
        if cur:
            chunks.append(cur)
        mbs = [self.make_mb(c, batch) for c in chunks]
        return mbs + self.padding(len(mbs), batch, adv), skipped

    def padding(self, have: int, batch: StepBatch, adv: Tensor) -> list[dict[str, Any]]:
        """Zero-weight micro-batches (one of this rank's groups) up to the most any rank has:
        every rank then runs as many forwards and backwards, which FSDP2's per-forward
        collectives need; they add nothing to the gradient, the loss or the metrics."""
        info = self.engine.dist
        if not info.enabled or not batch.ro.prompt_ids:
            return []
        need = int(ddp.all_reduce_max(float(have), info, self.engine.device)) - have
        n = batch.ro.n
        group = [(batch.ro.prompt_ids[0], list(range(n)), torch.zeros_like(adv.view(-1)[:n]))]
        pads = [self.make_mb(group, batch) for _ in range(need)]
        for mb in pads:
            mb["count"], mb["num_groups"], mb["pad"] = 0.0, 0, True
        return pads

    def make_mb(self, groups: list[tuple[Any, list[int], Tensor]],
                batch: StepBatch) -> dict[str, Any]:
        cfg, comps = self.cfg, batch.ro.completion_ids
        mb = build_batch([(p, [comps[k] for k in ks]) for p, ks, _ in groups],
                         cfg.prefix_sharing)
        lp = [torch.tensor(batch.ro.logprobs[k]) for _, ks, _ in groups for k in ks]
        mb["sampler_logp"] = torch.nn.utils.rnn.pad_sequence(lp, batch_first=True)
        mb["adv"] = torch.cat([a for _, _, a in groups])
        mb["count"] = aggregation_count(cfg.loss_type, mb["num_sequences"],
                                        mb["num_completion_tokens"], cfg.sampling.max_new_tokens)
        mb["num_groups"] = len(groups)
        mb = move_batch(mb, self.engine.device)
        if cfg.beta > 0:
            with reference_policy(self.engine.model, self.ref) as ref, \
                    autocast_context(cfg.precision, self.engine.device):
                mb["ref_logp"] = completion_logprobs(ref, mb, cfg.sampling.temperature)[0]
        return mb

    @torch.no_grad()
    def store_old_logprobs(self, mbs: list[dict[str, Any]]) -> None:
        """The sampling policy's log-probs of every micro-batch, before the first update (in
        eval mode, as the sampler ran it)."""
        model = self.engine.train_model
        self.engine.model.eval()
        for mb in mbs:
            with autocast_context(self.cfg.precision, self.engine.device):
                mb["old_logp"] = completion_logprobs(model, mb, self.cfg.sampling.temperature)[0]

    # -- evaluation and state ------------------------------------------------------------
    def evaluate(self, rows: list[Row]) -> dict[str, float]:
        """Every rank evaluates the same held-out rows (rank 0 logs them)."""
        with fsdp.gathered(self.engine.model):
            return evaluate_rewards(self.generator, self.rewards, self.tokenizer, rows,
                                    self.cfg.sampling.max_new_tokens, self.accuracy_of,
                                    self.cfg.eval.batch_size)

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


def check_across_ranks(cfg: GRPOConfig, info: ddp.DistInfo) -> None:
    """Refuse under torchrun what needs the whole step's groups on one rank."""
    if not info.enabled:
        return
    if cfg.dynamic_sampling:
        raise ConfigError("dynamic_sampling=true runs in one process: its refills count "
                          "groups over the whole step")
    if cfg.advantage == "reinforce_pp" or cfg.scale_rewards == "batch":
        raise ConfigError(f"advantage={cfg.advantage} with scale_rewards={cfg.scale_rewards} "
                          "uses whole-batch reward statistics: run it in one process")


def setup_grpo(cfg: GRPOConfig) -> tuple[online.OnlineRun, GRPO]:
    """The run's set-up and its GRPO state (engine, reference model, cursor)."""
    run = online.start_online(cfg)
    cfg = run.cfg
    check_across_ranks(cfg, ddp.current())
    engine = Engine(cfg, run.model, run.tokenizer, run.run_dir, run.steps * cfg.num_iterations)
    ref = None
    if cfg.beta > 0:
        ref = load_reference(run.model, cfg.model, engine.device,
                             trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    return run, GRPO(cfg, engine, run.cursor(), run.rewards, ref)


def train_grpo(cfg: GRPOConfig) -> Path:
    """Run GRPO end to end; returns the final HF model directory."""
    run, grpo = setup_grpo(cfg)
    return online.run_online(grpo.engine, grpo, grpo.cursor, run.held_out, run.resume_from)
