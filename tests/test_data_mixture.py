"""Data mixtures: several sources as one dataset, weighted by `times`, from YAML, the command
line and pipeline files, for every trainer that loads rows."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from posttrain.algorithms.preference import DPOConfig, train_preference
from posttrain.algorithms.sft import SFT_FORMATS, SFTConfig
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.data.pairs import unpaired_rows
from posttrain.data.prompts import load_prompt_rows, truth_columns
from posttrain.data.sources import load_rows
from posttrain.errors import ConfigError, DataError
from posttrain.pipeline import PipelineError, check_pipeline
from posttrain.redteam.config import RedteamConfig
from posttrain.rewards.base import RewardSet
from posttrain.rewards.registry import auto_reward_names, build_reward
from posttrain.train.metrics import read_metrics
from tests.conftest import write_jsonl


def _pc(tmp_path: Path, name: str, n: int) -> str:
    rows = [{"prompt": f"{name} {i}?", "completion": f"answer {i}"} for i in range(n)]
    return str(write_jsonl(tmp_path / f"{name}.jsonl", rows))


def _prompts(rows: list[dict]) -> list[str]:
    return [r["prompt"] for r in rows]


# --- loading -------------------------------------------------------------------------------


def test_two_sources_of_one_format_are_concatenated(tmp_path, caplog):
    a, b = _pc(tmp_path, "a", 5), _pc(tmp_path, "b", 3)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        rows = load_rows([a, b], formats=SFT_FORMATS)
    assert rows.format == "prompt_completion" and rows.source == f"{a} + {b}"
    assert _prompts(rows.rows) == [f"a {i}?" for i in range(5)] + [f"b {i}?" for i in range(3)]
    assert f"8 rows = 5 from {a}, 3 from {b}" in caplog.text  # one line: rows per source


def test_times_repeats_and_subsamples_deterministically(tmp_path):
    a, b = _pc(tmp_path, "a", 10), _pc(tmp_path, "b", 7)
    spec = [{"source": a, "times": 2}, {"source": b, "times": 0.5}]
    rows = _prompts(load_rows(spec).rows)
    assert len(rows) == 2 * 10 + 4  # 0.5 * 7 = 3.5 rounds half up
    assert rows[:20] == [f"a {i}?" for i in range(10)] * 2
    sample = rows[20:]
    assert len(set(sample)) == 4 and set(sample) < {f"b {i}?" for i in range(7)}
    assert _prompts(load_rows(spec).rows) == rows  # the same rows every time
    # A larger share of the same source keeps the rows of a smaller one.
    more = _prompts(load_rows([{"source": b, "times": 1.7}]).rows)
    assert len(more) == 7 + 5 and set(sample) <= set(more[7:])


def test_a_tiny_share_still_gives_one_row(tmp_path):
    assert len(load_rows([{"source": _pc(tmp_path, "a", 10), "times": 0.01}])) == 1


def test_sources_in_different_formats_name_the_odd_one(tmp_path):
    a = _pc(tmp_path, "a", 3)
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        ],
    )
    with pytest.raises(
        DataError,
        match=rf"^{chat}: rows in format 'messages', but the "
        rf"mixture's first source {a} has rows in format "
        "'prompt_completion'",
    ):
        load_rows([a, str(chat)], formats=SFT_FORMATS)


def test_a_bad_row_names_its_source_and_line(tmp_path):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}],
    )
    with pytest.raises(DataError, match=rf"^{bad}:2: field 'completion'"):
        load_rows([_pc(tmp_path, "a", 3), str(bad)], formats=SFT_FORMATS)
    rows = load_rows([_pc(tmp_path, "a", 3), str(bad)], on_bad_row="skip")
    assert len(rows) == 4 and rows.skipped == 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"source": "a.jsonl", "weight": 2}, r"entry 2 \(.*'weight'.*\): unknown key 'weight'"),
        ({"source": "a.jsonl", "times": 0}, r"entry 2 .*'times' must be a number > 0, got 0"),
        ({"source": "a.jsonl", "times": -1}, r"'times' must be a number > 0, got -1"),
        ({"source": "a.jsonl", "times": True}, r"'times' must be a number > 0, got True"),
        ({"times": 2}, r"entry 2 .*'source' needs a source spec"),
        (["a.jsonl"], r"entry 2 .*expected a source spec or \{source: SPEC, times: N\}"),
    ],
)
def test_a_bad_entry_is_a_config_error_naming_it(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        load_rows([_pc(tmp_path, "a", 3), entry])


def test_a_task_spec_split_at_its_comma_is_explained():
    with pytest.raises(
        ConfigError,
        match=r"entry 2 \('seed=2'\) looks like a parameter of the "
        r"task spec before it.*quote the spec",
    ):
        load_rows(["task:arithmetic:size=4", "seed=2"])
    with pytest.raises(ConfigError, match="an empty data mixture"):
        load_rows([])


def test_prompt_mixtures_pick_a_verifier_per_kind_of_row():
    spec = ["task:arithmetic:size=6", {"source": "task:countdown:size=4", "times": 2}]
    rows = load_prompt_rows(spec)
    assert len(rows) == 6 + 8
    assert auto_reward_names(spec, rows) == ["numeric", "countdown"]
    # Every row has every column, None where its task has none: each verifier scores its own
    # rows, even in a batch that holds no row of the other task.
    rewards = RewardSet([build_reward(n) for n in ("numeric", "countdown")])
    for batch in (rows[:2], rows[-2:], [rows[0], rows[-1]]):
        out = rewards(_prompts(batch), ["no idea"] * 2, **truth_columns(batch))
        kinds = ["countdown" if r["target"] is not None else "numeric" for r in batch]
        for i, kind in enumerate(kinds):
            other = "numeric" if kind == "countdown" else "countdown"
            assert out.per_fn[kind][i] == 0.0 and out.per_fn[other][i].isnan()


def test_auto_rewards_need_a_verifier_that_fits_some_rows(tmp_path):
    plain = str(write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Say hi."}]))
    mixed = ["task:arithmetic:size=2", plain]
    assert auto_reward_names(mixed, load_prompt_rows(mixed)) == ["math"]
    with pytest.raises(ConfigError, match=r"cannot tell which verifier fits .*plain.jsonl \+ "):
        auto_reward_names([plain, plain], load_prompt_rows([plain, plain]))


def test_kto_mixes_unpaired_and_preference_sources(tmp_path):
    unpaired = write_jsonl(
        tmp_path / "u.jsonl",
        [
            {"prompt": "p", "completion": "good", "label": True},
            {"prompt": "p", "completion": "bad", "label": False},
        ],
    )
    items, skipped = unpaired_rows(
        [str(unpaired), "task:safety_pairs:size=3"], split="train", on_bad_row="error"
    )
    assert len(items) == 2 + 2 * 3 and skipped == 0
    assert [label for *_, label in items[2:]] == [True, False] * 3


# --- configs: YAML, command line, commands that take one source ----------------------------


def test_yaml_and_command_line_give_the_same_mixture(tmp_path):
    want = ["a.jsonl", "task:arithmetic:size=120,sum_frac=0", {"source": "b.jsonl", "times": 0.5}]
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text(
        "data:\n  - a.jsonl\n  - task:arithmetic:size=120,sum_frac=0\n"
        "  - {source: b.jsonl, times: 0.5}\n"
    )
    assert load_config(SFTConfig, cfg_file).data == want
    cli = 'data=[a.jsonl, "task:arithmetic:size=120,sum_frac=0", {source: b.jsonl, times: 0.5}]'
    assert load_config(SFTConfig, None, [cli]).data == want
    assert load_config(SFTConfig, None, ["data=[a.jsonl,b.jsonl]"]).data == ["a.jsonl", "b.jsonl"]
    # One source stays a string, commas and all; eval_data takes a mixture too.
    cfg = load_config(SFTConfig, None, ["data=task:x:size=1,seed=2", "eval_data=[a, b]"])
    assert cfg.data == "task:x:size=1,seed=2" and cfg.eval_data == ["a", "b"]
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(SFTConfig, None, ["data=[a.jsonl"])


def test_commands_that_take_one_source_refuse_a_list(tmp_path):
    cfg_file = tmp_path / "redteam.yaml"
    cfg_file.write_text("data: [a.jsonl, b.jsonl]\n")
    with pytest.raises(ConfigError, match="config key 'data': expected str"):
        load_config(RedteamConfig, cfg_file)
    with pytest.raises(DataError, match="a list of sources, where this option takes one"):
        load_prompt_rows(load_config(RedteamConfig, None, ["data=[a.jsonl,b.jsonl]"]).data)


# --- trainers ------------------------------------------------------------------------------


def test_sft_trains_on_a_mixture_given_on_the_command_line(tmp_path, chat_jsonl, caplog):
    out = tmp_path / "run"
    data = f'data=[{chat_jsonl}, {{source: "task:chat:size=8,seed=5", times: 0.5}}]'
    with caplog.at_level(logging.INFO, logger="posttrain"):
        assert (
            main(
                [
                    "sft",
                    "model=tiny:nano",
                    data,
                    f"output_dir={out}",
                    "max_steps=3",
                    "batch_size=4",
                    "max_length=128",
                ]
            )
            == 0
        )
    assert (out / "final" / "model.safetensors").exists()
    recorded = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert recorded == [str(chat_jsonl), {"source": "task:chat:size=8,seed=5", "times": 0.5}]
    assert "data mixture (train split): 68 rows = 64 from" in caplog.text
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["data/rows"] == 68
    assert [r["step"] for r in rows if "train/loss" in r][-1] == 3


def test_dpo_trains_on_a_file_and_a_task(tmp_path):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": f"What is {i}+1?", "chosen": f"{i + 1}", "rejected": "I won't say."}
            for i in range(8)
        ],
    )
    cfg = load_config(
        DPOConfig,
        None,
        [
            "model=tiny:nano",
            f"data=[{pairs}, task:safety_pairs:size=16]",
            f"output_dir={tmp_path / 'dpo'}",
            "max_steps=2",
            "batch_size=4",
            "max_length=128",
            f"ref_cache_dir={tmp_path / 'cache'}",
        ],
    )
    final = train_preference(cfg)
    assert (final / "model.safetensors").exists()
    assert read_metrics(tmp_path / "dpo" / "metrics.jsonl")[0]["data/rows"] == 8 + 16


# --- pipelines -----------------------------------------------------------------------------


def _pipeline(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(f"""output_dir: {tmp_path / "out"}
stages:
  redteam:
    kind: redteam
    model: tiny:nano
    data: safety
    to_preferences: true
  dpo:
    kind: dpo
    model: tiny:nano
    data: {data}
""")
    return path


def test_a_pipeline_mixture_resolves_references(tmp_path):
    block = "\n      - ${redteam.output}\n      - task:safety_pairs:size=100"
    plan = check_pipeline(_pipeline(tmp_path, block))
    dpo = plan["dpo"]
    assert dpo.config["data"] == [str(plan["redteam"].output), "task:safety_pairs:size=100"]
    assert plan["redteam"].output.name == "preferences.jsonl" and dpo.inputs == ("redteam",)
    # The flow form needs the reference quoted ({ starts a YAML mapping); same stage.
    flow = check_pipeline(_pipeline(tmp_path, '["${redteam.output}", task:safety_pairs:size=100]'))
    assert flow["dpo"].fingerprint == dpo.fingerprint
    weighted = check_pipeline(
        _pipeline(tmp_path, '["${redteam.output}", {source: task:safety_pairs:size=100, times: 2}]')
    )
    assert weighted["dpo"].fingerprint != dpo.fingerprint


def test_a_pipeline_reports_a_bad_mixture_entry_at_its_line(tmp_path):
    path = _pipeline(tmp_path, '["${redteam.output}", {source: x.jsonl, times: 0}]')
    with pytest.raises(
        PipelineError,
        match=r"pipe.yaml:11: stage 'dpo', key 'data': data "
        r"mixture entry 2 .*'times' must be a number > 0",
    ):
        check_pipeline(path)
