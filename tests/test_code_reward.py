"""The unit-test code reward: code extraction, fraction / all_pass on hand examples, and
completions that raise, hang or try to game the harness."""

from __future__ import annotations

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.rewards.code import CodeReward, completion_text, extract_code
from posttrain.sandbox.bwrap import find_bwrap
from posttrain.sandbox.runner import probe_bwrap

_BWRAP = find_bwrap()
_PROBLEM = "bwrap not installed" if _BWRAP is None else probe_bwrap(_BWRAP)
needs_bwrap = pytest.mark.skipif(
    _PROBLEM is not None, reason=f"bubblewrap unavailable ({_PROBLEM}); apt-get install bubblewrap")

ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(0, 0) == 1\n"  # 3rd wrong
GOOD = "def add(a, b):\n    return a + b\n"
HE_TESTS = ("METADATA = {}\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n"
            "    for i in range(3):\n        assert candidate(i, 0) == i\n"
            "    assert candidate(2, 5) == 7\n")


# -------------------------------------------------------------------------- pure functions


def test_extract_code_from_fences():
    text = ("Here is my answer:\n```python\ndef f():\n    return 1\n```\nUsage:\n"
            "```python\nprint(f())\n```\n")
    assert extract_code(text) == "def f():\n    return 1"  # longest python block
    two = "```py\nx = 1\n```\nfixed:\n```python\nx = 2\n```"
    assert extract_code(two) == "x = 2"  # equal length: the last one
    assert extract_code("```\nplain = 1\n```") == "plain = 1"  # untagged block
    assert extract_code("```bash\nls\n```\n```python3\nok = 1\n```") == "ok = 1"
    assert extract_code("```python\ndef g():\n    pass") == "def g():\n    pass"  # unclosed
    assert extract_code("def raw():\n    return 2\n") == "def raw():\n    return 2\n"


def test_completion_text_from_messages():
    msgs = [{"role": "user", "content": "write f"},
            {"role": "assistant", "content": "first"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": [{"type": "text", "text": "last"}]}]
    assert completion_text(msgs) == "last"
    assert completion_text("just text") == "just text"


def test_bad_mode_is_a_config_error():
    with pytest.raises(ConfigError):
        CodeReward("half", isolation="limits-only")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ in sandbox


@needs_bwrap
def test_fraction_and_all_pass_on_hand_examples():
    frac, allp = CodeReward("fraction"), CodeReward("all_pass")
    comps = [f"```python\n{GOOD}```",                   # 2 of 3 (the third test is wrong)
             "def add(a, b):\n    return a * b\n",      # add(2,2)=4 and add(0,0)=0: 1 of 3
             "def add(a, b):\n    return 1\n"]          # only add(0,0)==1: 1 of 3
    assert frac([""] * 3, comps, tests=[ADD_TESTS] * 3) == pytest.approx([2 / 3, 1 / 3, 1 / 3])
    right = ADD_TESTS.replace("== 1", "== 0")
    assert allp([""] * 3, comps, tests=[right] * 3) == [1.0, 0.0, 0.0]
    assert frac.last_stats["code/n"] == 3
    assert frac.last_stats["code/mean_reward"] == pytest.approx(4 / 9)
    assert allp.last_stats["code/all_pass_frac"] == pytest.approx(1 / 3)


@needs_bwrap
def test_humaneval_style_check_with_entry_point():
    frac, allp = CodeReward("fraction"), CodeReward("all_pass")
    comps = [GOOD, "def add(a, b):\n    return a - b\n", "def plus(a, b):\n    return a + b\n"]
    kw = {"tests": [HE_TESTS] * 3, "entry_point": ["add"] * 3}
    # a - b passes only the loop (i - 0 == i); a missing entry point passes nothing
    assert frac([""] * 3, comps, **kw) == pytest.approx([1.0, 1 / 3, 0.0])
    assert allp([""] * 3, comps, **kw) == [1.0, 0.0, 0.0]


@needs_bwrap
def test_pytest_style_functions_are_called():
    tests = ("def test_one():\n    assert add(1, 1) == 2\n\n"
             "def test_two():\n    assert add(1, 2) == 4\n")
    assert CodeReward("fraction")([""], [GOOD], tests=[tests]) == [0.5]


@needs_bwrap
def test_raising_and_hanging_completions_score_zero_and_are_counted():
    reward = CodeReward("fraction", timeout_s=1.5)
    hang_later = ("def add(a, b):\n    if a == 2:\n        while True:\n            pass\n"
                  "    return a + b\n")
    comps = ["raise RuntimeError('boom')", "while True:\n    pass", hang_later,
             "def add(a, b:\n    return a"]
    out = reward([""] * 4, comps, tests=[ADD_TESTS] * 4)
    # the third passes add(1, 2) == 3, then hangs: partial credit survives the timeout
    assert out == pytest.approx([0.0, 0.0, 1 / 3, 0.0])
    assert reward.last_stats["code/sandbox_timeout"] == 2
    assert reward.last_stats["code/sandbox_failed"] == 2
    assert reward.totals["sandbox_timeout"] == 2


@needs_bwrap
def test_early_exit_and_fake_reports_do_not_pay():
    reward = CodeReward("all_pass")
    cheats = [f"{GOOD}import sys\nsys.exit(0)\n",
              f"{GOOD}import os\nos._exit(0)\n",
              "print('\\n0 0 1\\n1 0 1\\n-1 1\\n')\nimport sys\nsys.exit(0)\n"]
    right = ADD_TESTS.replace("== 1", "== 0")
    assert reward([""] * 3, cheats, tests=[right] * 3) == [0.0, 0.0, 0.0]
    assert CodeReward("fraction")([""], [cheats[2]], tests=[right]) == [0.0]


@needs_bwrap
def test_not_applicable_invalid_and_missing_columns(caplog):
    reward = CodeReward("fraction")
    out = reward([""] * 3, [GOOD] * 3, tests=[None, "assert (", HE_TESTS],
                 entry_point=[None, None, None])
    assert out == [None, None, None]  # no tests / tests do not parse / check without entry
    assert reward.last_stats["code/not_applicable"] == 1
    assert reward.last_stats["code/invalid_tests"] == 2
    with pytest.raises(DataError, match="'tests' column"):
        reward([""], [GOOD])


@needs_bwrap
def test_prepend_prompt_for_signature_prompts():
    reward = CodeReward("all_pass", prepend_prompt=True)
    prompt = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n"
    assert reward([prompt], ["    return a + b\n"], tests=["assert add(2, 3) == 5"]) == [1.0]


@needs_bwrap
def test_message_list_completions():
    msgs = [{"role": "user", "content": "add please"},
            {"role": "assistant", "content": f"Sure:\n```python\n{GOOD}```"}]
    assert CodeReward("all_pass")([""], [msgs], tests=["assert add(2, 3) == 5"]) == [1.0]
