"""Model-loading errors (issue 26): the wrong kind of model, missing or run directories and
offline hub ids each give one clear line naming the path, never a random head or a traceback
from inside transformers."""

from __future__ import annotations

import logging
import shutil

import huggingface_hub
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from posttrain.cli import main
from posttrain.errors import PosttrainError
from posttrain.models import resolve
from posttrain.models.io import load_model, load_tokenizer
from posttrain.models.reward import load_reward_model
from posttrain.models.tiny import build_tokenizer
from posttrain.models.value import load_value_model


@pytest.fixture()
def no_hub_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any from_pretrained call fails the test: an offline id must be refused before one
    (transformers' hub download retries for ~50 s without network)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("from_pretrained reached: the hub retry loop would start")

    for cls in (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


# ---- the wrong kind of model ---------------------------------------------------------------


def test_plain_lm_as_reward_model_names_the_path(nano_dir):
    with pytest.raises(PosttrainError, match="no trained reward head") as e:
        load_reward_model(str(nano_dir), require_head=True)
    assert str(nano_dir) in str(e.value) and "posttrain rm" in str(e.value)


def test_tiny_as_reward_model_is_refused_too():
    with pytest.raises(PosttrainError, match="'tiny:nano' has no trained reward head"):
        load_reward_model("tiny:nano", require_head=True)


def test_saved_reward_model_loads_with_its_head(rm_dir):
    expected = load_reward_model("tiny:nano", seed=1).score.weight
    loaded = load_reward_model(str(rm_dir), require_head=True).score.weight
    assert loaded.equal(expected)


def test_plain_lm_where_a_value_head_is_required(nano_dir):
    with pytest.raises(PosttrainError, match="no trained value head") as e:
        load_value_model(str(nano_dir), build_tokenizer(), require_head=True)
    assert str(nano_dir) in str(e.value) and "value_model=policy" in str(e.value)


def test_expected_new_head_loads_without_the_missing_report(nano_dir):
    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        # Control: transformers reports the new head (else the check below proves nothing).
        AutoModelForSequenceClassification.from_pretrained(str(nano_dir), num_labels=1)
        assert any("score.weight" in r for r in reports)
        reports.clear()
        load_reward_model(str(nano_dir))  # posttrain rm starting from an LM
        load_value_model(str(nano_dir), build_tokenizer())  # PPO's value_model=policy
    finally:
        logger.removeHandler(handler)
    assert not any("score.weight" in r for r in reports)


# ---- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["./nope/final", "runs/nope/final", "{tmp}/x"])
def test_missing_directory_is_not_a_repo_id(spec, tmp_path, no_hub_calls):
    spec = spec.format(tmp=tmp_path)
    for load in (load_model, load_tokenizer, load_reward_model):
        with pytest.raises(PosttrainError, match=f"^model directory not found: {spec}$"):
            load(spec)


def test_run_directory_suggests_its_final(tmp_path, nano_dir):
    run = tmp_path / "run"
    shutil.copytree(nano_dir, run / "final")
    with pytest.raises(PosttrainError, match="has no config.json") as e:
        load_model(str(run))
    assert str(e.value).endswith(f"did you mean {run / 'final'}?")


def test_unfinished_run_suggests_its_latest_checkpoint(tmp_path, nano_dir):
    run = tmp_path / "run"
    for step in (2, 10):
        shutil.copytree(nano_dir, run / "checkpoints" / f"step-{step}" / "model")
    (run / "checkpoints" / "step-30").mkdir()  # incomplete: no model/ inside
    with pytest.raises(PosttrainError, match=r"step-10/model\?$"):
        load_tokenizer(str(run))


def test_directory_without_model_says_what_is_expected(tmp_path):
    with pytest.raises(PosttrainError, match="has no config.json.*e.g. a run's final/"):
        load_model(str(tmp_path))


# ---- hub ids without network ---------------------------------------------------------------


def test_hub_id_with_hf_hub_offline_fails_at_once(monkeypatch, no_hub_calls):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PosttrainError, match="not in the local HF cache.*HF_HUB_OFFLINE"):
        load_model("some-org/some-model")


def test_unreachable_hub_fails_without_retrying(monkeypatch, no_hub_calls):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(resolve, "hub_reachable", lambda: False)
    for load in (load_model, load_tokenizer, load_reward_model):
        with pytest.raises(PosttrainError, match="'some-org/some-model' is not a local "
                           "directory, and the hub .* is unreachable") as e:
            load("some-org/some-model")
        assert "\n" not in str(e.value)


def test_unreachable_hub_uses_the_cached_snapshot(monkeypatch, nano_dir):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(resolve, "hub_reachable", lambda: False)
    monkeypatch.setattr(resolve, "_cached_snapshot", lambda repo_id: nano_dir)
    assert resolve.resolve_spec("some-org/some-model") == str(nano_dir)


def test_probe_reports_a_closed_port_quickly(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:1")
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    resolve.hub_reachable.cache_clear()
    try:
        assert resolve.hub_reachable() is False
    finally:
        resolve.hub_reachable.cache_clear()


# ---- the command line ----------------------------------------------------------------------


def test_cli_run_directory_as_reward_model_exits_2(tmp_path, rm_dir, capsys):
    run = rm_dir.parent  # the rm run directory, not its final/
    args = ["ppo", "model=tiny:nano", "data=task:arithmetic:size=8", f"reward_model={run}",
            f"output_dir={tmp_path / 'ppo'}", "max_steps=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {run} has no config.json, so it is not a model directory; "
        f"did you mean {rm_dir}?"]
    assert "Traceback" not in err


def test_cli_plain_lm_as_reward_model_exits_2(tmp_path, nano_dir, capsys):
    args = ["ppo", "model=tiny:nano", "data=task:arithmetic:size=8",
            f"reward_model={nano_dir}", f"output_dir={tmp_path / 'ppo'}", "max_steps=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"model '{nano_dir}' has no trained reward head" in err and "Traceback" not in err
