"""Shared fixtures: tiny models built in code, small datasets written to tmp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Two threads make CPU kernels deterministic run to run and match CI's machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def nano_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from posttrain.models.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("nano"), size="nano", seed=0)


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved reward model (untrained, but its score head is in the checkpoint)."""
    from posttrain.models.reward import load_reward_model
    from posttrain.models.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("rm") / "final"
    load_reward_model("tiny:nano", seed=1).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def chat_jsonl(tmp_path: Path) -> Path:
    from posttrain.tasks.registry import build_task_rows

    return write_jsonl(tmp_path / "chat.jsonl", build_task_rows("chat", size=64, seed=1))
