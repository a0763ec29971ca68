"""posttrain generate: samples per prompt, best-of-n / rejection / pairs selection, exact
resume after a crash, torn lines, config mismatch, input errors before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config.loader import config_from_dict
from posttrain.errors import ConfigError, DataError
from posttrain.generate import GenerateConfig, run_generate
from posttrain.generate.run import meta_path
from posttrain.rewards import registry
from posttrain.rollout import KVCacheGenerator

DATA = "task:arithmetic:size=6"


def length_reward(prompts, completions, **columns):  # deterministic stub reward
    return [float(len(c)) for c in completions]


@pytest.fixture(autouse=True)
def stub_reward(monkeypatch):
    monkeypatch.setitem(registry.REWARDS, "length", lambda: length_reward)


def make(nano_dir: Path, tmp_path: Path, **kw) -> GenerateConfig:
    base = {"model": str(nano_dir), "data": DATA, "output": str(tmp_path / "out.jsonl"),
            "n": 3, "max_new_tokens": 6, "batch_size": 2, "temperature": 1.0, "seed": 3}
    return config_from_dict(GenerateConfig, {**base, **kw})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_n_samples_per_prompt(nano_dir, tmp_path):
    from posttrain.data.sources import load_rows

    path = run_generate(make(nano_dir, tmp_path, rewards=["length"]))
    rows = read(path)
    assert len(rows) == 6 * 3
    ids = [r["prompt_id"] for r in rows]
    assert all(ids.count(i) == 3 for i in ids) and len(set(ids)) == 6
    assert all(r["completion"][0]["role"] == "assistant" for r in rows)
    assert all(r["reward"] == len(r["completion"][0]["content"]) for r in rows)
    assert load_rows(str(path)).format == "prompt_completion"


def test_best_picks_max_reward(nano_dir, tmp_path):
    every = read(run_generate(make(nano_dir, tmp_path, rewards=["length"])))
    best = read(run_generate(make(nano_dir, tmp_path, rewards=["length"], keep="best",
                                  output=str(tmp_path / "best.jsonl"))))
    assert len(best) == 6
    for b in best:
        group = [r for r in every if r["prompt_id"] == b["prompt_id"]]
        top = max(r["reward"] for r in group)
        assert b["reward"] == top
        assert b["completion"] == next(r for r in group if r["reward"] == top)["completion"]


def test_pairs_chosen_beats_rejected_and_train_dpo(nano_dir, tmp_path):
    from posttrain.algorithms.preference import DPOConfig, train_preference
    from posttrain.data.sources import load_rows

    path = run_generate(make(nano_dir, tmp_path, rewards=["length"], keep="pairs", n=4))
    rows = read(path)
    assert rows and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert load_rows(str(path)).format == "preference"
    dpo = config_from_dict(DPOConfig, {"model": str(nano_dir), "data": str(path),
                                       "output_dir": str(tmp_path / "dpo"), "max_steps": 2})
    assert (Path(train_preference(dpo)) / "config.json").exists()


def test_passing_threshold(nano_dir, tmp_path):
    rows = read(run_generate(make(nano_dir, tmp_path, rewards=["length"], keep="passing",
                                  min_reward=10)))
    assert all(r["reward"] >= 10 for r in rows)


def test_resume_after_crash_writes_each_row_once(nano_dir, tmp_path, monkeypatch):
    full = read(run_generate(make(nano_dir, tmp_path, output=str(tmp_path / "full.jsonl"))))
    real, calls = KVCacheGenerator.generate, []

    def crash_on_second(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(self, *args, **kw)

    monkeypatch.setattr(KVCacheGenerator, "generate", crash_on_second)
    cfg = make(nano_dir, tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        run_generate(cfg)
    assert len(read(cfg.path)) == 2 * 3  # the first batch (2 prompts x 3 samples) is kept
    path = run_generate(cfg)
    assert read(path) == full
    assert len(calls) == 1 + 1 + 2  # the rerun did not redo the first batch


def test_torn_line_is_cut_and_rewritten(nano_dir, tmp_path):
    full = read(run_generate(make(nano_dir, tmp_path, output=str(tmp_path / "full.jsonl"))))
    cfg = make(nano_dir, tmp_path, limit=2)
    run_generate(cfg)
    with open(cfg.path, "a") as f:  # killed mid-write of the next batch
        f.write('{"prompt_id": "2-abc", "prom')
    path = run_generate(make(nano_dir, tmp_path))  # limit raised: continues
    assert read(path) == full


def test_finished_output_is_not_redone(nano_dir, tmp_path, monkeypatch):
    cfg = make(nano_dir, tmp_path, n=1)
    before = run_generate(cfg).read_bytes()
    monkeypatch.setattr(KVCacheGenerator, "generate", lambda *a, **k: pytest.fail("redone"))
    assert run_generate(cfg).read_bytes() == before


def test_config_mismatch_is_refused(nano_dir, tmp_path):
    run_generate(make(nano_dir, tmp_path, n=1, limit=2))
    with pytest.raises(ConfigError, match=r"different config \(n differ\); overwrite=true"):
        run_generate(make(nano_dir, tmp_path, n=2, limit=2))
    with pytest.raises(ConfigError, match="resume=true continues it"):
        run_generate(make(nano_dir, tmp_path, n=1, limit=2, resume=False))
    path = run_generate(make(nano_dir, tmp_path, n=2, limit=2, overwrite=True))
    assert len(read(path)) == 4 and json.loads(meta_path(path).read_text())["config"]["n"] == 2


def test_changed_data_is_refused(nano_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    run_generate(make(nano_dir, tmp_path, data=str(prompts), n=1, limit=2))
    prompts.write_text("".join(json.dumps({"prompt": f"z{i}"}) + "\n" for i in range(3)))
    with pytest.raises(DataError, match="the data changed"):
        run_generate(make(nano_dir, tmp_path, data=str(prompts), n=1))


def test_foreign_output_is_refused(nano_dir, tmp_path):
    (tmp_path / "out.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="not written by posttrain generate"):
        run_generate(make(nano_dir, tmp_path))


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"data": None}, ConfigError, "'data' is required"),
    ({"keep": "best"}, ConfigError, "keep=best ranks samples by reward"),
    ({"keep": "passing", "rewards": ["length"], "min_reward": float("nan")}, ConfigError,
     "min_reward must be a finite number"),
    ({"min_reward": 1.0}, ConfigError, "min_reward=1.0 has no effect"),
    ({"keep": "pairs", "rewards": ["length"], "n": 1}, ConfigError, "needs n >= 2"),
])
def test_config_errors(nano_dir, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        make(nano_dir, tmp_path, **kw)


def test_input_errors_before_model_load(nano_dir, tmp_path, monkeypatch):
    import posttrain.models.io as io

    monkeypatch.setattr(io, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DataError):
        run_generate(make(nano_dir, tmp_path, data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        run_generate(make(nano_dir, tmp_path, rewards=["nope"]))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError, match="needs column 'answer'"):
        run_generate(make(nano_dir, tmp_path, data=str(prompts), rewards=["numeric"]))
    assert not (tmp_path / "out.jsonl").exists()


def test_passing_rows_train_sft(nano_dir, tmp_path):
    from posttrain.algorithms.sft import SFTConfig, train_sft

    path = run_generate(make(nano_dir, tmp_path, rewards=["numeric"], keep="passing",
                             min_reward=0.0))
    rows = read(path)
    assert len(rows) == 18 and {r["reward"] for r in rows} <= {0.0, 1.0}
    sft = config_from_dict(SFTConfig, {"model": str(nano_dir), "data": str(path),
                                       "output_dir": str(tmp_path / "sft"), "max_steps": 2})
    assert (Path(train_sft(sft)) / "config.json").exists()


def longer_judge(prompt, first, second, question):  # a consistent stub judge
    return 0.9 if len(first) > len(second) else 0.1


def first_slot_judge(prompt, first, second, question):  # pure position bias
    return 0.9


def test_judged_pairs_follow_the_judge(nano_dir, tmp_path):
    cfg = make(nano_dir, tmp_path, keep="judged", constitution="demo", n=2,
               judge_model="tests.test_generate:longer_judge")
    rows = read(run_generate(cfg))
    assert rows, "a nano model's two samples differ, so most prompts get a pair"
    names = {"secrets", "helpful", "correct-sums"}
    for r in rows:
        assert len(r["chosen"][0]["content"]) > len(r["rejected"][0]["content"])
        assert r["principle"] in names and r["judge_p"] == pytest.approx(0.9)


def test_a_position_biased_judge_labels_nothing(nano_dir, tmp_path, caplog):
    cfg = make(nano_dir, tmp_path, keep="judged", constitution="demo", n=2,
               judge_model="tests.test_generate:first_slot_judge")
    with caplog.at_level("INFO", logger="posttrain"):
        assert read(run_generate(cfg)) == []
    assert "order-inconsistent" in caplog.text


def test_judged_needs_a_constitution(nano_dir, tmp_path):
    with pytest.raises(ConfigError, match="constitution"):
        make(nano_dir, tmp_path, keep="judged", n=2)


def test_the_model_judges_itself_by_default(nano_dir, tmp_path):
    cfg = make(nano_dir, tmp_path, keep="judged", constitution="hhh", n=2)
    assert all(0.5 < r["judge_p"] < 1.0 for r in read(run_generate(cfg)))


def test_a_rating_judge_labels_by_each_answers_rating(nano_dir, tmp_path, caplog):
    from posttrain.cai import load_constitution
    from posttrain.cai.judge import RatingJudge, _bradley_terry
    from posttrain.models.io import load_model, load_tokenizer

    cfg = make(nano_dir, tmp_path, keep="judged", constitution="demo", n=2, judge_mode="rate")
    with caplog.at_level("INFO", logger="posttrain"):
        rows = read(run_generate(cfg))
    assert rows and "order-inconsistent" not in caplog.text
    judge = RatingJudge(load_model(str(nano_dir)), load_tokenizer(str(nano_dir)))
    demo = load_constitution("demo")
    for r in rows[:4]:
        rubric, prompt = demo[r["principle"]].rubric, r["prompt"][-1]["content"]
        good, bad = judge.rate([(rubric, prompt, r[k][0]["content"])
                                for k in ("chosen", "rejected")])
        assert good > bad and r["judge_p"] == pytest.approx(_bradley_terry(good, bad), abs=1e-4)


@pytest.mark.parametrize("keep", ["all", "pairs", "judged"])
def test_empty_answers_make_no_rows_and_are_counted(nano_dir, tmp_path, monkeypatch, keep):
    """A sample with no text (the model ended its turn at once) is never a row: the row
    formats refuse an empty answer, so a DPO run on the pairs would stop at load."""
    from posttrain.data.sources import load_rows
    from posttrain.generate import run as gen

    real = gen._score

    def first_sample_empty(*args):  # every prompt's first sample says nothing
        return [[("  ", *s[0][1:]), *s[1:]] for s in real(*args)]

    monkeypatch.setattr(gen, "_score", first_sample_empty)
    extra = {"judged": {"constitution": "demo", "judge_model": "tests.test_generate:longer_judge"},
             "pairs": {}, "all": {}}[keep]
    path = run_generate(make(nano_dir, tmp_path, keep=keep, rewards=["length"], **extra))
    rows = read(path)
    answers = [m["content"] for r in rows for k in ("completion", "chosen", "rejected")
               for m in r.get(k, [])]
    assert rows and all(a.strip() for a in answers)
    if keep == "all":
        assert len(rows) == 6 * 2
    load_rows(str(path))  # the rows pass their format's checks
    assert json.loads(meta_path(path).read_text())["counts"]["dropped_empty_answer"] == 6
