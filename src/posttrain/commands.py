"""The commands driven by a config: name -> (one-line doc, config class, run function).

``TRAIN_COMMANDS`` train a model (their run returns its ``final/``); ``COMMANDS`` adds
``eval`` and ``generate``. The CLI parses their options and runs them; a pipeline stage of the
same kind does the same. Recipes are imported only when a command is used (importing one
costs seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any


@dataclass(frozen=True)
class Command:
    """One command: its doc, and where its config class and run function live (imported
    on first use)."""

    doc: str
    module: str
    config: str
    runner: str

    def config_cls(self) -> type:
        return getattr(import_module(self.module), self.config)

    def run(self, cfg: Any) -> Any:
        return getattr(import_module(self.module), self.runner)(cfg)


_SFT = ("posttrain.algorithms.sft", "SFTConfig", "train_sft")
_PREF = "posttrain.algorithms.preference"

TRAIN_COMMANDS: dict[str, Command] = {
    "sft": Command("supervised fine-tuning (assistant-masked NLL); text rows = pretraining",
                   *_SFT),
    "pretrain": Command("causal-LM training on raw text rows (same engine as sft)", *_SFT),
    "rm": Command("reward model: scalar head + Bradley-Terry loss on preference pairs",
                  "posttrain.algorithms.reward_model", "RMConfig", "train_reward_model"),
    "dpo": Command("preference optimisation: loss=dpo|robust|ipo|hinge|kto|orpo|simpo",
                   _PREF, "DPOConfig", "train_preference"),
    "kto": Command("KTO on unpaired rows (= dpo loss=kto)", _PREF, "KTOConfig",
                   "train_preference"),
    "orpo": Command("ORPO, no reference (= dpo loss=orpo)", _PREF, "ORPOConfig",
                    "train_preference"),
    "simpo": Command("SimPO, no reference (= dpo loss=simpo)", _PREF, "SimPOConfig",
                     "train_preference"),
    "grpo": Command("online RL, group-relative advantages: GRPO/DAPO/Dr.GRPO/GSPO, RLOO, "
                    "REINFORCE++", "posttrain.algorithms.grpo", "GRPOConfig", "train_grpo"),
    "ppo": Command("classic RLHF: PPO with a value model, GAE and a KL penalty to the "
                   "reference", "posttrain.algorithms.ppo", "PPOConfig", "train_ppo"),
}

COMMANDS: dict[str, Command] = {
    **TRAIN_COMMANDS,
    "eval": Command("held-out evaluation: checks=[arithmetic,safety,reward,pairs,task] or "
                    "suite=FILE", "posttrain.evals.run", "EvalRunConfig", "run_eval"),
    "generate": Command("data generation: n samples per prompt, filtered by rewards: "
                        "keep=all|best|passing|pairs -> SFT or preference rows",
                        "posttrain.generate.run", "GenerateConfig", "run_generate"),
    "cai revise": Command("Constitutional AI: answer, critique and revise against a "
                          "constitution -> SFT rows", "posttrain.cai.revise", "ReviseConfig",
                          "run_revise"),
    "cai label": Command("AI feedback (RLAIF): two answers judged under a constitution, both "
                         "orders -> preference rows", "posttrain.cai.label", "LabelConfig",
                         "run_generate"),
    "redteam": Command("automated red-teaming: jailbreak templates and/or an attacker model "
                       "against a target; successes, success rates, DPO pairs",
                       "posttrain.redteam.run", "RedteamConfig", "run_redteam"),
}
