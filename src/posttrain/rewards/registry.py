"""Reward functions by name, for configs: ``rewards: [numeric, format]`` or ``[auto]``.

| name        | scores                                                   | needs column        |
|-------------|----------------------------------------------------------|---------------------|
| `numeric`   | last number of the answer == truth (tolerance 1e-6 rel)  | `answer`            |
| `exact`     | answer text == truth (case-insensitive)                  | `answer`            |
| `math`      | symbolic equivalence via math-verify                     | `answer`            |
| `format`    | `<think>…</think><answer>…</answer>` format (EQ 5.7)     | -                   |
| `countdown` | expression uses the numbers once and hits the target     | `numbers`, `target` |
| `rg`        | the reasoning-gym task's own scorer                      | `rg_entry`          |
| `code`      | fraction of unit tests passed, in the sandbox            | `tests`             |
| `code_all`  | 1 if every unit test passes, in the sandbox              | `tests`             |
| `pkg.mod:fn`| any importable RewardFn                                  | (its own)           |

``check_reward_columns`` compares the columns each selected reward needs
(``required_columns``) with the data before the first rollout.

``auto`` picks from the data: ``task:countdown`` -> countdown, ``rg:`` -> rg, rows with
``tests`` -> code, with ``rg_entry`` -> rg, with ``answer`` -> numeric for ``task:arithmetic``
and math otherwise.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from posttrain.errors import ConfigError, DataError
from posttrain.rewards.base import RewardSet
from posttrain.rewards.config import RewardConfig
from posttrain.rewards.verifiers import (
    CountdownCheck,
    ExactMatch,
    MathVerify,
    NumericMatch,
    ReasoningGymScore,
    RegexFormat,
    VerifierReward,
)


def _code(mode: str) -> Callable[[], Any]:
    def make() -> Any:
        from posttrain.rewards.code import CodeReward

        return CodeReward(mode)  # type: ignore[arg-type]

    return make


REWARDS: dict[str, Callable[[], Any]] = {
    "numeric": lambda: VerifierReward(NumericMatch()),
    "exact": lambda: VerifierReward(ExactMatch()),
    "math": lambda: VerifierReward(MathVerify()),
    "format": lambda: VerifierReward(RegexFormat(), None),
    "countdown": lambda: VerifierReward(CountdownCheck(), ("numbers", "target")),
    "rg": lambda: VerifierReward(ReasoningGymScore(), "rg_entry"),
    "code": _code("fraction"),
    "code_all": _code("all_pass"),
}


def build_reward(name: str) -> Any:
    """A RewardFn by registry name or ``module.path:function``."""
    if name in REWARDS:
        return REWARDS[name]()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward {name!r}: cannot import it ({e})") from None
    raise ConfigError(f"unknown reward {name!r}; choose from {sorted(REWARDS)} or give "
                      f"'package.module:function'")


def auto_reward_names(data_spec: str, rows: Sequence[Mapping[str, Any]],
                      required: bool = True) -> list[str]:
    """The verifier that fits a dataset (see the module docstring); when none fits, an error,
    or ``[]`` when not ``required`` (a reward model scores the rollouts anyway)."""
    cols = set(rows[0]) if rows else set()
    if data_spec.startswith("task:countdown") or {"numbers", "target"} <= cols:
        return ["countdown"]
    if data_spec.startswith("rg:") or "rg_entry" in cols:
        return ["rg"]
    if "tests" in cols:
        return ["code"]
    if "answer" in cols:
        return ["numeric"] if data_spec.startswith("task:arithmetic") else ["math"]
    if not required:
        return []
    raise ConfigError(f"rewards=auto: cannot tell which verifier fits {data_spec} (its rows have "
                      f"columns {sorted(cols)}); set rewards explicitly")


def build_reward_set(cfg: RewardConfig, data_spec: str, rows: Sequence[Mapping[str, Any]], *,
                     max_length: int, precision: str) -> RewardSet:
    """The configured reward: the reward model first (named ``rm``), then the functions
    (``[auto]`` resolved against the training data), each call guarded (``RewardSet``)."""
    fns: list[Any] = []
    if cfg.model is not None:
        from posttrain.rewards.reward_model import RewardModel

        fns.append(RewardModel(cfg.model, max_length=max_length, precision=precision, name="rm"))
    names = cfg.functions
    if names == ["auto"]:
        names = auto_reward_names(data_spec, rows, required=cfg.model is None)
    fns += [_judge(cfg) if n == "judge" else build_reward(n) for n in names]
    return RewardSet(fns, cfg.weights or None, timeout_s=cfg.timeout_s or None,
                     on_error=cfg.on_error)


def _judge(cfg: RewardConfig) -> Any:
    from posttrain.rewards.judge import JudgeReward

    return JudgeReward(cfg.judge_model, cfg.judge_question)


def required_columns(fn: Any) -> tuple[str, ...]:
    """The dataset columns reward ``fn`` cannot score without: the ``required_columns`` it
    declares, a VerifierReward's truth column(s), else the parameters of its call after
    ``(prompts, completions)`` that have no default (columns arrive as keywords)."""
    declared = getattr(fn, "required_columns", None)
    if declared is not None:
        return tuple(declared)
    if isinstance(fn, VerifierReward):
        column = fn.column
        return () if column is None else (column,) if isinstance(column, str) else column
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in kinds and p.default is p.empty)


def check_reward_columns(rewards: RewardSet, rows: Sequence[Mapping[str, Any]],
                         data_spec: str) -> None:
    """Refuse, before any rollout, data that lacks a column a reward needs: every call would
    raise, be scored ``on_error``, and the run would learn nothing while exiting 0."""
    columns = sorted({k for r in rows for k in r if k not in ("prompt", "_ids")})
    filled = {k for r in rows for k, v in r.items() if v is not None}
    for fn, name in zip(rewards.fns, rewards.names, strict=True):
        for col in required_columns(fn):
            if col in filled:
                continue
            what = ("is empty in every row of" if col in columns else "is not a column of")
            raise DataError(f"reward '{name}' needs column '{col}', which {what} {data_spec} "
                            f"(its columns: {columns or 'none besides prompt'})")
