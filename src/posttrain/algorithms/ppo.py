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

The value model is the engine's second trained model (``Engine.add_model``): checkpoints hold
it in ``model/value/`` with its optimizer; the KL controller is the recipe's own state. The
loop, set-up and checkpoints are ``train/online.py``'s.

Under torchrun each rank takes a contiguous share of the step's prompts and samples, scores
and values their completions itself (its sampling seed includes its rank). What needs the
whole rollout is reduced over ranks: the advantages are whitened with the whole step's mean
and variance, the KL controller reads the step's mean KL. Every rank draws the same minibatch
permutation of the step's completions and trains on the members it holds, padded with
zero-weight micro-batches to as many as any rank has (FSDP2 runs collectives per forward), so
N ranks take the same optimizer steps as one process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
from posttrain.evals.policy import evaluate_policy
from posttrain.losses.ppo import (
    adaptive_kl_beta,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from posttrain.models.completion import completion_logprobs, token_values
from posttrain.models.device import autocast_context
from posttrain.models.reference import load_reference, reference_policy
from posttrain.models.value import load_value_model, value_adapter_dir
from posttrain.rewards.base import RewardSet
from posttrain.rewards.scoring import lengths, no_eos_frac, score_rollouts
from posttrain.rollout import Rollouts
from posttrain.rollout.batching import build_batch
from posttrain.rollout.config import SamplingConfig
from posttrain.train import checkpoint as ckpt
from posttrain.train import distributed as ddp
from posttrain.train import fsdp, online
from posttrain.train.engine import Engine

VALUE = "value"  # the value model's name in the engine, and its folder in model/ and final/


@dataclass
class PPOConfig(online.OnlineConfig):
    """Classic RLHF: PPO with a value model, GAE and a KL penalty to the reference."""

    RANGES: ClassVar[dict[str, str]] = {
        "prompts_per_step": ">= 1", "num_generations": ">= 1", "mini_batch_size": ">= 1",
        "ppo_epochs": ">= 1", "missing_eos_penalty": ">= 0", "value_lr": "> 0",
        "beta": ">= 0", "kl_target": "> 0", "kl_horizon": "> 0", "gamma": "[0, 1]",
        "lam": "[0, 1]", "epsilon": "(0, 1)", "dual_clip": "> 1", "value_clip": "> 0",
        "entropy_coef": ">= 0",
    }
    ONLY_WITH: ClassVar[dict[str, Needs]] = {
        **EVAL_ONLY_WITH,
        # The controller scales beta, so from beta = 0 it never moves.
        "kl_target": Needs("beta", "> 0", "the adaptive controller scales beta"),
        "kl_horizon": Needs("kl_target", None, "it sets the adaptive controller's speed"),
    }

    num_generations: int = field(default=1, metadata={"help": "completions per prompt"})
    mini_batch_size: int = field(
        default=16, metadata={"help": "completions per optimizer step; must divide "
                                      "prompts_per_step * num_generations"})
    batch_size: int = field(
        default=16, metadata={"help": "max completions per forward (micro-batch); "
                                      "accumulated up to mini_batch_size"})
    ppo_epochs: int = field(default=2, metadata={"help": "mu: passes over each rollout batch"})
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64),
                                     metadata={"help": "rollout sampling"})
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

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * (self.rollout_size // self.mini_batch_size)

    def validate(self) -> None:
        super().validate()
        if not self.reward.count:
            raise ConfigError("ppo needs a reward: set reward.model=DIR (reward_model) and/or "
                              "reward.functions=[...] (rewards)")
        if self.value_model == "reward_model" and self.reward.model is None:
            raise ConfigError("value_model=reward_model needs reward_model=DIR; or set "
                              "value_model=policy")
        if self.grad_accum != 1:
            raise ConfigError(f"grad_accum={self.grad_accum} has no effect in ppo: it "
                              "accumulates micro-batches of batch_size up to mini_batch_size; "
                              "leave grad_accum at 1")
        if self.rollout_size % self.mini_batch_size:
            raise ConfigError(f"mini_batch_size={self.mini_batch_size} must divide "
                              f"prompts_per_step * num_generations = {self.rollout_size}")


def _token_count(mb: dict[str, Any]) -> float:
    """A micro-batch's share of the token-mean losses' normaliser (padding: none)."""
    return 0.0 if mb.get("pad") else float(mb["num_completion_tokens"])


def _unless_padding(mb: dict[str, Any], loss: Tensor, metrics: dict[str, Tensor]
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """A padding micro-batch (``PPO.minibatch``) runs its graph and adds nothing."""
    return (loss * 0.0 if mb.get("pad") else loss), metrics


def gather_rows(tensors: list[Tensor], info: ddp.DistInfo) -> list[Tensor]:
    """Every rank's rows of each tensor (S_r, ...) or (S_r, L_r), concatenated in rank order
    (the order of one process's rollout) and zero-padded to the longest L: the step's
    statistics are then exactly one process's. The tensors are small (a step's scalars)."""
    if not info.enabled:
        return tensors
    shares = ddp.all_gather_object([t.cpu() for t in tensors], info)
    out = []
    for i, t in enumerate(tensors):
        parts = [share[i] for share in shares]  # type: ignore[index]
        if t.dim() == 2:
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
        out.append(torch.cat(parts))
    return out


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


@dataclass
class Experience:
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


class PPO:
    """The state of a PPO run; ``step`` reads like the algorithm box above."""

    def __init__(self, cfg: PPOConfig, engine: Engine, value: nn.Module, cursor: PromptCursor,
                 rewards: RewardSet, reference: nn.Module | None):
        self.cfg, self.engine, self.value, self.cursor = cfg, engine, value, cursor
        self.rewards, self.ref = rewards, reference
        self.kl_ctl = KLController(cfg.beta, cfg.kl_target, cfg.kl_horizon)
        self.tokenizer = engine.tokenizer
        self.updates_per_step = cfg.updates_per_step
        self.generator = online.policy_sampler(engine)
        self.warnings = online.Warnings()

    @property
    def rl_step(self) -> int:
        return self.engine.step // self.updates_per_step

    # -- the step ------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        cfg = self.cfg
        exp, stats = self.rollout()
        self.warnings.check("no_eos", stats["completions/no_eos_frac"] == 1.0, self.rl_step + 1,
                            f"every completion hit max_new_tokens={cfg.sampling.max_new_tokens} "
                            "without ending its turn; raise max_new_tokens")
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.rl_step)
        sums: dict[str, list[float]] = {}
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(cfg.rollout_size, generator=gen).tolist()  # the whole step's
            for s in range(0, len(perm), cfg.mini_batch_size):
                mbs = self.minibatch(exp, perm[s : s + cfg.mini_batch_size], epoch)
                metrics = {**self.engine.update(mbs, self.policy_loss, _token_count),
                           **self.engine.update(mbs, self.value_loss, _token_count, model=VALUE)}
                for k, v in metrics.items():
                    sums.setdefault(k, []).append(float(v))
        self.kl_ctl.update(stats["objective/kl"], cfg.rollout_size)
        stats["time/train_s"] = time.perf_counter() - t0
        stats.update(online.time_fractions(stats, ("generate", "reward", "logprobs", "train")))
        return {**{k: sum(v) / len(v) for k, v in sums.items()}, **stats}

    def policy_loss(self, model: nn.Module, mb: dict[str, Any], normalizer: float
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        # Without a bonus the entropy is only a metric, on the first epoch (it costs a softmax).
        entropy = "grad" if cfg.entropy_coef > 0 else "detached" if mb["first_epoch"] else "none"
        logp, ent = completion_logprobs(model, mb, cfg.sampling.temperature, entropy=entropy)
        return _unless_padding(mb, *ppo_policy_loss(
            logp, mb["old_logp"], mb["adv"], mb["mask"], normalizer, epsilon=cfg.epsilon,
            dual_clip=cfg.dual_clip, entropy=ent, entropy_coef=cfg.entropy_coef))

    def value_loss(self, model: nn.Module, mb: dict[str, Any], normalizer: float
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        return _unless_padding(mb, *ppo_value_loss(
            token_values(model, mb), mb["old_values"], mb["returns"], mb["mask"], normalizer,
            clip_range=self.cfg.value_clip))

    # -- experience ----------------------------------------------------------------------
    def rollout(self) -> tuple[Experience, dict[str, float]]:
        """This rank's share of the step: sampled, scored, valued; advantages whitened over
        the whole step, statistics reduced over ranks."""
        cfg, info, t0 = self.cfg, self.engine.dist, time.perf_counter()
        rows = online.rank_slice(self.cursor.next(cfg.prompts_per_step), info)
        seed = (cfg.seed * 1_000_003 + self.rl_step * 101 + info.rank * 7_919) % 2**62
        # All ranks sample at once; the gathered weights let their lengths differ (fsdp2).
        with fsdp.gathered(self.engine.model):
            ro = self.generator.generate([r["_ids"] for r in rows], cfg.num_generations,
                                         cfg.sampling.params(seed))
        t1 = time.perf_counter()
        out, _ = score_rollouts(self.rewards, self.tokenizer, rows, ro)
        no_eos = torch.tensor([r == "length" for r in ro.finish_reasons], dtype=torch.float)
        scores = out.total - cfg.missing_eos_penalty * no_eos  # (S,)
        t2 = time.perf_counter()
        old_logp, ref_logp, old_values, mask = self.forward_no_grad(ro)
        beta = self.kl_ctl.beta
        r, kl = kl_penalized_rewards(scores, old_logp, ref_logp, mask, beta, cfg.kl_estimator)
        adv, returns = gae(r, old_values, mask, cfg.gamma, cfg.lam)
        step_tensors = gather_rows([scores, kl, adv, returns, old_values, mask], info)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask, total=partial(ddp.all_reduce_tensor, info=info,
                                                         device=self.engine.device))
        stats = online.mean_over_ranks(
            {**out.metrics, "completions/no_eos_frac": no_eos_frac(ro), **ro.stats,
             "time/generate_s": t1 - t0, "time/reward_s": t2 - t1,
             "time/logprobs_s": time.perf_counter() - t2}, self.engine)
        exp = Experience(ro, scores, mask, old_logp, ref_logp, old_values, kl, adv, returns)
        return exp, {**stats, **self.experience_stats(*step_tensors, beta)}

    @staticmethod
    def experience_stats(scores: Tensor, kl: Tensor, adv: Tensor, returns: Tensor,
                         values: Tensor, mask: Tensor, beta: float) -> dict[str, float]:
        """Statistics of the step's experience (every rank's rows: ``gather_rows``)."""
        seq_kl, n, m = kl.sum(-1), mask.sum(-1).float(), mask  # (S,)
        return {
            "objective/kl": float(seq_kl.mean()), "objective/score": float(scores.mean()),
            "objective/rlhf_reward": float((scores - beta * seq_kl).mean()),
            "objective/beta": beta,
            "ppo/explained_variance": explained_variance(values, returns, mask),
            "returns/mean": float(returns[m].mean()), "returns/std": float(returns[m].std()),
            "advantages/mean": float(adv[m].mean()), "advantages/std": float(adv[m].std()),
            "values/mean": float(values[m].mean()),
            "completions/mean_length": float(n.mean()),
            "completions/max_length": float(n.max()),
        }

    @torch.no_grad()
    def forward_no_grad(self, ro: Rollouts) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """logp_old, logp_ref, V_old (S, L) and the mask, in micro-batches of batch_size."""
        cfg = self.cfg
        S, L = len(ro), max(len(c) for c in ro.completion_ids)
        out = [torch.zeros(S, L) for _ in range(3)]
        policy, dev = self.engine.model, self.engine.device
        policy.eval()
        self.value.eval()
        for s in range(0, S, cfg.batch_size):
            mb = self.make_mb(ro, list(range(s, min(s + cfg.batch_size, S))))
            idx, width = mb["idx"], mb["mask"].shape[1]
            with autocast_context(cfg.precision, dev):
                logp = completion_logprobs(policy, mb, cfg.sampling.temperature)[0]
                with reference_policy(policy, self.ref) as ref:
                    ref_logp = completion_logprobs(ref, mb, cfg.sampling.temperature)[0]
                values = token_values(self.value, mb)
            for o, p in zip(out, (logp, ref_logp, values), strict=True):
                o[idx, :width] = p.float().cpu()
        mask = torch.arange(L)[None] < lengths(ro)[:, None]
        return out[0], out[1], out[2] * mask, mask

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
        mb["idx"] = torch.tensor(order)
        return mb

    def minibatch(self, exp: Experience, chunk: Sequence[int], epoch: int
                  ) -> list[dict[str, Any]]:
        """This rank's micro-batches of one minibatch (``chunk``: indices into the whole
        step's completions, rank r holding the r-th contiguous share): the members it holds,
        ``batch_size`` per micro-batch, padded to as many micro-batches as any rank has."""
        info, held, bs = self.engine.dist, len(exp.ro), self.cfg.batch_size
        first = info.rank * held
        mine = [k - first for k in chunk if first <= k < first + held]
        mbs = [self.train_mb(exp, mine[i : i + bs], epoch) for i in range(0, len(mine), bs)]
        if not info.enabled:
            return mbs
        need = int(ddp.all_reduce_max(float(len(mbs)), info, self.engine.device)) - len(mbs)
        return mbs + [{**self.train_mb(exp, [0], epoch), "pad": True} for _ in range(need)]

    def train_mb(self, exp: Experience, idx: Sequence[int], epoch: int) -> dict[str, Any]:
        mb = self.make_mb(exp.ro, idx)
        rows, width, dev = mb["idx"], mb["mask"].shape[1], self.engine.device
        for name in ("old_logp", "adv", "old_values", "returns"):
            mb[name] = getattr(exp, name)[rows, :width].to(dev)
        mb["first_epoch"] = epoch == 0
        return mb

    # -- evaluation and state ------------------------------------------------------------
    def evaluate(self, rows: list[Row]) -> dict[str, float]:
        """Every rank evaluates the same held-out rows (rank 0 logs them)."""
        with fsdp.gathered(self.engine.model):
            m = evaluate_policy(self.engine.model, self.ref, self.tokenizer, rows, self.rewards,
                                max_new_tokens=self.cfg.sampling.max_new_tokens,
                                seed=self.cfg.seed, precision=self.cfg.precision,
                                batch_size=self.cfg.eval.batch_size)
        return {f"eval/{k}": v for k, v in m.items()}

    def state(self) -> dict[str, Any]:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])


def load_value(cfg: PPOConfig, tokenizer: Any, resume_from: Path | None,
               device: torch.device) -> nn.Module:
    """The value model: from the checkpoint when resuming (full weights, or the base from
    ``value_model`` + the saved adapter), else from ``value_model``."""
    # A sharded checkpoint's weights are loaded by Engine.restore into the starting model.
    saved = (resume_from / "model" / VALUE if resume_from is not None
             and not ckpt.is_sharded(resume_from) else None)
    if saved is not None and value_adapter_dir(saved) is None:
        return load_value_model(str(saved), tokenizer, require_head=True).to(device)
    spec = {"reward_model": str(cfg.reward.model), "policy": cfg.model}.get(cfg.value_model,
                                                                          cfg.value_model)
    model = load_value_model(spec, tokenizer, lora=cfg.lora, adapter_dir=saved,
                             trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    return model.to(device)


def setup_ppo(cfg: PPOConfig) -> tuple[online.OnlineRun, PPO]:
    """The run's set-up and its PPO state (engine, value and reference models, cursor)."""
    run = online.start_online(cfg)
    cfg = run.cfg
    device = next(run.model.parameters()).device
    value = load_value(cfg, run.tokenizer, run.resume_from, device)
    engine = Engine(cfg, run.model, run.tokenizer, run.run_dir, run.steps * cfg.updates_per_step)
    engine.add_model(VALUE, value, cfg.value_lr, lr_key="value_lr")
    ref = load_reference(run.model, cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                         seed=cfg.seed)
    return run, PPO(cfg, engine, value, run.cursor(), run.rewards, ref)


def train_ppo(cfg: PPOConfig) -> Path:
    """Run PPO end to end; returns the final directory (policy; value model in ``value/``)."""
    run, ppo = setup_ppo(cfg)
    return online.run_online(ppo.engine, ppo, ppo.cursor, run.held_out, run.resume_from)
