"""The online-RL skeleton shared by GRPO and PPO: their common config, set-up and loop.

    set-up   run dir, policy (prefix-shared attention where the model allows), prompt rows,
             held-out rows, the reward; the recipe adds its reference and its own state
    loop     the recipe's step (rollout -> reward -> updates), evaluate every eval_steps and
             at the end, log, checkpoint every save_steps (cursor + the recipe's state)

A recipe is any object with ``updates_per_step`` (optimizer steps per RL step), ``step()``,
``evaluate(rows)``, ``state()`` and ``load_state(state)`` (:class:`OnlineRecipe`); the RL
step counter is ``engine.step // updates_per_step``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from posttrain.data.prompts import PromptCursor, Row, encode_prompts, load_prompt_rows
from posttrain.errors import ConfigError
from posttrain.evals.config import EvalConfig
from posttrain.models.prefix import enable_prefix_attention
from posttrain.rewards.base import RewardSet
from posttrain.rewards.config import RewardConfig
from posttrain.rewards.registry import build_reward_set, check_reward_columns
from posttrain.rollout import KVCacheGenerator, default_stop_ids
from posttrain.rollout.config import SamplingConfig
from posttrain.train import distributed as ddp
from posttrain.train.config import TrainConfig
from posttrain.train.engine import Engine
from posttrain.train.loop import total_steps
from posttrain.train.policy import load_policy
from posttrain.train.run import StopOnSignal, prepare_run

log = logging.getLogger("posttrain")

# Flat names accepted for the grouped keys (configs written before the groups existed).
ONLINE_ALIASES = {
    **{k: f"sampling.{k}" for k in ("max_new_tokens", "temperature", "top_p", "top_k", "stop")},
    "rewards": "reward.functions", "reward_weights": "reward.weights",
    "reward_model": "reward.model", "reward_timeout_s": "reward.timeout_s",
    "reward_on_error": "reward.on_error", "eval_prompts": "eval.prompts",
}


@dataclass
class OnlineConfig(TrainConfig):
    """Options shared by the online-RL commands (grpo, ppo)."""

    ALIASES: ClassVar[dict[str, str]] = ONLINE_ALIASES

    max_steps: int = field(
        default=-1, metadata={"help": "RL steps (one rollout batch each); -1 = derive from "
                                      "epochs over the prompts"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per rollout batch"})
    num_generations: int = field(default=8, metadata={"help": "G: completions per prompt"})
    prefix_sharing: bool = field(
        default=True, metadata={"help": "training forwards compute a shared prompt once"})
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW)"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata={"help": "learning-rate decay after warmup"})
    max_length: int = field(default=1024, metadata={"help": "max prompt + completion tokens"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig,
                                     metadata={"help": "rollout sampling"})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "the reward"})
    eval: EvalConfig = field(default_factory=EvalConfig,
                             metadata={"help": "held-out evaluation (on eval_data)"})

    def validate(self) -> None:
        super().validate()
        if self.data is None:
            raise ConfigError("config key 'data' is required (prompt-only rows, task:NAME or "
                              "rg:NAME)")
        for name in ("prompts_per_step", "num_generations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sampling.max_new_tokens >= self.max_length:
            raise ConfigError("sampling.max_new_tokens must be < max_length (room for the "
                              "prompt)")


class OnlineRecipe(Protocol):
    updates_per_step: int

    def step(self) -> dict[str, float]: ...

    def evaluate(self, rows: list[Row]) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class OnlineRun:
    """What every online recipe starts from. ``cfg`` is resolved: ``prefix_sharing`` is off
    when the policy's attention cannot share prefixes."""

    cfg: Any
    run_dir: Path
    resume_from: Path | None
    model: nn.Module
    tokenizer: Any
    rows: list[Row]
    held_out: list[Row] | None
    rewards: RewardSet

    @property
    def steps(self) -> int:
        """RL steps: ``max_steps``, or ``epochs`` over the prompts."""
        per_epoch = math.ceil(len(self.rows) / self.cfg.prompts_per_step)
        return total_steps(self.cfg.max_steps, self.cfg.epochs, per_epoch, 1)

    def cursor(self) -> PromptCursor:
        return PromptCursor(self.rows, self.cfg.prompts_per_step, self.cfg.seed)


def start_online(cfg: OnlineConfig) -> OnlineRun:
    """Run dir, policy, prompt rows (train and held-out), reward: the set-up of any online
    recipe, before its own models and state. Under torchrun the recipe splits each step's
    prompts over the ranks (``rank_slice``)."""
    run_dir, resume_from = prepare_run(cfg)
    info = ddp.current()
    if info.enabled and cfg.prompts_per_step % info.world_size:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the "
                          f"{info.world_size} ranks: each rank takes whole groups of the step")
    # Rows and rewards before the policy: a reward the data cannot feed fails in seconds.
    raw = load_prompt_rows(cfg.data, "train", cfg.on_bad_row)
    raw_held = load_prompt_rows(cfg.eval_data, "test", cfg.on_bad_row) if cfg.eval_data else None
    rewards = build_reward_set(cfg.reward, cfg.data, raw, max_length=cfg.max_length,
                               precision=cfg.precision)
    check_reward_columns(rewards, raw, cfg.data)
    if raw_held is not None:
        check_reward_columns(rewards, raw_held, cfg.eval_data)
    model, tokenizer = load_policy(cfg, resume_from)
    if cfg.prefix_sharing and not enable_prefix_attention(model):
        log.info("attention implementation cannot share prefixes; packing padding-free")
        cfg = dataclasses.replace(cfg, prefix_sharing=False)
    max_prompt = cfg.max_length - cfg.sampling.max_new_tokens
    rows = encode_prompts(raw, tokenizer, max_prompt, cfg.data)
    held_out = None
    if raw_held is not None:
        held_out = encode_prompts(raw_held, tokenizer, max_prompt, cfg.eval_data)[
            : cfg.eval.prompts]
    return OnlineRun(cfg, run_dir, resume_from, model, tokenizer, rows, held_out, rewards)


def run_online(engine: Engine, recipe: OnlineRecipe, cursor: PromptCursor,
               held_out: list[Row] | None, resume_from: Path | None) -> Path:
    """Resume if asked, then RL steps until ``engine.total_steps`` optimizer steps are done;
    returns the final model directory."""
    cfg = engine.cfg
    if resume_from is not None:
        state = engine.restore(resume_from)
        cursor.load_state(state["cursor"])
        recipe.load_state(state["extra"])
    engine.check_free_space()
    engine.log({"data/rows": len(cursor.rows), "data/held_out_rows": len(held_out or [])})
    every = lambda k: k and (engine.step // recipe.updates_per_step) % k == 0  # noqa: E731
    try:
        with StopOnSignal() as stop:  # SIGINT/SIGTERM: checkpoint at the step's end, then stop
            while engine.step < engine.total_steps:
                metrics = recipe.step()
                done = engine.step >= engine.total_steps
                if held_out and (done or every(cfg.eval_steps)):
                    metrics.update(recipe.evaluate(held_out))
                if done or every(max(cfg.logging_steps, 1)):
                    engine.log(metrics)
                if every(cfg.save_steps) and not done:
                    engine.save(cursor.state(), recipe.state())
                if not done:
                    stop.after_step(engine, lambda: engine.save(cursor.state(), recipe.state()))
        return engine.save_final()
    finally:
        engine.close()


def rank_slice(rows: list[Row], info: ddp.DistInfo) -> list[Row]:
    """This rank's contiguous share of one step's prompts: each prompt's whole group of
    completions is sampled, rewarded and trained on this rank."""
    k = len(rows) // info.world_size
    return rows[info.rank * k:(info.rank + 1) * k]


def mean_over_ranks(stats: dict[str, float], engine: Engine) -> dict[str, float]:
    """Rollout statistics of the whole step: each rank's (equal-sized) share averaged,
    ``*max_length`` maxima taken over ranks. Means over the step are exact; spreads (``std``,
    explained variance) are the ranks' average."""
    info = engine.dist
    if not info.enabled:
        return stats
    maxed = [k for k in stats if k.endswith("max_length")]
    summed = [k for k in stats if k not in maxed]
    # Two collectives per step, not one per statistic (every rank has the same keys).
    sums = ddp.all_reduce_tensor(torch.tensor([stats[k] for k in summed], dtype=torch.float64),
                                 info, engine.device)
    maxima = ddp.all_reduce_tensor(torch.tensor([stats[k] for k in maxed], dtype=torch.float64),
                                   info, engine.device, op="max")
    reduced = {**{k: float(v) / info.world_size for k, v in zip(summed, sums, strict=True)},
               **{k: float(v) for k, v in zip(maxed, maxima, strict=True)}}
    return {k: reduced[k] for k in stats}


def policy_sampler(engine: Engine) -> KVCacheGenerator:
    """The KV-cache engine sampling from the policy being trained (no weight copy: every
    ``generate`` sees the weights of the last update)."""
    model, tokenizer = engine.model, engine.tokenizer
    return KVCacheGenerator(model, tokenizer, precision=engine.cfg.precision,
                            stop_token_ids=default_stop_ids(model, tokenizer))


def time_fractions(stats: dict[str, float], phases: tuple[str, ...]) -> dict[str, float]:
    """``time/<phase>_frac``: each phase's share of the step's ``time/<phase>_s``."""
    total = max(sum(stats[f"time/{p}_s"] for p in phases), 1e-9)
    return {f"time/{p}_frac": stats[f"time/{p}_s"] / total for p in phases}


class Warnings:
    """Warnings for silent failure modes (DESIGN.md §7), each rate-limited to its 1st and
    every 20th occurrence so a long run's log stays readable."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def check(self, key: str, bad: bool, step: int, message: str) -> None:
        if not bad:
            return
        if self.seen.get(key, 0) % 20 == 0:
            log.warning("step %d: %s", step, message)
        self.seen[key] = self.seen.get(key, 0) + 1
