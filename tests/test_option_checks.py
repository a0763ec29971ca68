"""Every option of every command is checked where it is parsed: a value out of its range, or
an option given where the other options leave it no effect, is a one-line ConfigError that
starts with the dotted key. The rules are the tables each config declares (``RANGES``,
``ONLY_WITH``: config/checks.py); these tests read the tables, so a new rule is tested and a
new number option without a range fails ``test_every_number_option_has_a_range``."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest

from posttrain.cli import main
from posttrain.commands import COMMANDS, TRAIN_COMMANDS
from posttrain.config import flatten_keys, load_config, save_config
from posttrain.config.checks import UnusedOptionError, _bounds, declared, in_range
from posttrain.config.schema import union_arms
from posttrain.errors import ConfigError

# What each command needs before its defaults load (none of it is read here: no files).
BASE = {name: ["data=d.jsonl"] for name in TRAIN_COMMANDS}
BASE |= {"grpo": ["data=task:arithmetic"], "ppo": ["data=task:arithmetic", "reward_model=rm"],
         "eval": [], "generate": ["data=task:arithmetic"],
         # cai label is generate with keep=judged: checked here under generate's default keep
         "cai label": ["data=task:arithmetic", "keep=all"],
         "cai revise": ["data=task:arithmetic", "constitution=hhh"], "redteam": ["data=safety"]}

# Numbers checked by hand-written code instead of a RANGES entry, and why.
NO_RANGE = {
    "seed": "any integer seeds the generators",
    "max_steps": "-1 or >= 1: TrainConfig.validate()",
}


def load(command: str, *overrides: str) -> Any:
    return load_config(COMMANDS[command].config_cls(), None, [*BASE[command], *overrides])


def raises(command: str, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load(command, *overrides)
    message = str(err.value)
    assert "\n" not in message
    return err.value


# --------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_defaults_load(command: str, tmp_path: Path) -> None:
    cfg = load(command)
    # a saved config (what a run writes) loads back: nothing in it counts as a mistake
    assert load_config(type(cfg), save_config(cfg, tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_number_option_has_a_range(command: str) -> None:
    cls = COMMANDS[command].config_cls()
    ranges = declared(cls, "RANGES")
    for key, opt in flatten_keys(cls).items():
        arms = (union_arms(opt.type) or ([opt.type], False))[0]
        if arms in ([int], [float]) and key not in NO_RANGE:
            assert key in ranges, f"{command}: {key} has no RANGES entry"


# --------------------------------------------------------------------------- ranges


def outside(spec: str, is_float: bool) -> list[float]:
    """Values just outside a range spec, and for a float NaN (an int option rejects NaN as
    the wrong type already)."""
    b = _bounds(spec)
    out = [math.nan] if is_float else []
    if math.isfinite(b.low):
        out.append(b.low if b.low_open else b.low - 1)
    if math.isfinite(b.high):
        out.append(b.high if b.high_open else b.high + 1)
    return out


def range_cases() -> list[tuple[str, str, str, float]]:
    cases = []
    for command in sorted(COMMANDS):
        cls = COMMANDS[command].config_cls()
        types = {key: opt.type for key, opt in flatten_keys(cls).items()}
        for key, spec in declared(cls, "RANGES").items():
            is_float = float in (union_arms(types[key]) or ([types[key]], False))[0]
            cases += [(command, key, spec, bad) for bad in outside(spec, is_float)]
    return cases


@pytest.mark.parametrize(("command", "key", "spec", "bad"), range_cases())
def test_out_of_range_names_key_value_and_range(command: str, key: str, spec: str,
                                                bad: float) -> None:
    assert not in_range(bad, spec)
    shown = "nan" if math.isnan(bad) else repr(bad)
    err = raises(command, f"{key}={shown}")
    assert str(err).startswith(f"{key} must be "), err
    assert spec.split()[-1].strip("[]()") in str(err) and ("got " in str(err)), err


@pytest.mark.parametrize(("spec", "inside", "outside_"), [
    ("> 0", [1e-9, 5], [0, -1, math.inf]), (">= 1", [1, 2], [0.999]),
    ("[0, 0.5)", [0, 0.49], [0.5, -0.1]), ("(0, 1]", [1, 0.5], [0, 1.01]),
    ("< 1", [0.5, -3], [1]), ("finite", [-1e9, 0], [math.nan, -math.inf]),
])
def test_range_specs(spec: str, inside: list[float], outside_: list[float]) -> None:
    assert all(in_range(v, spec) for v in inside)
    assert not any(in_range(v, spec) for v in [*outside_, math.nan])


# --------------------------------------------------------------------------- no effect

# For each ONLY_WITH rule: overrides that give the option where it has no effect, and
# overrides where the same option is used (and loads).
UNUSED: dict[str, tuple[list[str], list[str]]] = {
    "epochs": (["max_steps=10", "epochs=2"], ["epochs=2"]),
    "eval_steps": (["eval_steps=5"], ["eval_data=e.jsonl", "eval_steps=5"]),
    "lora.alpha": (["lora.alpha=32"], ["lora.r=8", "lora.alpha=32"]),
    "lora.dropout": (["lora.dropout=0.1"], ["lora.r=8", "lora.dropout=0.1"]),
    "lora.target_modules": (["lora.target_modules=q_proj"],
                            ["lora.r=8", "lora.target_modules=q_proj"]),
    "lora.merge": (["lora.merge=true"], ["lora.r=8", "lora.merge=true"]),
    "cpu_offload": (["cpu_offload=true"], ["strategy=fsdp2", "cpu_offload=true"]),
    "hf_checkpoints": (["hf_checkpoints=true"], ["strategy=fsdp2", "hf_checkpoints=true"]),
    "label_smoothing": (["loss=ipo", "label_smoothing=0.1"],
                        ["loss=robust", "label_smoothing=0.1"]),
    "simpo_gamma": (["loss=dpo", "simpo_gamma=0.5"], ["loss=simpo", "simpo_gamma=0.5"]),
    "desirable_weight": (["loss=dpo", "desirable_weight=2"], ["loss=kto", "desirable_weight=2"]),
    "undesirable_weight": (["loss=hinge", "undesirable_weight=2"],
                           ["loss=kto", "undesirable_weight=2"]),
    "nll_weight": (["loss=kto", "nll_weight=1"], ["loss=orpo", "nll_weight=1"]),
    "ref_model": (["loss=simpo", "ref_model=m"], ["loss=kto", "ref_model=m"]),
    "precompute_ref": (["loss=orpo", "precompute_ref=false"],
                       ["loss=ipo", "precompute_ref=false"]),
    "eval.prompts": (["eval.prompts=5"], ["eval_data=task:arithmetic", "eval.prompts=5"]),
    "eval.batch_size": (["eval.batch_size=4"],
                        ["eval_data=task:arithmetic", "eval.batch_size=4"]),
    "kl_estimator": (["beta=0", "kl_estimator=k1"], ["beta=0.04", "kl_estimator=k1"]),
    "scale_rewards": (["advantage=rloo", "scale_rewards=none"],
                      ["advantage=grpo", "scale_rewards=none"]),
    "max_refill_rounds": (["max_refill_rounds=1"],
                          ["dynamic_sampling=true", "max_refill_rounds=1"]),
    "overlong_penalty": (["overlong_penalty=0.5"], ["overlong_buffer=8", "overlong_penalty=0.5"]),
    "kl_target": (["beta=0", "kl_target=1"], ["beta=0.1", "kl_target=1"]),
    "kl_horizon": (["kl_horizon=100"], ["kl_target=1", "kl_horizon=100"]),
    "reward_model": (["checks=arithmetic", "reward_model=rm"], ["checks=pairs", "reward_model=rm"]),
    "reference": (["checks=pairs", "reward_model=rm", "reference=m"],
                  ["checks=reward", "reward_model=rm", "reference=m"]),
    "data": (["checks=arithmetic", "data=task:arithmetic"],
             ["checks=task", "data=task:arithmetic"]),
    "rewards": (["checks=arithmetic", "rewards=[numeric]"],
                ["checks=task", "data=task:arithmetic", "rewards=[numeric]"]),
    "min_reward": (["min_reward=0.5"], ["keep=best", "rewards=[numeric]", "min_reward=0.5"]),
    "min_margin": (["min_margin=0.5"], ["keep=pairs", "rewards=[numeric]", "min_margin=0.5"]),
    "constitution": (["constitution=hhh"], ["keep=judged", "constitution=hhh"]),
    "judge_model": (["keep=all", "judge_model=m"],
                    ["keep=judged", "constitution=hhh", "judge_model=m"]),
    "reward.judge_model": (["reward.judge_model=m"],
                           ["rewards=[judge]", "reward.judge_model=m"]),
    "reward.judge_question": (["reward.judge_question=q"],
                              ["rewards=[judge]", "reward.judge_question=q"]),
    "reward.judge_mode": (["reward.judge_mode=rate"],
                          ["rewards=[judge]", "reward.judge_mode=rate"]),
    "judge_mode": (["keep=all", "judge_mode=rate"],
                   ["keep=judged", "constitution=hhh", "judge_mode=rate"]),
    "eval:judge_mode": (["judge_mode=rate"],
                        ["checks=[judge]", "constitution=demo", "judge_mode=rate"]),
    "kinds": (["attacker=m", "kinds=[prefix]"], ["kinds=[prefix]"]),
    "template_split": (["attacker=m", "template_split=all"], ["template_split=all"]),
    "per_kind": (["attacker=m", "per_kind=2"], ["attacker=[templates,m]", "per_kind=2"]),
    "redteam:constitution": (["constitution=demo"], ["to_preferences=true", "constitution=demo"]),
    "eval:constitution": (["constitution=demo"], ["checks=[judge]", "constitution=demo"]),
    "refusal": (["refusal=No."], ["to_preferences=true", "refusal=No."]),
    "revise": (["revise=true"], ["to_preferences=true", "revise=true"]),
    "contrast": (["contrast=true"], ["to_preferences=true", "contrast=true"]),
}


def unused_cases() -> list[tuple[str, str]]:
    return [(command, key) for command in sorted(COMMANDS)
            for key in declared(COMMANDS[command].config_cls(), "ONLY_WITH")]


@pytest.mark.parametrize(("command", "key"), unused_cases())
def test_option_without_effect_is_an_error(command: str, key: str) -> None:
    case = UNUSED.get(f"{command}:{key}") or UNUSED.get(key)  # command:key if keys clash
    assert case, f"add a case for the ONLY_WITH rule {key!r} of {command}"
    bad, good = case
    err = raises(command, *bad)
    assert isinstance(err, UnusedOptionError) and err.key == key
    assert str(err).startswith(f"{key}=") and "has no effect with" in str(err), err
    load(command, *good)  # where the option does something it is accepted


# The examples, and one of each kind per command, as a user types them.
EXAMPLES = [
    ("sft", ["lora.alpha=32", "lora.merge=true"], "lora.alpha=32.0 has no effect with lora.r=0"),
    ("pretrain", ["batch_size=0"], "batch_size must be >= 1, got 0"),
    ("rm", ["center_weight=-0.5"], "center_weight must be >= 0, got -0.5"),
    ("rm", ["eval_steps=10"], "eval_steps=10 has no effect with eval_data=null"),
    ("dpo", ["loss=ipo", "label_smoothing=0.1"],
     "label_smoothing=0.1 has no effect with loss=ipo: it is used only when loss is one of "
     "dpo|robust"),
    ("dpo", ["label_smoothing=0.5"], "label_smoothing must be in [0, 0.5), got 0.5"),
    ("kto", ["desirable_weight=-1"], "desirable_weight must be >= 0, got -1.0"),
    ("kto", ["desirable_weight=0", "undesirable_weight=0"], "both 0"),
    ("orpo", ["ref_model=runs/sft/final"], "ref_model=runs/sft/final has no effect with loss=orpo"),
    ("simpo", ["beta=0"], "beta must be > 0, got 0.0"),
    ("grpo", ["temperature=0"], "sampling.temperature must be > 0, got 0.0"),
    ("grpo", ["top_p=0"], "sampling.top_p must be in (0, 1], got 0.0"),
    ("grpo", ["num_generations=1"], "num_generations must be >= 2 with advantage=grpo"),
    ("grpo", ["grad_accum=4"], "grad_accum=4 has no effect in grpo"),
    ("grpo", ["overlong_buffer=128"], "overlong_buffer=128 must be < sampling.max_new_tokens"),
    ("grpo", ["reward_weights=[0]"], "reward.weights are all 0"),
    ("ppo", ["kl_target=0"], "kl_target must be > 0, got 0.0"),
    ("ppo", ["epsilon=1.5"], "epsilon must be in (0, 1), got 1.5"),
    ("ppo", ["mini_batch_size=3"], "mini_batch_size=3 must divide"),
    ("eval", ["reference=runs/sft/final"], "reference=runs/sft/final has no effect with checks="),
    ("eval", ["max_new_tokens=0"], "max_new_tokens must be >= 1, got 0"),
]


@pytest.mark.parametrize(("command", "overrides", "message"), EXAMPLES)
def test_examples(command: str, overrides: list[str], message: str) -> None:
    assert message in str(raises(command, *overrides))


def test_cli_prints_one_line_and_runs_nothing(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["sft", "data=task:chat", f"output_dir={out}", "lora.alpha=32",
                 "lora.merge=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lora.alpha=32.0 has no effect with lora.r=0") and \
        err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert main(["kto", "data=task:safety_pairs", f"output_dir={out}",
                 "desirable_weight=-1"]) == 2
    assert capsys.readouterr().err == "error: desirable_weight must be >= 0, got -1.0\n"


def test_group_defaults_a_command_sets_are_defaults() -> None:
    """PPO's own sampling default (max_new_tokens=64) is not 'given'; KTO's saved
    prefix_sharing=false (what ran) loads back."""
    assert load("ppo").sampling.max_new_tokens == 64
    assert load("kto", "prefix_sharing=false").prefix_sharing is False


def test_yaml_values_are_checked_too(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""
        data: d.jsonl
        lora:
          alpha: 8
        """))
    with pytest.raises(UnusedOptionError, match="lora.alpha=8.0 has no effect"):
        load_config(COMMANDS["sft"].config_cls(), path)


def test_pipeline_stage_error_points_at_the_key(tmp_path: Path) -> None:
    from posttrain.pipeline import PipelineError, load_plan

    path = tmp_path / "pipe.yaml"
    path.write_text(textwrap.dedent(f"""
        output_dir: {tmp_path / 'out'}
        stages:
          dpo:
            kind: dpo
            model: tiny:nano
            data: task:safety_pairs:size=8
            loss: hinge
            label_smoothing: 0.2
        """))
    with pytest.raises(PipelineError) as err:
        load_plan(path)
    assert err.value.problems[0].startswith(f"{path}:9: stage 'dpo', key 'label_smoothing': "
                                            "label_smoothing=0.2 has no effect with loss=hinge")
