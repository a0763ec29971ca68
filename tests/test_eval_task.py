"""``posttrain eval checks=[task]``: any prompt dataset scored by its verifiers; reasoning-gym
rows as SFT demonstrations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.evals.run import EvalRunConfig, run_eval
from posttrain.tasks.registry import build_task_rows
from tests.conftest import write_jsonl


def test_task_check_scores_greedy_answers_with_the_verifier(tmp_path: Path,
                                                            nano_dir: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}],
             "answer": str(10**9 + i)} for i in range(8)]  # answers no random text contains
    data = write_jsonl(tmp_path / "sums.jsonl", rows)
    cfg = load_config(EvalRunConfig, None, [
        f"model={nano_dir}", f"output_dir={tmp_path / 'ev'}", "checks=[task]", f"data={data}",
        "rewards=[math]", "max_new_tokens=8", "prompts=8"])
    metrics = json.loads((run_eval(cfg) / "eval.json").read_text())["metrics"]
    assert metrics["task_accuracy"] == 0.0
    # Wilson at 0/8: [0, z^2 / (n + z^2)] = [0, 3.8416 / 11.8416]
    assert metrics["task_accuracy_low"] == 0.0
    assert metrics["task_accuracy_high"] == pytest.approx(3.8416 / 11.8416, abs=1e-4)


def test_task_check_needs_data_and_data_needs_the_task_check() -> None:
    with pytest.raises(ConfigError, match="data=SPEC"):
        load_config(EvalRunConfig, None, ["checks=[task]"])
    with pytest.raises(ConfigError, match="data"):
        load_config(EvalRunConfig, None, ["checks=[arithmetic]", "data=task:arithmetic"])


def test_reasoning_gym_rows_as_demonstrations() -> None:
    rows = build_task_rows("rg", split="train", size=5, task="chain_sum", demonstrate=True)
    assert rows and all(r["completion"] == [{"role": "assistant",
                                             "content": f"<answer>{r['answer']}</answer>"}]
                        for r in rows)
    plain = build_task_rows("rg", split="train", size=5, task="chain_sum")
    assert "completion" not in plain[0] and plain[0]["prompt"] == rows[0]["prompt"]
