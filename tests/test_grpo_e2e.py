"""GRPO end to end on the nano model: the reward rises; resume; the code reward runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.algorithms.grpo import GRPOConfig, train_grpo
from posttrain.config import load_config
from posttrain.rewards import registry


def digit_frac(prompts, completions, **columns):
    """A dense toy reward a random model can climb: the fraction of digit characters."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cfg(tmp_path: Path, name: str, *extra: str) -> GRPOConfig:
    return load_config(GRPOConfig, None, [
        "model=tiny:nano", "data=task:arithmetic:size=200", f"output_dir={tmp_path / name}",
        "max_steps=20", "prompts_per_step=8", "num_generations=8", "max_new_tokens=8",
        "lr=3e-3", "rewards=[digit_frac]", "precision=fp32", *extra])


@pytest.fixture()
def digit_reward(monkeypatch):
    monkeypatch.setitem(registry.REWARDS, "digit_frac", lambda: digit_frac)


def test_grpo_reward_rises(tmp_path, digit_reward):
    run = tmp_path / "grpo"
    train_grpo(_cfg(tmp_path, "grpo"))
    rows = [r for r in _rows(run) if "reward/mean" in r]
    first = sum(r["reward/mean"] for r in rows[:4]) / 4
    last = sum(r["reward/mean"] for r in rows[-4:]) / 4
    assert last > first + 0.15, (first, last)
    for key in ("grpo/zero_std_frac", "grpo/entropy", "grpo/clip_frac_low", "grpo/clip_frac_high",
                "completions/mean_length", "completions/truncated_frac", "time/generate_s",
                "time/train_frac", "reward/digit_frac/std", "grpo/sampler_logp_diff"):
        assert key in rows[-1], key
    # fp32 sampler and trainer agree on the sampled tokens' log-probs: the first ratio is 1
    assert rows[0]["grpo/sampler_logp_diff"] < 1e-4
    assert (run / "final" / "model.safetensors").exists()


def test_grpo_variants_run_and_resume_exactly(tmp_path, digit_reward):
    """DAPO-style settings with a KL reference and mu=2; a resumed run equals the
    uninterrupted one."""
    extra = ("max_steps=4", "loss_type=dapo", "epsilon_high=0.28", "num_iterations=2",
             "beta=0.05", "kl_estimator=k3", "dynamic_sampling=true", "overlong_buffer=4",
             "mask_truncated=true", "save_steps=2", "importance_sampling=sequence")
    full = train_grpo(_cfg(tmp_path, "full", *extra))
    rows = [r for r in _rows(tmp_path / "full") if "grpo/kl" in r]
    assert rows and all(r["grpo/kl"] >= 0 for r in rows)
    assert "grpo/refill_rounds" in rows[-1]
    # interrupt after the step-2 checkpoint (engine steps 4 with mu=2), then resume
    part = _cfg(tmp_path, "part", *extra)
    part.max_steps = 2
    train_grpo(part)
    resumed = _cfg(tmp_path, "part", *extra, "resume=true",
                   "overwrite=true")  # part wrote final/ at its step 2: replace it
    final = train_grpo(resumed)
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(final / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_grpo_with_code_reward_logs_pass_rates(tmp_path):
    from posttrain.sandbox.runner import resolve_isolation

    try:
        resolve_isolation("bwrap")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no sandbox here: {e}")
    cfg = load_config(GRPOConfig, None, [
        "model=tiny:nano", "data=task:toy_code:size=16", f"output_dir={tmp_path / 'code'}",
        "max_steps=2", "prompts_per_step=4", "num_generations=4", "max_new_tokens=16",
        "rewards=[code]", "precision=fp32", "lr=1e-3"])
    train_grpo(cfg)
    rows = [r for r in _rows(tmp_path / "code") if "reward/code_fraction/mean" in r]
    assert len(rows) == 2
    assert "code/mean_reward" in rows[-1] and "code/all_pass_frac" in rows[-1]
    assert rows[-1]["code/n"] == 16


def test_dynamic_sampling_drops_zero_spread_groups_and_refills(monkeypatch):
    """Round 0: groups 0 and 2 have zero spread -> dropped; refill asks for 2 new prompts."""
    from types import SimpleNamespace

    from posttrain.algorithms.grpo import GRPO, StepBatch
    from posttrain.rollout import Rollouts

    cfg = GRPOConfig(data="x", prompts_per_step=3, num_generations=2, dynamic_sampling=True,
                     max_refill_rounds=1)
    rounds = [torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
              torch.tensor([[0.0, 1.0], [1.0, 1.0]])]
    asked = []

    def fake_generate(rows, round_):
        r = rounds[round_]
        asked.append(len(rows))
        ro = Rollouts([[round_, b] for b in range(len(r))], [[7]] * r.numel(),
                      [[0.0]] * r.numel(), ["stop"] * r.numel(), 2)
        spread = r.max(1).values != r.min(1).values
        return StepBatch(ro, r, spread, {}), {"time/generate_s": 0.0, "time/reward_s": 0.0}

    trainer = object.__new__(GRPO)
    trainer.cfg = cfg
    trainer.cursor = SimpleNamespace(next=lambda n: [{}] * n)
    monkeypatch.setattr(trainer, "generate", fake_generate, raising=False)
    batch, stats = trainer.collect()
    assert asked == [3, 2]
    assert batch.ro.prompt_ids == [[0, 1], [1, 0]]  # round 0 group 1, round 1 group 0
    assert bool(batch.spread.all())
    assert stats["grpo/zero_std_frac"] == pytest.approx(2 / 3)
    assert stats["grpo/groups_dropped"] == 3 and stats["grpo/refill_rounds"] == 1
    # what is left after max_refill_rounds is trained on as is (bounded, reported)
    assert stats["grpo/groups_kept"] == 2


def test_grpo_on_prompt_only_jsonl_with_eval(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "answer": str(i + 1)}
            for i in range(8)]
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(GRPOConfig, None, [
        "model=tiny:nano", f"data={data}", f"eval_data={data}", f"output_dir={tmp_path / 'j'}",
        "max_steps=1", "prompts_per_step=4", "num_generations=4", "max_new_tokens=4",
        "rewards=[numeric,format]", "reward_weights=[1.0,0.2]"])
    train_grpo(cfg)
    last = _rows(tmp_path / "j")[-1]
    assert last["eval/accuracy"] == 0.0 and "reward/format/mean" in last
    assert last["completions/truncated_frac"] > 0
