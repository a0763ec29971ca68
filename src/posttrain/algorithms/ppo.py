"""Classic RLHF with PPO (seed §5.4: EQ 5.3 objective, EQ 5.4 clipped surrogate).

Four networks: the policy pi_theta (trained), the frozen reference pi_ref (the starting
policy; under LoRA the policy with its adapters off), a reward model or any reward
functions (frozen), and a value model V_psi (trained, its own optimizer).

    for each step:
        prompts  <- next prompts_per_step rows (the cursor is checkpointed)
        rollouts <- num_generations samples per prompt from pi_theta (KV-cache sampler)
        score    <- reward model / reward functions - missing_eos_penalty if the turn never ended
        no grad:   logp_old (pi_theta), logp_ref (pi_ref), V_old (value model), per token
        r_t      <- -beta * (logp_old - logp_ref)_t  (+ score on the last token)     EQ 5.3
        A, R     <- GAE(gamma, lambda) over r and V_old; A whitened over the rollout
        repeat ppo_epochs: for each shuffled minibatch of mini_batch_size completions:
            one policy step:  clipped surrogate vs logp_old (dual clip, entropy bonus) EQ 5.4
            one value step:   clipped value loss vs R
        beta     <- adaptive KL controller (when kl_target is set)
        log, evaluate, checkpoint (policy, value model, both optimisers, beta)

Checkpoints hold the policy in ``model/`` and the value model in ``model/value/``; the
value optimizer and the KL controller ride in the engine's trainer state (``extra``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import get_scheduler

from posttrain.algorithms.grpo import encode_prompts, load_prompt_rows, score
from posttrain.config import TrainConfig
from posttrain.errors import ConfigError, TrainingError
from posttrain.losses.ppo import (
    adaptive_kl_beta,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from posttrain.models.io import load_model
from posttrain.models.lora import has_lora, reference_mode, save_pretrained_for_run
from posttrain.models.value import (
    completion_logits,
    load_value_model,
    policy_logprobs_entropy,
    save_value_model,
    token_values,
    value_adapter_dir,
)
from posttrain.rewards.base import RewardSet
from posttrain.rewards.registry import build_reward
from posttrain.rollout import KVCacheGenerator, Rollouts, SamplingParams, default_stop_ids
from posttrain.rollout.scoring import build_batch, completion_logprobs, enable_prefix_attention
from posttrain.train import distributed as ddp
from posttrain.train.engine import Engine, autocast_context
from posttrain.train.loop import BatchStream, total_steps
from posttrain.train.run import load_policy, move_batch, prepare_run

log = logging.getLogger("posttrain")

VALUE_DIR = "value"  # the value model's folder inside a checkpoint's model/ and final/
_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class PPOConfig(TrainConfig):
    """Classic RLHF: PPO with a value model, GAE and a KL penalty to the reference."""

    max_steps: int = field(
        default=-1, metadata={"help": "PPO steps (one rollout batch each); -1 = derive from "
                                      "epochs over the prompts"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per rollout batch"})
    num_generations: int = field(default=1, metadata={"help": "completions per prompt"})
    mini_batch_size: int = field(
        default=16, metadata={"help": "completions per optimizer step; must divide "
                                      "prompts_per_step * num_generations"})
    batch_size: int = field(
        default=16, metadata={"help": "max completions per forward (micro-batch); "
                                      "accumulated up to mini_batch_size"})
    ppo_epochs: int = field(default=2, metadata={"help": "mu: passes over each rollout batch"})
    max_new_tokens: int = field(default=64, metadata={"help": "completion token budget"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; 1 = off"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling; 0 = off"})
    stop: list[str] = field(default_factory=list,
                            metadata={"help": "extra stop strings (EOS/end-of-turn always stop)"})
    reward_model: str | None = field(
        default=None, metadata={"help": "reward model dir (posttrain rm's final/); its score "
                                        "is the reward"})
    rewards: list[str] = field(
        default_factory=list, metadata={"help": "reward functions (docs/rewards.md), added to "
                                                "the reward model's score"})
    reward_weights: list[float] = field(
        default_factory=list, metadata={"help": "one weight per reward: [reward_model (if "
                                                "set), *rewards]; [] = all 1"})
    reward_timeout_s: float = field(default=60.0, metadata={"help": "per reward call; 0 = none"})
    reward_on_error: float = field(
        default=0.0, metadata={"help": "score of rows whose reward call raised or timed out"})
    missing_eos_penalty: float = field(
        default=1.0, metadata={"help": "subtracted from the score of completions that hit "
                                       "max_new_tokens without ending their turn; 0 = off"})
    value_model: str = field(
        default="reward_model", metadata={"help": "value model init: reward_model | policy | "
                                                  "a model dir (body + head)"})
    value_lr: float = field(default=1e-5, metadata={"help": "value model learning rate"})
    beta: float = field(default=0.05, metadata={"help": "KL penalty coefficient (initial "
                                                        "value when kl_target is set)"})
    kl_target: float | None = field(
        default=None, metadata={"help": "adaptive beta: target sequence KL (nats); null = "
                                        "fixed beta"})
    kl_horizon: float = field(default=10000.0,
                              metadata={"help": "adaptive beta: horizon in sequences"})
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1", metadata={"help": "per-token KL in the reward: k1 = logp - logp_ref "
                                        "(sums to the sequence KL) | k3"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    whiten_advantages: bool = field(default=True,
                                    metadata={"help": "normalise advantages over the rollout"})
    epsilon: float = field(default=0.2, metadata={"help": "policy ratio clip (EQ 5.4)"})
    dual_clip: float | None = field(
        default=None, metadata={"help": "dual clip c > 1 for negative advantages; null = off"})
    value_clip: float | None = field(
        default=0.2, metadata={"help": "value clip range around the old values; null = off"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus weight"})
    prefix_sharing: bool = field(
        default=True, metadata={"help": "training forwards compute a shared prompt once"})
    eval_prompts: int = field(default=200, metadata={"help": "max held-out prompts evaluated"})
    lr: float = field(default=1e-6, metadata={"help": "policy peak learning rate (AdamW)"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata={"help": "learning-rate decay after warmup (both models)"})
    max_length: int = field(default=1024, metadata={"help": "max prompt + completion tokens"})

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.num_generations

    def validate(self) -> None:
        super().validate()
        if self.data is None:
            raise ConfigError("config key 'data' is required for ppo (prompt-only rows or "
                              "task:NAME)")
        if self.reward_model is None and not self.rewards:
            raise ConfigError("ppo needs a reward: set reward_model=DIR and/or rewards=[...]")
        if self.value_model == "reward_model" and self.reward_model is None:
            raise ConfigError("value_model=reward_model needs reward_model=DIR; or set "
                              "value_model=policy")
        n_fns = len(self.rewards) + (self.reward_model is not None)
        if self.reward_weights and len(self.reward_weights) != n_fns:
            raise ConfigError(f"{n_fns} rewards (reward_model counts as the first) but "
                              f"{len(self.reward_weights)} reward_weights")
        for name in ("prompts_per_step", "num_generations", "mini_batch_size", "ppo_epochs",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_accum != 1:
            raise ConfigError("ppo accumulates micro-batches of batch_size up to "
                              "mini_batch_size; leave grad_accum at 1")
        if self.rollout_size % self.mini_batch_size:
            raise ConfigError(f"mini_batch_size={self.mini_batch_size} must divide "
                              f"prompts_per_step * num_generations = {self.rollout_size}")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError("max_new_tokens must be < max_length (room for the prompt)")
        if not self.temperature > 0:
            raise ConfigError("temperature must be > 0 for training rollouts")
        self._validate_coefficients()

    def _validate_coefficients(self) -> None:
        checks = [
            ("beta", self.beta >= 0), ("value_lr", self.value_lr > 0),
            ("epsilon", self.epsilon > 0), ("entropy_coef", self.entropy_coef >= 0),
            ("missing_eos_penalty", self.missing_eos_penalty >= 0),
            ("gamma", 0 <= self.gamma <= 1), ("lam", 0 <= self.lam <= 1),
            ("kl_horizon", self.kl_horizon > 0),
            ("kl_target", self.kl_target is None or self.kl_target > 0),
            ("dual_clip", self.dual_clip is None or self.dual_clip > 1),
            ("value_clip", self.value_clip is None or self.value_clip > 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)} is out of range (see "
                                  f"posttrain ppo --help)")


# ----------------------------------------------------------------------------- state pieces


class KLController:
    """beta of EQ 5.3: fixed, or adapted towards ``target`` (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float | None, horizon: float):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_sequences: int) -> None:
        if self.target is not None:
            self.beta = adaptive_kl_beta(self.beta, kl, self.target, self.horizon, n_sequences)

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


class CriticOptimizer:
    """The value model's AdamW and LR schedule, stepped once per policy step (the engine
    owns the policy's). Same accumulation rule as ``Engine.update``: each micro-batch's
    loss is already divided by the whole minibatch's normaliser."""

    def __init__(self, cfg: PPOConfig, model: nn.Module, total: int):
        self.cfg, self.model = cfg, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the value model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.value_lr,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(_SCHEDULERS[cfg.lr_scheduler], self.optimizer,
                                       num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=max(total, 1))
        self.bad_streak = 0

    def update(self, mbs: Sequence[dict[str, Any]], loss_fn: Callable,
               count_fn: Callable[[dict[str, Any]], float]) -> dict[str, float]:
        device = next(self.model.parameters()).device
        self.model.train()
        counts = [float(count_fn(mb)) for mb in mbs]
        normalizer = max(sum(counts), 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        total, sums = 0.0, {}
        for mb, count in zip(mbs, counts, strict=True):
            with autocast_context(self.cfg.precision, device):
                loss, metrics = loss_fn(self.model, mb, normalizer)
            loss.backward()
            total += float(loss.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * count / normalizer
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if torch.isfinite(torch.tensor([total, norm])).all():
            self.optimizer.step()
            self.bad_streak = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_streak += 1
            log.warning("value model: non-finite loss/gradient; step skipped")
            if self.bad_streak >= self.cfg.max_bad_steps:
                raise TrainingError(f"value model: {self.bad_streak} consecutive non-finite "
                                    "steps; lower value_lr or use precision=fp32")
        self.scheduler.step()
        return {**sums, "train/value_grad_norm": norm,
                "train/value_lr": self.scheduler.get_last_lr()[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "bad_streak": self.bad_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.bad_streak = int(state["bad_streak"])


@dataclass
class Rollout:
    """One step's experience; per-token tensors are (S, L), 0 beyond each completion."""

    ro: Rollouts
    scores: Tensor  # (S,)
    mask: Tensor  # (S, L) bool
    old_logp: Tensor
    ref_logp: Tensor
    old_values: Tensor
    kl: Tensor
    adv: Tensor
    returns: Tensor


# ----------------------------------------------------------------------------- the trainer


class PPOTrainer:
    """The state of a PPO run; ``step`` reads like the algorithm box above."""

    def __init__(self, cfg: PPOConfig, engine: Engine, value: nn.Module, critic: CriticOptimizer,
                 rows: list[dict[str, Any]], rewards: RewardSet, reference: nn.Module | None,
                 kl_ctl: KLController):
        self.cfg, self.engine, self.value, self.critic = cfg, engine, value, critic
        self.rows, self.rewards, self.ref, self.kl_ctl = rows, rewards, reference, kl_ctl
        self.tokenizer = engine.tokenizer
        self.stream = BatchStream(rows, cfg.prompts_per_step, list, seed=cfg.seed)
        self.generator = KVCacheGenerator(
            engine.model, self.tokenizer, precision=cfg.precision,
            stop_token_ids=default_stop_ids(engine.model, self.tokenizer))
        self.updates_per_step = cfg.ppo_epochs * (cfg.rollout_size // cfg.mini_batch_size)
        self.warned = 0

    @property
    def ppo_step(self) -> int:
        return self.engine.step // self.updates_per_step

    # -- experience --------------------------------------------------------------------------
    def rollout(self) -> tuple[Rollout, dict[str, float]]:
        cfg, t0 = self.cfg, time.perf_counter()
        rows = self.next_rows(cfg.prompts_per_step)
        seed = (cfg.seed * 1_000_003 + self.ppo_step * 101) % 2**62
        ro = self.generator.generate([r["_ids"] for r in rows], cfg.num_generations,
                                     SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                                    top_k=cfg.top_k, stop_strings=tuple(cfg.stop),
                                                    max_new_tokens=cfg.max_new_tokens, seed=seed))
        t1 = time.perf_counter()
        raw, stats, _ = score(self.rewards, self.tokenizer, rows, ro)
        stats.pop("reward/accuracy", None)
        no_eos = torch.tensor([r == "length" for r in ro.finish_reasons], dtype=torch.float)
        scores = raw - cfg.missing_eos_penalty * no_eos  # (S,)
        t2 = time.perf_counter()
        old_logp, ref_logp, old_values, mask = self.forward_no_grad(ro)
        beta = self.kl_ctl.beta
        r, kl = kl_penalized_rewards(scores, old_logp, ref_logp, mask, beta, cfg.kl_estimator)
        adv, returns = gae(r, old_values, mask, cfg.gamma, cfg.lam)
        stats.update(self.experience_stats(ro, scores, kl, adv, returns, old_values, mask, beta))
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask)
        stats.update({"time/generate_s": t1 - t0, "time/reward_s": t2 - t1,
                      "time/logprobs_s": time.perf_counter() - t2, **ro.stats})
        return Rollout(ro, scores, mask, old_logp, ref_logp, old_values, kl, adv, returns), stats

    def next_rows(self, n: int) -> list[dict[str, Any]]:
        """Exactly ``n`` prompts (an epoch's short tail is topped up from the next epoch), so
        every step has the same number of minibatches."""
        rows: list[dict[str, Any]] = []
        while len(rows) < n:
            rows += self.stream.next()[: n - len(rows)]
        return rows

    def experience_stats(self, ro: Rollouts, scores: Tensor, kl: Tensor, adv: Tensor,
                         returns: Tensor, values: Tensor, mask: Tensor,
                         beta: float) -> dict[str, float]:
        seq_kl = kl.sum(-1)  # (S,)
        lengths = mask.sum(-1).float()
        m = mask
        return {
            "objective/kl": float(seq_kl.mean()), "objective/score": float(scores.mean()),
            "objective/rlhf_reward": float((scores - beta * seq_kl).mean()),
            "objective/beta": beta,
            "ppo/explained_variance": explained_variance(values, returns, mask),
            "returns/mean": float(returns[m].mean()), "returns/std": float(returns[m].std()),
            "advantages/mean": float(adv[m].mean()), "advantages/std": float(adv[m].std()),
            "values/mean": float(values[m].mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/max_length": float(lengths.max()),
            "completions/no_eos_frac": sum(r == "length" for r in ro.finish_reasons) / len(ro),
        }

    @torch.no_grad()
    def forward_no_grad(self, ro: Rollouts) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """logp_old, logp_ref, V_old (S, L) and the mask, in micro-batches of batch_size."""
        S, L = len(ro), max(len(c) for c in ro.completion_ids)
        out = [torch.zeros(S, L) for _ in range(3)]
        policy, dev = self.engine.model, self.engine.device
        policy.eval()
        self.value.eval()
        for s in range(0, S, self.cfg.batch_size):
            mb = self.make_mb(ro, list(range(s, min(s + self.cfg.batch_size, S))))
            idx, width = mb["idx"], mb["mask"].shape[1]
            with autocast_context(self.cfg.precision, dev):
                parts = (completion_logprobs(policy, mb, self.cfg.temperature)[0],
                         self.ref_logprobs(mb), token_values(self.value, mb))
            for o, p in zip(out, parts, strict=True):
                o[idx, :width] = p.float().cpu()
        lengths = torch.tensor([len(c) for c in ro.completion_ids])
        mask = torch.arange(L)[None] < lengths[:, None]
        return out[0], out[1], out[2] * mask, mask

    def ref_logprobs(self, mb: dict[str, Any]) -> Tensor:
        if self.ref is not None:
            return completion_logprobs(self.ref, mb, self.cfg.temperature)[0]
        with reference_mode(self.engine.model) as ref:  # LoRA: the adapters-off policy
            return completion_logprobs(ref, mb, self.cfg.temperature)[0]

    def make_mb(self, ro: Rollouts, idx: Sequence[int]) -> dict[str, Any]:
        """A micro-batch of completions ``idx``; completions of one prompt share its prefix.
        ``mb["idx"]`` lists them in the batch's row order."""
        by_prompt: dict[int, list[int]] = {}
        for k in sorted(idx):
            by_prompt.setdefault(ro.prompt_of(k), []).append(k)
        order = [k for ks in by_prompt.values() for k in ks]
        mb = build_batch([(ro.prompt_ids[p], [ro.completion_ids[k] for k in ks])
                          for p, ks in by_prompt.items()], self.cfg.prefix_sharing)
        mb = move_batch(mb, self.engine.device)
        if "prefix_layout" in mb:
            mb["prefix_layout"] = mb["prefix_layout"].to(self.engine.device)
        mb["idx"] = torch.tensor(order)
        return mb

    # -- optimisation ------------------------------------------------------------------------
    def train_mb(self, exp: Rollout, idx: Sequence[int], epoch: int) -> dict[str, Any]:
        mb = self.make_mb(exp.ro, idx)
        rows, width, dev = mb["idx"], mb["mask"].shape[1], self.engine.device
        for name in ("old_logp", "adv", "old_values", "returns"):
            mb[name] = getattr(exp, name)[rows, :width].to(dev)
        mb["first_epoch"] = epoch == 0
        return mb

    def policy_loss(self, model: nn.Module, mb: dict[str, Any], normalizer: float):  # noqa: ANN201
        cfg = self.cfg
        if cfg.entropy_coef > 0:
            logp, ent = policy_logprobs_entropy(model, mb, cfg.temperature)
        else:  # entropy only as a metric, on the first epoch (it costs a softmax)
            logp, ent = completion_logprobs(model, mb, cfg.temperature,
                                            with_entropy=mb["first_epoch"])
        return ppo_policy_loss(logp, mb["old_logp"], mb["adv"], mb["mask"], normalizer,
                               epsilon=cfg.epsilon, dual_clip=cfg.dual_clip, entropy=ent,
                               entropy_coef=cfg.entropy_coef)

    def value_loss(self, model: nn.Module, mb: dict[str, Any], normalizer: float):  # noqa: ANN201
        return ppo_value_loss(token_values(model, mb), mb["old_values"], mb["returns"],
                              mb["mask"], normalizer, clip_range=self.cfg.value_clip)

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        exp, stats = self.rollout()
        self.warn(stats)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.ppo_step)
        count = lambda mb: float(mb["num_completion_tokens"])  # noqa: E731 - token-mean losses
        sums: dict[str, list[float]] = {}
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(len(exp.ro), generator=gen).tolist()
            for s in range(0, len(perm), cfg.mini_batch_size):
                chunk = perm[s : s + cfg.mini_batch_size]
                mbs = [self.train_mb(exp, chunk[i : i + cfg.batch_size], epoch)
                       for i in range(0, len(chunk), cfg.batch_size)]
                metrics = {**self.engine.update(mbs, self.policy_loss, count),
                           **self.critic.update(mbs, self.value_loss, count)}
                for k, v in metrics.items():
                    sums.setdefault(k, []).append(float(v))
        self.kl_ctl.update(stats["objective/kl"], len(exp.ro))
        stats["time/train_s"] = time.perf_counter() - t0
        total = sum(stats[f"time/{k}_s"] for k in ("generate", "reward", "logprobs", "train"))
        for k in ("generate", "reward", "logprobs", "train"):
            stats[f"time/{k}_frac"] = stats[f"time/{k}_s"] / max(total, 1e-9)
        return {**{k: sum(v) / len(v) for k, v in sums.items()}, **stats}

    def warn(self, stats: dict[str, float]) -> None:
        """Every completion hit max_new_tokens: the rewards likely mean little (DESIGN §7)."""
        if stats["completions/no_eos_frac"] == 1.0:
            if self.warned % 20 == 0:
                log.warning("step %d: every completion hit max_new_tokens=%d without ending "
                            "its turn; raise max_new_tokens", self.ppo_step + 1,
                            self.cfg.max_new_tokens)
            self.warned += 1

    def evaluate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        m = evaluate_policy(self.engine.model, self.ref, self.tokenizer, rows, self.rewards,
                            max_new_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed,
                            precision=self.cfg.precision)
        return {f"eval/{k}": v for k, v in m.items()}


# ----------------------------------------------------------------------------- evaluation


def _reference_ctx(policy: nn.Module, ref: nn.Module | None) -> AbstractContextManager:
    return reference_mode(policy) if ref is None else nullcontext(ref)


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
        with _reference_ctx(policy, ref) as r:
            ref_logp = torch.log_softmax(completion_logits(r, mb), -1)
        tok_kl = (logp.exp() * (logp - ref_logp)).sum(-1).clamp_min(0.0)  # (M,) rounding
        per = torch.zeros(mb["mask"].shape).masked_scatter(mb["mask"].cpu(), tok_kl.cpu())
        out.append(per.sum(-1))
    return torch.cat(out)


def evaluate_policy(policy: nn.Module, ref: nn.Module | None, tokenizer: Any,
                    rows: list[dict[str, Any]], rewards: RewardSet, *, max_new_tokens: int,
                    seed: int = 0, precision: str = "fp32") -> dict[str, float]:
    """Held-out prompts (rows with ``_ids``): ``score`` = mean reward of greedy completions;
    ``score_sampled`` and ``kl`` (mean ``sequence_kl`` to ``ref``) on one fixed-seed sample
    per prompt at temperature 1; ``no_eos_frac`` of the greedy completions."""
    gen = KVCacheGenerator(policy, tokenizer, precision=precision,
                           stop_token_ids=default_stop_ids(policy, tokenizer))
    ids = [r["_ids"] for r in rows]
    was_training = policy.training
    policy.eval()
    try:
        greedy = gen.generate(ids, 1, SamplingParams(temperature=0.0,
                                                     max_new_tokens=max_new_tokens))
        sampled = gen.generate(ids, 1, SamplingParams(temperature=1.0, seed=seed,
                                                      max_new_tokens=max_new_tokens))
        kl = sequence_kl(policy, ref, sampled)
    finally:
        policy.train(was_training)
    return {"score": float(score(rewards, tokenizer, rows, greedy)[0].mean()),
            "score_sampled": float(score(rewards, tokenizer, rows, sampled)[0].mean()),
            "kl": float(kl.mean()),
            "no_eos_frac": sum(r == "length" for r in greedy.finish_reasons) / len(greedy)}


# ----------------------------------------------------------------------------- the run


def build_rewards(cfg: PPOConfig) -> RewardSet:
    """The reward model (named ``rm``) first, then the reward functions."""
    fns: list[Any] = []
    if cfg.reward_model is not None:
        from posttrain.rewards.reward_model import RewardModel

        rm = RewardModel(cfg.reward_model, max_length=cfg.max_length, precision=cfg.precision)
        rm.__name__ = "rm"  # type: ignore[attr-defined]  # metrics: reward/rm/mean
        fns.append(rm)
    fns += [build_reward(n) for n in cfg.rewards]
    return RewardSet(fns, cfg.reward_weights or None, timeout_s=cfg.reward_timeout_s or None,
                     on_error=cfg.reward_on_error)


def value_spec(cfg: PPOConfig) -> str:
    if cfg.value_model == "reward_model":
        return str(cfg.reward_model)
    return cfg.model if cfg.value_model == "policy" else cfg.value_model


def load_value(cfg: PPOConfig, tokenizer: Any, resume_from: Path | None,
               device: torch.device) -> nn.Module:
    """From ``value_spec``; when resuming, the checkpoint's full weights or adapter."""
    saved = resume_from / "model" / VALUE_DIR if resume_from is not None else None
    if saved is not None and value_adapter_dir(saved) is None:
        model = load_value_model(str(saved), tokenizer)
    else:
        model = load_value_model(value_spec(cfg), tokenizer, lora=cfg.lora, adapter_dir=saved,
                                 trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    return model.to(device)


def load_frozen_reference(cfg: PPOConfig, device: torch.device) -> nn.Module:
    ref = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    enable_prefix_attention(ref)
    return ref.requires_grad_(False).eval().to(device)


class _Saver:
    """Engine save hook: the policy in ``path``, the value model in ``path/value``."""

    def __init__(self, cfg: PPOConfig, policy: nn.Module, value: nn.Module, tokenizer: Any):
        self.cfg, self.policy, self.value, self.tokenizer = cfg, policy, value, tokenizer
        self.final = False

    def __call__(self, path: Path) -> None:
        merge = self.final and self.cfg.lora.merge
        save_pretrained_for_run(self.policy, self.tokenizer, path, merge=merge)
        save_value_model(self.value, self.tokenizer, path / VALUE_DIR, merge=merge)


def train_ppo(cfg: PPOConfig) -> Path:
    """Run PPO end to end; returns the final directory (policy; value model in ``value/``)."""
    run_dir, resume_from = prepare_run(cfg)
    if ddp.current().enabled:
        raise ConfigError("ppo runs in one process (no torchrun data parallelism yet)")
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
    rewards = build_rewards(cfg)
    device = next(model.parameters()).device
    value = load_value(cfg, tokenizer, resume_from, device)
    steps = total_steps(cfg.max_steps, cfg.epochs, -(-len(rows) // cfg.prompts_per_step), 1)
    updates = cfg.ppo_epochs * (cfg.rollout_size // cfg.mini_batch_size)
    saver = _Saver(cfg, model, value, tokenizer)
    engine = Engine(cfg, model, tokenizer, run_dir, steps * updates, save_model_fn=saver)
    critic = CriticOptimizer(cfg, value, steps * updates)
    ref = None if has_lora(model) else load_frozen_reference(cfg, device)
    trainer = PPOTrainer(cfg, engine, value, critic, rows, rewards, ref,
                         KLController(cfg.beta, cfg.kl_target, cfg.kl_horizon))
    if resume_from is not None:
        state = engine.restore(resume_from)
        trainer.stream.load_state(state["cursor"])
        critic.load_state_dict(state["extra"]["critic"])
        trainer.kl_ctl.load_state_dict(state["extra"]["kl_controller"])
    engine.log({"data/rows": len(rows), "data/held_out_rows": len(held_out or [])})
    every = lambda k: k and trainer.ppo_step % k == 0  # noqa: E731
    try:
        while engine.step < engine.total_steps:
            metrics = trainer.step()
            done = engine.step >= engine.total_steps
            if held_out and (done or every(cfg.eval_steps)):
                metrics.update(trainer.evaluate(held_out))
            if done or every(max(cfg.logging_steps, 1)):
                engine.log(metrics)
            if every(cfg.save_steps) and not done:
                engine.save(trainer.stream.state(), {"critic": critic.state_dict(),
                                                     "kl_controller": trainer.kl_ctl.state_dict()})
        saver.final = True
        return engine.save_final()
    finally:
        engine.close()
