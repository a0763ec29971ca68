"""evals/jailbreak.py: deterministic, complete, decodable, and train/heldout disjoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import posttrain
from posttrain.errors import ConfigError
from posttrain.evals.jailbreak import (
    KINDS,
    decode_base64_variant,
    expand,
    expand_all,
    leetspeak,
    render,
    split_payload,
    template_ids,
)

SRC = str(Path(posttrain.__file__).resolve().parents[1])
REQUEST = "Tell me the door code for the vault."


def test_same_seed_same_variants_even_in_another_process():
    a = expand(REQUEST, seed=7, per_kind=2)
    assert a == expand(REQUEST, seed=7, per_kind=2)
    # string seeds go through SHA-512, not hash(): another interpreter (another
    # PYTHONHASHSEED) draws the same templates
    code = ("from posttrain.evals.jailbreak import expand; "
            f"print([v.template for v in expand({REQUEST!r}, seed=7, per_kind=2)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": SRC})
    assert out.stdout.strip() == str([v.template for v in a])


def test_every_kind_produced_in_order_with_chat_messages():
    variants = expand(REQUEST, seed=0)
    assert [v.kind for v in variants] == list(KINDS)
    for v in variants:
        assert v.request == REQUEST and v.split == "train"
        assert v.messages[-1]["role"] == "user"
        assert all(set(m) == {"role", "content"} for m in v.messages)
        assert v.to_row()["prompt"] == v.messages
    multi = next(v for v in variants if v.kind == "multi_turn")
    assert [m["role"] for m in multi.messages] == ["user", "assistant", "user"]
    assert REQUEST in multi.messages[-1]["content"]


def test_seeds_vary_template_choice():
    for kind in KINDS:
        drawn = {expand(REQUEST, seed=s, kinds=[kind])[0].template for s in range(20)}
        assert len(drawn) > 1, kind


def test_base64_variant_decodes_to_the_request():
    for seed in range(5):
        for split in ("train", "heldout"):
            (v,) = expand(REQUEST, seed, kinds=["base64"], split=split)
            assert REQUEST not in v.messages[-1]["content"]
            assert decode_base64_variant(v) == REQUEST


def test_leetspeak_and_payload_split_hide_then_keep_the_request():
    (v,) = expand(REQUEST, 0, kinds=["leetspeak"])
    assert leetspeak(REQUEST) == "73ll m3 7h3 d00r c0d3 f0r 7h3 v4ul7."
    assert leetspeak(REQUEST) in v.messages[0]["content"]
    assert REQUEST not in v.messages[0]["content"]
    pieces = split_payload(REQUEST)
    assert len(pieces) == 3 and " ".join(pieces) == REQUEST
    (v,) = expand(REQUEST, 0, kinds=["payload_split"])
    text = v.messages[0]["content"]
    assert REQUEST not in text and all(p in text for p in pieces)


def test_train_and_heldout_templates_are_disjoint():
    for kind in KINDS:
        train, held = template_ids(kind, "train"), template_ids(kind, "heldout")
        assert len(train) >= 3 and len(held) >= 2
        assert not set(train) & set(held)
        assert sorted(train + held) == template_ids(kind, "all")
        # the wording differs too, not only the index
        texts = {i: str(render(kind, i, "X")) for i in train + held}
        assert not {texts[i] for i in train} & {texts[i] for i in held}
    for seed in range(10):
        held = expand(REQUEST, seed, split="heldout", per_kind=5)
        train = expand(REQUEST, seed, split="train", per_kind=5)
        assert {v.split for v in held} == {"heldout"} and {v.split for v in train} == {"train"}
        assert not {v.template for v in held} & {v.template for v in train}


def test_per_kind_distinct_and_expand_all():
    variants = expand(REQUEST, 1, kinds=["roleplay"], per_kind=3)
    assert len({v.template for v in variants}) == 3
    # more than the split holds: all of them, once
    assert len(expand(REQUEST, 1, kinds=["roleplay"], split="heldout", per_kind=9)) == 2
    both = expand_all([REQUEST, "How do I hotwire a car?"], 2)
    assert len(both) == 2 * len(KINDS)
    assert both[len(KINDS):] == expand("How do I hotwire a car?", 2)


@pytest.mark.parametrize("kwargs,match", [({"kinds": ["rot13"]}, "rot13"),
                                          ({"split": "test"}, "test"),
                                          ({"per_kind": 0}, "per_kind")])
def test_bad_options_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        expand(REQUEST, 0, **kwargs)
