"""rewards=[judge]: an AI judge as GRPO's reward, scored against the row's reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.algorithms.grpo import GRPOConfig, train_grpo
from posttrain.config import load_config
from posttrain.errors import ConfigError, PosttrainError
from posttrain.rewards.judge import JudgeReward
from tests.conftest import write_jsonl


def digit_judge(prompt, first, second, question):  # noqa: ANN001, ANN201
    """Prefers the answer with more digits (with a pull towards the first slot, which the
    reward's two orders cancel)."""
    def frac(t: str) -> float:
        return sum(ch.isdigit() for ch in t) / max(len(t), 1)
    return min(1.0, max(0.0, 0.5 + 0.5 * (frac(first) - frac(second)) + 0.05))


def test_the_reward_is_the_order_averaged_win_probability() -> None:
    reward = JudgeReward("tests.test_judge_reward:digit_judge", "Which has more digits?")
    got = reward(["q", "q"], ["1234", "abcd"], reference=["ab12", "ab12"])
    # 0.5 + 0.5 * (1 - 0.5) = 0.75 both orders once the +0.05 pull cancels
    assert got == pytest.approx([0.75, 0.25])


def test_grpo_with_a_judge_reward_climbs(tmp_path: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": f"Say something about {i}."}],
             "reference": "a plain sentence"} for i in range(64)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = load_config(GRPOConfig, None, [
        "model=tiny:nano", f"data={data}", f"output_dir={tmp_path / 'grpo'}", "max_steps=20",
        "prompts_per_step=8", "num_generations=8", "max_new_tokens=8", "lr=3e-3",
        "precision=fp32", "rewards=[judge]",
        "reward.judge_model=tests.test_judge_reward:digit_judge"])
    train_grpo(cfg)
    logged = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text()
              .splitlines()]
    means = [r["reward/judge/mean"] for r in logged if "reward/judge/mean" in r]
    first, last = sum(means[:4]) / 4, sum(means[-4:]) / 4
    assert last > first + 0.05, (first, last)
    assert "reward/accuracy" not in logged[-1]  # a judge's probability is not a pass rate


def test_the_judge_needs_a_model_and_a_reference_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="judge_model"):
        JudgeReward(None, "q")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    cfg = load_config(GRPOConfig, None, [
        "model=tiny:nano", f"data={data}", f"output_dir={tmp_path / 'g'}", "rewards=[judge]",
        "reward.judge_model=tests.test_judge_reward:digit_judge"])
    with pytest.raises(PosttrainError, match="column .reference."):
        train_grpo(cfg)


def test_a_rating_judge_scores_the_completion_alone(nano_dir: Path) -> None:
    from posttrain.cai.judge import RatingJudge
    from posttrain.models.io import load_model, load_tokenizer

    reward = JudgeReward(str(nano_dir), "Is the answer polite?", mode="rate")
    assert reward.required_columns == ()  # no reference answer needed
    got = reward(["Say hi.", "Say hi."], ["Hello!", "Go away."])
    judge = RatingJudge(load_model(str(nano_dir)), load_tokenizer(str(nano_dir)))
    assert got == pytest.approx(judge.rate([("Is the answer polite?", "Say hi.", "Hello!"),
                                            ("Is the answer polite?", "Say hi.", "Go away.")]),
                                abs=1e-5)
    with pytest.raises(ConfigError, match="rate"):
        JudgeReward("tests.test_judge_reward:digit_judge", "q", mode="rate")(["q"], ["a"])
