"""The commands driven by a config: name -> (one-line doc, config class, run function).

``TRAIN_COMMANDS`` train a model (their run returns its ``final/``); ``COMMANDS`` adds
``eval``. The CLI parses their options and runs them; a pipeline stage of the same kind does
the same. Recipes are imported only when a command is used (importing one costs seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    doc: str
    config_cls: Callable[[], type]
    run: Callable[[Any], Any]


def _sft_cls() -> type:
    from posttrain.algorithms.sft import SFTConfig

    return SFTConfig


def _run_sft(cfg: Any) -> Any:
    from posttrain.algorithms.sft import train_sft

    return train_sft(cfg)


def _grpo_cls() -> type:
    from posttrain.algorithms.grpo import GRPOConfig

    return GRPOConfig


def _run_grpo(cfg: Any) -> Any:
    from posttrain.algorithms.grpo import train_grpo

    return train_grpo(cfg)


def _ppo_cls() -> type:
    from posttrain.algorithms.ppo import PPOConfig

    return PPOConfig


def _run_ppo(cfg: Any) -> Any:
    from posttrain.algorithms.ppo import train_ppo

    return train_ppo(cfg)


def _rm_cls() -> type:
    from posttrain.algorithms.reward_model import RMConfig

    return RMConfig


def _run_rm(cfg: Any) -> Any:
    from posttrain.algorithms.reward_model import train_reward_model

    return train_reward_model(cfg)


def _pref_cls(name: str) -> Callable[[], type]:
    def get() -> type:
        from posttrain.algorithms import preference as p

        return {"dpo": p.DPOConfig, "kto": p.KTOConfig, "orpo": p.ORPOConfig,
                "simpo": p.SimPOConfig}[name]

    return get


def _run_pref(cfg: Any) -> Any:
    from posttrain.algorithms.preference import train_preference

    return train_preference(cfg)


TRAIN_COMMANDS: dict[str, Command] = {
    "sft": Command("supervised fine-tuning (assistant-masked NLL); text rows = pretraining",
                        _sft_cls, _run_sft),
    "pretrain": Command("causal-LM training on raw text rows (same engine as sft)",
                             _sft_cls, _run_sft),
    "rm": Command("reward model: scalar head + Bradley-Terry loss on preference pairs",
                       _rm_cls, _run_rm),
    "dpo": Command("preference optimisation: loss=dpo|robust|ipo|hinge|kto|orpo|simpo",
                        _pref_cls("dpo"), _run_pref),
    "kto": Command("KTO on unpaired rows (= dpo loss=kto)", _pref_cls("kto"), _run_pref),
    "orpo": Command("ORPO, no reference (= dpo loss=orpo)", _pref_cls("orpo"), _run_pref),
    "simpo": Command("SimPO, no reference (= dpo loss=simpo)", _pref_cls("simpo"),
                          _run_pref),
    "grpo": Command("online RL, group-relative advantages: GRPO/DAPO/Dr.GRPO/GSPO, RLOO, "
                         "REINFORCE++", _grpo_cls, _run_grpo),
    "ppo": Command("classic RLHF: PPO with a value model, GAE and a KL penalty to the "
                        "reference", _ppo_cls, _run_ppo),
}


def _eval_cls() -> type:
    from posttrain.evals.run import EvalRunConfig

    return EvalRunConfig


def _run_eval(cfg: Any) -> Any:
    from posttrain.evals.run import run_eval

    return run_eval(cfg)


COMMANDS: dict[str, Command] = {
    **TRAIN_COMMANDS,
    "eval": Command("held-out evaluation of a model: checks=[arithmetic,safety,reward,pairs]",
                    _eval_cls, _run_eval),
}
