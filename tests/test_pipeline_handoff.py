"""The hand-off guarantee: the tokenizer and chat template one stage writes are what the next
stage loads, across every pair of adjacent stage kinds a pipeline would chain.

The base model carries a tokenizer no stage could re-create on its own (an extra special
token, and a chat template with a default system prompt, as SmolLM2's has); a stage that
loaded a default tokenizer or template instead of its input's would lose them. The pipeline
runs with two workers, so the hand-off also crosses processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig, AutoTokenizer

from posttrain.data.chat import DEFAULT_CHAT_TEMPLATE
from posttrain.pipeline import run_pipeline

TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a pipeline "
            "test.<|im_end|>\n{% endif %}" + DEFAULT_CHAT_TEMPLATE)
EXTRA_TOKEN = "<|tool|>"

_PREF = {"data": "task:safety_pairs:size=8"}
_ONLINE = {"prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 8}
_GRPO = {"kind": "grpo", "data": "task:arithmetic:size=8", "rewards": ["numeric"], **_ONLINE}
# stage -> (kind and keys); each model is an earlier stage's output
STAGES: dict[str, dict] = {
    "pretrain": {"kind": "pretrain", "model": "BASE", "data": "task:corpus:size=8"},
    "sft": {"kind": "sft", "model": "${pretrain.output}", "data": "task:chat:size=8"},
    "rm": {"kind": "rm", "model": "${sft.output}", **_PREF},
    "dpo": {"kind": "dpo", "model": "${sft.output}", **_PREF},
    "kto": {"kind": "kto", "model": "${sft.output}", **_PREF},
    "orpo": {"kind": "orpo", "model": "${sft.output}", **_PREF},
    "simpo": {"kind": "simpo", "model": "${sft.output}", **_PREF},
    "grpo": {**_GRPO, "model": "${sft.output}"},
    "ppo": {"kind": "ppo", "model": "${sft.output}", "reward_model": "${rm.output}",
            "data": "task:safety_prompts:split=train,size=8", "mini_batch_size": 4,
            "batch_size": 4, **_ONLINE},
    "grpo_after_dpo": {**_GRPO, "model": "${dpo.output}"},
    "dpo_after_grpo": {"kind": "dpo", "model": "${grpo.output}", **_PREF},
}


def _base(tmp_path: Path) -> Path:
    """The nano model with a tokenizer of its own: one more token, another template."""
    from posttrain.models.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [EXTRA_TOKEN]})
    tok.chat_template = TEMPLATE
    model = build_model("nano", seed=0)
    model.resize_token_embeddings(len(tok))
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    return base


def _input(stage: str) -> str:
    return STAGES[stage]["model"].removeprefix("${").removesuffix(".output}")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("handoff")
    base = _base(tmp)
    stages = {name: {k: (str(base) if v == "BASE" else v) for k, v in keys.items()}
              for name, keys in STAGES.items()}
    pipe = {"output_dir": str(tmp / "out"), "workers": 2,
            "defaults": {"max_steps": 1, "batch_size": 2, "max_length": 192, "precision": "fp32",
                         "ref_cache_dir": str(tmp / "ref-cache")},
            "stages": stages}
    path = tmp / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    run_pipeline(path)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("stage", [s for s in STAGES if s != "pretrain"])
def test_stage_loads_and_writes_its_inputs_tokenizer(stage: str, pipeline: Path) -> None:
    out = pipeline / "out"
    base = AutoTokenizer.from_pretrained(pipeline / "base")
    source = out / _input(stage) / "final"
    ran = yaml.safe_load((out / stage / "config.yaml").read_text())
    assert ran["model"] == str(source)  # it started from its input's model
    if stage == "ppo":
        assert ran["reward"]["model"] == str(out / "rm" / "final")
    final = out / stage / "final"
    assert json.loads((out / stage / "stage.json").read_text())["status"] == "done"
    for d in (source, final):
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.chat_template == TEMPLATE, d
        assert tok.get_vocab() == base.get_vocab(), d
        assert EXTRA_TOKEN in tok.all_special_tokens, d
        assert AutoConfig.from_pretrained(d).vocab_size == len(base), d  # embeddings follow
