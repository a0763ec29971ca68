"""The benchmarks' fairness rules (benchmarks/README.md): a posttrain side is paired with the
TRL side of the same compile setting and allocator, every side of one allocator mode starts
under the same environment, the optimizer is named as it runs, and GRPO rates count tokens."""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import MALLOC_ENV, allocator_side_env, optimizer_name, same
from benchmarks.grpo_trl_bench import rates
from benchmarks.run import fair_reference, parse_side

ALL = ["posttrain", "trl", "posttrain_compile", "trl_compile", "posttrain_plain", "trl_plain"]


def test_sides_parse_compile_and_allocator_with_aliases():
    assert parse_side("posttrain", "tuned") == ("posttrain", False, "tuned")
    assert parse_side("trl_compile", "plain") == ("trl", True, "plain")
    assert parse_side("trl_malloc", "plain") == ("trl", False, "tuned")
    assert parse_side("posttrain_compile_glibc", "tuned") == ("posttrain", True, "plain")
    for bad in ("vllm", "trl_fast", "trl_plain_tuned"):
        with pytest.raises(ValueError):
            parse_side(bad, "tuned")


def test_fair_reference_pairs_like_with_like():
    assert fair_reference("posttrain", ALL, "tuned") == "trl"
    assert fair_reference("posttrain_compile", ALL, "tuned") == "trl_compile"
    assert fair_reference("posttrain_plain", ALL, "tuned") == "trl_plain"
    assert fair_reference("trl", ALL, "tuned") is None
    # no compiled TRL side ran: a compiled posttrain side has no fair ratio (never eager TRL)
    assert fair_reference("posttrain_compile", ["posttrain_compile", "trl"], "tuned") is None
    # TRL under another allocator is no fair reference either
    assert fair_reference("posttrain", ["posttrain", "trl_plain"], "tuned") is None
    assert fair_reference("posttrain", ["posttrain", "trl_malloc"], "plain") is None
    assert fair_reference("posttrain_tuned", ["posttrain_tuned", "trl_malloc"], "plain") == \
        "trl_malloc"


def test_allocator_modes_set_the_same_environment_for_every_side():
    env = {"PATH": "/bin", **MALLOC_ENV}
    plain = allocator_side_env(env, "plain")
    assert plain["POSTTRAIN_ALLOCATOR"] == "glibc" and plain["POSTTRAIN_MALLOC_TUNING"] == "0"
    assert not set(MALLOC_ENV) & set(plain)
    tuned = allocator_side_env({"PATH": "/bin"}, "tuned")
    # a preloaded size-class allocator when one is installed, else glibc's tuning variables
    assert "LD_PRELOAD" in tuned or all(tuned[k] == v for k, v in MALLOC_ENV.items())
    with pytest.raises(ValueError):
        allocator_side_env(env, "fast")


def test_optimizer_name_says_whether_the_kernel_is_fused():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert optimizer_name(torch.optim.AdamW(params, fused=True)) == "AdamW (fused)"
    assert optimizer_name(torch.optim.AdamW(params, foreach=False)) == "AdamW (not fused)"

    class Wrapped:  # accelerate's AcceleratedOptimizer keeps the torch one as .optimizer
        optimizer = torch.optim.AdamW(params, fused=True)

    assert optimizer_name(Wrapped()) == "AdamW (fused)"
    assert same(["a", "a"]) == "a" and same(["a", "b"]) == "MISMATCH: a / b"


def test_grpo_rates_count_completion_tokens_over_the_timed_steps():
    # steps end at 1, 3, 7 s; warm-up 1: the timed steps are 2 and 3 (6 s), 32 completions
    # each with mean lengths 10 and 20 tokens
    r = rates({"stamps": [1.0, 3.0, 7.0], "lengths": [99.0, 10.0, 20.0]}, 1, 32)
    assert r["completions_per_s"] == pytest.approx(64 / 6)
    assert r["completion_tokens_per_s"] == pytest.approx(32 * 30 / 6)
    assert r["mean_length"] == 15.0 and r["timed_steps"] == 2
