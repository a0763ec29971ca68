"""The data commands (``generate``, ``cai revise``, ``cai label``, and any other command of
``posttrain.commands.COMMANDS`` that neither trains nor evaluates) as pipeline stages: their
``${NAME.output}`` is the rows file they wrote, and it is what the next stage loads; a rerun
skips them when done, continues their rows when interrupted; their row counts are in
``stage.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from posttrain.commands import COMMANDS, TRAIN_COMMANDS, Command
from posttrain.pipeline import PipelineError, check_pipeline, run_pipeline
from posttrain.pipeline.kinds import stage_kinds
from posttrain.rollout import KVCacheGenerator

PROMPTS = "task:safety_prompts:size=4"
KINDS = {"sft": "sft", "revise": "cai revise", "sft_cai": "sft", "label": "cai label",
         "dpo": "dpo"}
STAGE_NAMES = list(KINDS)


def picky_judge(prompt, first, second, question):  # noqa: ANN001, ANN201
    """Consistent in both orders, except on the first prompt, where it always prefers the
    first slot: that pair is dropped as order-inconsistent."""
    from posttrain.data.chat import last_text
    from posttrain.data.prompts import load_prompt_rows

    if prompt == last_text(load_prompt_rows(PROMPTS)[0]["prompt"]):
        return 0.9
    return 0.9 if first > second else 0.1


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stage_json(out: Path, name: str) -> dict:
    return json.loads((out / name / "stage.json").read_text())


def cai_pipeline(tmp: Path) -> Path:
    """SFT -> critique/revise -> SFT on the revisions -> AI-labelled pairs -> DPO on them."""
    pipe = {
        "output_dir": str(tmp / "out"), "seed": 0,
        "defaults": {"max_length": 512, "max_new_tokens": 8, "batch_size": 2,
                     "precision": "fp32", "ref_cache_dir": str(tmp / "ref-cache")},
        "stages": {
            "sft": {"kind": "sft", "model": "tiny:nano", "data": "task:chat:size=8",
                    "max_steps": 2},
            "revise": {"kind": "cai revise", "model": "${sft.output}", "data": PROMPTS,
                       "constitution": "demo", "temperature": 1.0},
            "sft_cai": {"kind": "sft", "model": "${sft.output}", "data": "${revise.output}",
                        "max_steps": 2},
            "label": {"kind": "cai_label", "model": "${sft_cai.output}", "data": PROMPTS,
                      "constitution": "demo", "temperature": 1.0,
                      "judge_model": "tests.test_pipeline_data_stages:picky_judge"},
            "dpo": {"kind": "dpo", "model": "${sft_cai.output}", "data": "${label.output}",
                    "max_steps": 2},
        },
    }
    path = tmp / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def _spy_on_loaded_data(mp: pytest.MonkeyPatch, loaded: list[tuple[str, int]]) -> None:
    """Record (data spec, rows) of every training data load (SFT rows, preference pairs)."""
    import posttrain.data.encode as encode
    import posttrain.data.pairs as pairs

    for module in (encode, pairs):
        real = module.load_rows

        def spy(spec, *a, _real=real, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            rows = _real(spec, *a, **kw)
            loaded.append((str(spec), len(rows)))
            return rows

        mp.setattr(module, "load_rows", spy)


@pytest.fixture(scope="module")
def cai(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("cai-pipe")
    path = cai_pipeline(tmp)
    loaded: list[tuple[str, int]] = []
    with pytest.MonkeyPatch.context() as mp:
        _spy_on_loaded_data(mp, loaded)
        outputs = run_pipeline(path)
    return {"path": path, "out": tmp / "out", "outputs": outputs, "loaded": loaded}


def test_cai_pipeline_runs_end_to_end(cai: dict) -> None:
    out = cai["out"]
    assert list(cai["outputs"]) == STAGE_NAMES
    assert cai["outputs"]["revise"] == out / "revise" / "rows.jsonl"
    assert cai["outputs"]["label"] == out / "label" / "rows.jsonl"
    for name, kind in KINDS.items():
        rec = stage_json(out, name)
        assert (rec["status"], rec["kind"]) == ("done", kind), name  # cai_label: cai label
    assert (out / "dpo" / "final" / "config.json").exists()


def test_data_stage_summaries_count_their_rows(cai: dict) -> None:
    out = cai["out"]
    revised = read_rows(out / "revise" / "rows.jsonl")
    m = stage_json(out, "revise")["metrics"]
    assert m["data/prompts"] == 4 and m["data/rows"] == len(revised) >= 1
    assert m["data/dropped_prompts"] == 4 - len(revised)  # empty revisions are dropped
    assert 0 <= m["data/revised_frac"] <= 1
    pairs = read_rows(out / "label" / "rows.jsonl")
    m = stage_json(out, "label")["metrics"]
    assert m["data/rows"] == len(pairs) >= 1
    assert m["data/rows"] + m["data/dropped_prompts"] == m["data/prompts"] == 4
    assert m["data/dropped_order-inconsistent"] == m["data/dropped_prompts"] == 1
    assert m["data/judge_p"] == pytest.approx(sum(r["judge_p"] for r in pairs) / len(pairs))
    assert "data/rows" in (out / "report.md").read_text()  # the report's stage table


def test_a_data_stages_rows_file_is_what_the_next_stage_loads(cai: dict) -> None:
    out = cai["out"]
    for data_stage, consumer in [("revise", "sft_cai"), ("label", "dpo")]:
        rows_file = out / data_stage / "rows.jsonl"
        ran = yaml.safe_load((out / consumer / "config.yaml").read_text())
        assert ran["data"] == str(rows_file)
        assert (str(rows_file), len(read_rows(rows_file))) in cai["loaded"], consumer
        # the consumer's fingerprint follows the data stage's
        assert stage_json(out, consumer)["inputs"][data_stage] == \
            stage_json(out, data_stage)["fingerprint"]


def test_a_rerun_skips_every_stage(cai: dict, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    out = cai["out"]
    before = {n: (out / n / "stage.json").read_text() for n in STAGE_NAMES}
    rows = {n: (out / n / "rows.jsonl").read_bytes() for n in ("revise", "label")}

    def never(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a skipped pipeline generated something")

    monkeypatch.setattr(KVCacheGenerator, "generate", never)
    with caplog.at_level("INFO", logger="posttrain"):
        run_pipeline(cai["path"])
    for name, kind in KINDS.items():
        assert f"stage {name} ({kind}): skipped, done" in caplog.text
        assert (out / name / "stage.json").read_text() == before[name]
    assert "5 done, 0 to resume, 0 to run" in caplog.text
    assert {n: (out / n / "rows.jsonl").read_bytes() for n in rows} == rows


# --- resume -------------------------------------------------------------------------------


def generate_pipeline(tmp: Path, name: str) -> Path:
    pipe = {"output_dir": str(tmp / name), "seed": 0, "stages": {
        "gen": {"kind": "generate", "model": "tiny:nano", "data": "task:arithmetic:size=6",
                "n": 2, "batch_size": 2, "max_new_tokens": 4, "max_length": 128,
                "rewards": ["numeric"], "keep": "all"}}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def test_an_interrupted_data_stage_continues_its_rows(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    whole = read_rows(run_pipeline(generate_pipeline(tmp_path, "whole"))["gen"])
    real, calls, crash = KVCacheGenerator.generate, [], [True]

    def crash_on_second_batch(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2 and crash[0]:
            raise RuntimeError("killed")
        return real(self, *a, **kw)

    path = generate_pipeline(tmp_path, "cut")
    monkeypatch.setattr(KVCacheGenerator, "generate", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(path)
    out = tmp_path / "cut" / "gen"
    assert stage_json(tmp_path / "cut", "gen")["status"] == "failed"
    assert len(read_rows(out / "rows.jsonl")) == 4  # the first batch: 2 prompts x n=2
    calls.clear()
    crash[0] = False
    with caplog.at_level("INFO", logger="posttrain"):
        run_pipeline(path)
    assert "stage gen (generate): start, failed, resuming after the 2 prompts done" \
        in caplog.text
    assert len(calls) == 2  # the two batches left, not the three of a fresh start
    assert read_rows(out / "rows.jsonl") == whole  # each row once, as if never interrupted
    m = stage_json(tmp_path / "cut", "gen")["metrics"]
    assert m["data/prompts"] == 6 and m["data/rows"] == 12 and m["data/dropped_prompts"] == 0
    assert "data/reward" in m and 0 <= m["data/truncated_frac"] <= 1


# --- kinds --------------------------------------------------------------------------------


def _one_stage(tmp_path: Path, stage: dict) -> dict:
    return {"output_dir": str(tmp_path / "out"), "stages": {"s": stage}}


def test_kind_names_and_owned_keys(tmp_path: Path) -> None:
    stage = {"model": "tiny:nano", "data": PROMPTS, "constitution": "demo"}
    fps = {check_pipeline(_one_stage(tmp_path, {"kind": k, **stage}))["s"].fingerprint
           for k in ("cai revise", "cai_revise", "cai-revise")}
    assert len(fps) == 1  # one kind, three spellings
    with pytest.raises(PipelineError, match="did you mean 'cai revise'"):
        check_pipeline(_one_stage(tmp_path, {"kind": "cai revize", **stage}))
    with pytest.raises(PipelineError, match="key 'output': set by the pipeline"):
        check_pipeline(_one_stage(tmp_path, {"kind": "generate", **stage,
                                              "output": "x.jsonl"}))
    with pytest.raises(PipelineError, match="constitution"):
        check_pipeline(_one_stage(tmp_path, {"kind": "cai revise", "data": PROMPTS}))


def test_every_data_command_is_a_kind(tmp_path: Path) -> None:
    data = [n for n in COMMANDS if n not in TRAIN_COMMANDS and n != "eval"]
    assert {"generate", "cai revise", "cai label"} <= set(data)
    assert set(data) <= set(stage_kinds())
    if "redteam" in COMMANDS:  # its successes file is its output
        plan = check_pipeline(_one_stage(tmp_path, {"kind": "redteam", "model": "tiny:nano",
                                                    "data": "safety"}))
        assert plan["s"].output.parent == tmp_path / "out" / "s"
        assert plan["s"].output.suffix == ".jsonl"


@dataclass
class ToyConfig:
    """A data command written for this test: ``count`` rows, crashing after ``crash_after``."""

    count: int = 3
    crash_after: int = 0
    output_dir: str = "runs/toy"
    output: str | None = None
    resume: bool = True
    overwrite: bool = False

    @property
    def path(self) -> Path:
        return Path(self.output) if self.output else Path(self.output_dir) / "toy.jsonl"


TOY_RUNS: list[tuple[bool, bool, int]] = []  # (resume, overwrite, rows found) per run


def run_toy(cfg: ToyConfig) -> Path:
    """Appends a row per 'prompt' with the sidecar the data commands keep; summary.json."""
    path, meta = cfg.path, cfg.path.with_name(cfg.path.name + ".meta.json")
    done = len(read_rows(path)) if cfg.resume and path.exists() else 0
    TOY_RUNS.append((cfg.resume, cfg.overwrite, done))
    if not done:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    for i in range(done, cfg.count):
        if cfg.crash_after and i == cfg.crash_after and os.environ.get("TOY_CRASH"):
            raise RuntimeError("toy killed")
        with open(path, "a") as f:
            f.write(json.dumps({"prompt_id": f"{i}", "prompt": "p", "completion": "c"}) + "\n")
        meta.write_text(json.dumps({"prompts_done": i + 1}))
    (path.parent / "summary.json").write_text(json.dumps({"counts": {"made": cfg.count},
                                                          "name": "toy"}))
    return path


def test_a_new_data_command_becomes_a_stage_kind(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(COMMANDS, "toy rows", Command("rows for a test", __name__,
                                                      "ToyConfig", "run_toy"))
    TOY_RUNS.clear()
    pipe = _one_stage(tmp_path, {"kind": "toy_rows", "count": 4, "crash_after": 2})
    monkeypatch.setenv("TOY_CRASH", "1")
    with pytest.raises(RuntimeError, match="toy killed"):
        run_pipeline(pipe)
    monkeypatch.delenv("TOY_CRASH")
    outputs = run_pipeline(pipe)
    assert outputs == {"s": tmp_path / "out" / "s" / "toy.jsonl"}
    assert TOY_RUNS == [(False, False, 0), (True, False, 2)]  # fresh, then continued
    assert [r["prompt_id"] for r in read_rows(outputs["s"])] == ["0", "1", "2", "3"]
    rec = stage_json(tmp_path / "out", "s")
    assert rec["kind"] == "toy rows" and rec["status"] == "done"
    assert rec["metrics"] == {"data/prompts": 4, "data/rows": 4, "data/dropped_prompts": 0,
                              "summary/counts/made": 4}
    run_pipeline(pipe)
    assert len(TOY_RUNS) == 2  # done: skipped


def test_stage_tables_show_headline_numbers_not_breakdowns():
    from posttrain.pipeline.kinds import headline_metrics

    metrics = {"safety.refusal": {"value": 0.9, "low": 0.8, "high": 0.95, "n": 60},
               "safety.by_category.request.refusal": {"value": 1.0},
               "by_attack.base64.attempt_success": 0.5, "accuracy": 0.54, "passed": True,
               "note": "text"}
    assert headline_metrics(metrics, "s/") == {"s/safety.refusal": 0.9, "s/accuracy": 0.54}
