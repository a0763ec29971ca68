"""Critique -> revise (Constitutional AI's supervised phase) and AI-feedback labelling from
the command line, on the nano model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cai.revise import ReviseConfig, run_revise
from posttrain.cli import main
from posttrain.config.loader import config_from_dict
from posttrain.data.sources import load_rows
from posttrain.errors import ConfigError
from posttrain.rollout import KVCacheGenerator

DATA = "task:safety_prompts:size=5"


def lexical_judge(prompt, first, second, question):  # noqa: ANN001, ANN201
    return 0.9 if first > second else 0.1  # consistent for any two different answers


def make(nano_dir: Path, tmp_path: Path, **kw) -> ReviseConfig:
    base = {"model": str(nano_dir), "data": DATA, "constitution": "demo", "rounds": 2,
            "output": str(tmp_path / "out.jsonl"), "max_new_tokens": 6, "batch_size": 2,
            "temperature": 1.0, "seed": 1}
    return config_from_dict(ReviseConfig, {**base, **kw})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_carry_the_last_revision_and_the_provenance(nano_dir: Path, tmp_path: Path) -> None:
    rows = read(run_revise(make(nano_dir, tmp_path)))
    assert len(rows) == 5
    for r in rows:
        assert len(r["principles"]) == len(r["critiques"]) == len(r["revisions"]) == 2
        assert set(r["principles"]) <= {"secrets", "helpful", "correct-sums"}
        assert r["completion"] == [{"role": "assistant", "content": r["revisions"][-1]}]
        assert isinstance(r["original"], str)
    assert load_rows(str(tmp_path / "out.jsonl")).format == "prompt_completion"


def test_the_critique_and_revision_requests_are_in_the_conversation(
        nano_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.cai import load_constitution

    seen: list[int] = []
    real = KVCacheGenerator.generate

    def spy(self, ids, n, sampling):  # noqa: ANN001, ANN202
        seen.append(len(ids[0]))
        return real(self, ids, n, sampling)

    monkeypatch.setattr(KVCacheGenerator, "generate", spy)
    rows = read(run_revise(make(nano_dir, tmp_path, rounds=1, limit=1, batch_size=1)))
    assert len(seen) == 3  # answer, critique, revision: each sees a longer conversation
    assert seen[0] < seen[1] < seen[2]
    principle = load_constitution("demo")[rows[0]["principles"][0]]
    assert principle.critique and principle.revision


def test_resume_after_a_crash_writes_each_row_once(nano_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    full = read(run_revise(make(nano_dir, tmp_path, output=str(tmp_path / "full.jsonl"))))
    real, calls = KVCacheGenerator.generate, []

    def crash(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 6:  # the second batch's first call (5 calls a batch with 2 rounds)
            raise RuntimeError("killed")
        return real(self, *args, **kw)

    monkeypatch.setattr(KVCacheGenerator, "generate", crash)
    cfg = make(nano_dir, tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        run_revise(cfg)
    assert len(read(cfg.path)) == 2
    assert read(run_revise(cfg)) == full


def test_errors_come_before_the_model_loads(nano_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="constitution"):
        make(nano_dir, tmp_path, constitution=None)
    with pytest.raises(ConfigError, match="constitution not found"):
        run_revise(make(tmp_path / "no-model", tmp_path, constitution="nope.yaml"))


def test_cai_commands_from_the_cli(nano_dir: Path, tmp_path: Path) -> None:
    assert main(["cai", "revise", f"model={nano_dir}", f"data={DATA}", "constitution=hhh",
                 f"output_dir={tmp_path / 'rev'}", "max_new_tokens=4", "limit=2",
                 "temperature=1"]) == 0
    assert len(read(tmp_path / "rev" / "rows.jsonl")) == 2
    assert main(["cai", "label", f"model={nano_dir}", f"data={DATA}", "constitution=demo",
                 "judge_model=tests.test_cai_revise:lexical_judge", "max_new_tokens=6",
                 f"output_dir={tmp_path / 'lab'}"]) == 0
    rows = read(tmp_path / "lab" / "rows.jsonl")
    assert rows and all(r["chosen"][0]["content"] > r["rejected"][0]["content"] for r in rows)
