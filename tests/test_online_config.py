"""The online recipes' grouped options (sampling.*, reward.*, eval.*): flat names still
accepted, help lists every key, config.yaml holds what ran; GRPO with a reward model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.algorithms.grpo import GRPOConfig, train_grpo
from posttrain.algorithms.ppo import PPOConfig
from posttrain.commands import TRAIN_COMMANDS
from posttrain.config import config_help, flatten_keys, load_config, save_config
from posttrain.errors import ConfigError


def test_flat_names_set_the_grouped_keys(tmp_path):
    cfg = load_config(GRPOConfig, None, [
        "data=task:arithmetic", "max_new_tokens=16", "temperature=0.7", "stop=[END]",
        "rewards=[numeric,format]", "reward_weights=[1,0.2]", "reward_timeout_s=5",
        "eval_data=task:arithmetic", "eval_prompts=7"])
    assert cfg.sampling.max_new_tokens == 16 and cfg.sampling.temperature == 0.7
    assert cfg.sampling.stop == ["END"]
    assert cfg.reward.functions == ["numeric", "format"] and cfg.reward.weights == [1.0, 0.2]
    assert cfg.reward.timeout_s == 5.0 and cfg.eval.prompts == 7
    # The nested spelling is the same option; the saved YAML uses it and loads back equal.
    same = load_config(GRPOConfig, None, [
        "data=task:arithmetic", "sampling.max_new_tokens=16", "sampling.temperature=0.7",
        "sampling.stop=[END]", "reward.functions=[numeric,format]", "reward.weights=[1,0.2]",
        "reward.timeout_s=5", "eval_data=task:arithmetic", "eval.prompts=7"])
    assert same == cfg
    path = save_config(cfg, tmp_path / "config.yaml")
    assert "max_new_tokens: 16" in path.read_text() and "sampling:" in path.read_text()
    assert load_config(GRPOConfig, path) == cfg
    yaml_flat = tmp_path / "flat.yaml"
    yaml_flat.write_text("data: task:arithmetic\nreward_model: runs/rm/final\ntop_k: 5\n")
    cfg = load_config(PPOConfig, yaml_flat)
    assert cfg.reward.model == "runs/rm/final" and cfg.sampling.top_k == 5


def test_grouped_keys_are_validated():
    base = ["data=task:arithmetic"]
    for bad, message in [("temperature=0", "sampling.temperature"),
                         ("top_p=1.5", "sampling.top_p"), ("eval.prompts=0", "eval.prompts"),
                         ("reward_weights=[1,2]", "reward.weights"),
                         ("max_new_tokens=2000", "sampling.max_new_tokens must be < max_length"),
                         ("rewards=[]", "needs a reward")]:
        with pytest.raises(ConfigError, match=message):
            load_config(GRPOConfig, None, [*base, bad])
    with pytest.raises(ConfigError, match="did you mean 'reward_weights'"):
        load_config(GRPOConfig, None, [*base, "reward_weight=[1]"])


@pytest.mark.parametrize("command", sorted(TRAIN_COMMANDS))
def test_help_lists_every_key_and_alias(command):
    cls = TRAIN_COMMANDS[command].config_cls()
    text = config_help(cls, command, width=200)
    for key in flatten_keys(cls):
        assert f"  {key} " in text, key
    for flat, key in getattr(cls, "ALIASES", {}).items():
        assert f"{flat}={key}" in text


def test_config_yaml_is_what_ran(tmp_path, monkeypatch):
    """A policy whose attention cannot share prefixes runs padding-free, and says so."""
    import posttrain.train.online as online

    monkeypatch.setattr(online, "enable_prefix_attention", lambda model: False)
    cfg = load_config(GRPOConfig, None, [
        "model=tiny:nano", "data=task:arithmetic:size=16", f"output_dir={tmp_path / 'g'}",
        "max_steps=1", "prompts_per_step=2", "num_generations=2", "max_new_tokens=4",
        "rewards=[numeric]"])
    train_grpo(cfg)
    ran = load_config(GRPOConfig, tmp_path / "g" / "config.yaml")
    assert ran.prefix_sharing is False and cfg.prefix_sharing is True


def test_grpo_with_a_reward_model(tmp_path):
    """reward.model scores the rollouts (as in PPO); with rewards=[auto] and data no verifier
    fits, the reward model alone is the reward."""
    from posttrain.models.reward import load_reward_model
    from posttrain.models.tiny import build_tokenizer

    rm = tmp_path / "rm"
    load_reward_model("tiny:nano", seed=1).save_pretrained(rm)
    build_tokenizer().save_pretrained(rm)
    prompts = tmp_path / "prompts.jsonl"  # prompt-only rows: no answer a verifier could check
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Hi {i}"}]})
                               + "\n" for i in range(16)))
    cfg = load_config(GRPOConfig, None, [
        "model=tiny:nano", f"data={prompts}",
        f"output_dir={tmp_path / 'g'}", "max_steps=2", "prompts_per_step=2",
        "num_generations=2", "max_new_tokens=4", f"reward_model={rm}", "lr=1e-3"])
    train_grpo(cfg)
    last = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    assert "reward/rm/mean" in last and "reward/accuracy" not in last
    assert last["reward/mean"] == pytest.approx(last["reward/rm/mean"])
