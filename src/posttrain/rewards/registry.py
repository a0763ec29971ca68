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
and math otherwise. For a mixture, every verifier that some kind of row (by the truth columns
it fills) calls for; each scores the rows it applies to, and is None on the others.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from posttrain.data.mixture import DataSpec, describe, sources
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


def auto_reward_names(data_spec: DataSpec, rows: Sequence[Mapping[str, Any]],
                      required: bool = True) -> list[str]:
    """The verifier that fits a dataset (see the module docstring), or the verifiers of a
    mixture's rows; when none fits, an error, or ``[]`` when not ``required`` (a reward model
    scores the rollouts anyway)."""
    cols = set(rows[0]) if rows else set()
    if isinstance(data_spec, str):
        names = _fit(data_spec, cols)
    else:
        names = _mixture_fit(sources(data_spec), rows)
    if names or not required:
        return names
    raise ConfigError(f"rewards=auto: cannot tell which verifier fits {describe(data_spec)} "
                      f"(its rows have columns {sorted(cols)}); set rewards explicitly")


_TRUTH_COLUMNS = frozenset({"numbers", "target", "rg_entry", "tests", "answer"})


def _fit(spec: str, cols: set[str]) -> list[str]:
    if spec.startswith("task:countdown") or {"numbers", "target"} <= cols:
        return ["countdown"]
    if spec.startswith("rg:") or "rg_entry" in cols:
        return ["rg"]
    if "tests" in cols:
        return ["code"]
    if "answer" in cols:
        return ["numeric"] if spec.startswith("task:arithmetic") else ["math"]
    return []


def _mixture_fit(specs: list[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every verifier some rows of a mixture need. Rows do not say which source they came
    from (and hold the other sources' columns as None), so each kind of row, by the truth
    columns it fills, picks its own; ``answer`` rows are numeric when every source that could
    hold them is task:arithmetic (countdown and reasoning-gym rows have columns of their own).
    """
    plain = [s for s in specs if not s.startswith(("task:countdown", "rg:"))]
    arithmetic = bool(plain) and all(s.startswith("task:arithmetic") for s in plain)
    kinds = dict.fromkeys(frozenset(k for k, v in r.items() if v is not None) & _TRUTH_COLUMNS
                          for r in rows)
    spec = "task:arithmetic" if arithmetic else ""
    return list(dict.fromkeys(name for kind in kinds for name in _fit(spec, set(kind))))


def build_reward_set(cfg: RewardConfig, data_spec: DataSpec,
                     rows: Sequence[Mapping[str, Any]], *, max_length: int,
                     precision: str) -> RewardSet:
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

    return JudgeReward(cfg.judge_model, cfg.judge_question, cfg.judge_mode)


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
                         data_spec: DataSpec) -> None:
    """Refuse, before any rollout, data that lacks a column a reward needs: every call would
    raise, be scored ``on_error``, and the run would learn nothing while exiting 0."""
    columns = sorted({k for r in rows for k in r if k not in ("prompt", "_ids")})
    filled = {k for r in rows for k, v in r.items() if v is not None}
    for fn, name in zip(rewards.fns, rewards.names, strict=True):
        for col in required_columns(fn):
            if col in filled:
                continue
            what = ("is empty in every row of" if col in columns else "is not a column of")
            raise DataError(f"reward '{name}' needs column '{col}', which {what} "
                            f"{describe(data_spec)} (its columns: "
                            f"{columns or 'none besides prompt'})")
