"""``posttrain redteam``: search for attacks a target model complies with (docs/redteam.md).

Requests are searched in batches through the resumable loop of ``posttrain generate``
(``generate.run.write_rows``): each batch's successes are appended to the successes file and
the batch is recorded finished, so a rerun continues after the last finished batch and
writes each success once. Every attempt also goes to the attempts log, from which
``summary.json`` is computed at the end; ``to_preferences=true`` then writes
``preferences.jsonl`` from the successes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.redteam.config import RedteamConfig

__all__ = ["RedteamConfig", "run_redteam"]

log = logging.getLogger("posttrain")

UNCATEGORIZED = "uncategorized"


def run_redteam(cfg: RedteamConfig) -> Path:
    """Search, summarise, and (``to_preferences``) write pairs; returns the preferences file
    when written, else the successes file."""
    from posttrain.generate.run import fingerprint, prompt_id, write_rows
    from posttrain.redteam.search import Verdicts

    rows = load_requests(cfg)  # input errors come before any model loads
    verdicts = Verdicts(cfg.judge)
    constitution = _constitution(cfg)
    _check_attackers(cfg)
    search_cfg = cfg.search_part()
    fp = hashlib.sha256(json.dumps(fingerprint(search_cfg), sort_keys=True).encode()
                        ).hexdigest()[:16]
    attempts_log = cfg.sibling("attempts.jsonl")
    if cfg.overwrite or not cfg.path.exists():
        attempts_log.parent.mkdir(parents=True, exist_ok=True)
        attempts_log.write_bytes(b"")

    def batches(model: Any, tok: Any) -> Any:
        return _Batch(cfg, model, tok, verdicts, constitution, attempts_log, fp)

    write_rows(search_cfg, rows, "redteam", batches)
    from posttrain.redteam.summary import read_attempts, summarize

    ids = {prompt_id(i, r["prompt"]) for i, r in enumerate(rows)}
    summary = {"model": cfg.model, "data": cfg.data, "attacker": cfg.attacker,
               "judge": cfg.judge or "rules",
               **summarize(read_attempts(attempts_log, fp, ids), len(rows))}
    out = cfg.path
    if cfg.to_preferences:
        from posttrain.redteam.preferences import write_preferences

        out = cfg.stage_output()
        summary["preferences"] = write_preferences(cfg, cfg.path, out, _contrast(cfg))
        if not summary["preferences"]["rows"]:
            log.warning("redteam: no attack succeeded, so %s has no rows", out)
    _write_json(cfg.sibling("summary.json"), summary)
    _log_result(summary, cfg.sibling("summary.json"))
    return out


def load_requests(cfg: RedteamConfig) -> list[dict[str, Any]]:
    """The harmful requests: prompt rows, ``harmful=false`` rows left out (counted in a log
    line), each with a ``category`` (``uncategorized`` when it has none)."""
    from posttrain.data.prompts import load_prompt_rows

    rows = load_prompt_rows(cfg.data_spec(), cfg.split)
    harmful = [r for r in rows if r.get("harmful", True) is not False]
    if len(harmful) < len(rows):
        log.info("redteam: %s: %d rows with harmful=false left out", cfg.data,
                 len(rows) - len(harmful))
    if not harmful:
        raise DataError(f"{cfg.data}: no harmful request (every row has harmful=false)")
    out = []
    for i, r in enumerate(harmful[: cfg.limit]):
        category = r.get("category", UNCATEGORIZED)
        if not isinstance(category, str) or not category.strip():
            raise DataError(f"{cfg.data}: harmful row {i}: category: needs a non-empty string, "
                            f"got {category!r}")
        out.append({**r, "category": category})
    return out


def _constitution(cfg: RedteamConfig) -> Any:
    if not cfg.to_preferences:
        return None
    from posttrain.cai import load_constitution

    return load_constitution(cfg.constitution)


def _check_attackers(cfg: RedteamConfig) -> None:
    """A missing attacker model directory fails now, not after the target loaded."""
    from posttrain.models.resolve import check_model_dir, parse_spec

    for spec in cfg.attacker_models:
        parsed = parse_spec(spec)
        if parsed.kind == "dir":
            check_model_dir(parsed.spec, Path(parsed.location))


class _Batch:
    """One batch of requests: search, then the success rows (with revisions when asked)."""

    def __init__(self, cfg: RedteamConfig, model: Any, tok: Any, verdicts: Any,
                 constitution: Any, attempts_log: Path, fp: str) -> None:
        from posttrain.redteam.attacks import sources
        from posttrain.redteam.search import Target

        self.cfg, self.model, self.tok = cfg, model, tok
        self.target, self.sources = Target(cfg, model, tok), sources(cfg, (model, tok))
        self.verdicts, self.constitution = verdicts, constitution
        self.attempts_log, self.fp = attempts_log, fp

    def __call__(self, chunk: list[tuple[str, dict[str, Any]]], start: int) -> list[dict]:
        from posttrain.data.chat import last_text
        from posttrain.redteam.preferences import revise_answers
        from posttrain.redteam.search import Request, search

        reqs = [Request(pid, last_text(r["prompt"]), r["category"]) for pid, r in chunk]
        search(self.cfg, reqs, self.sources, self.target, self.verdicts, start)
        wins = [{"prompt_id": r.id, "request": r.text, "category": r.category,
                 **{k: v for k, v in a.items() if k != "error"}}
                for r in reqs for a in r.attempts if a["verdict"] == "complied"]
        if self.cfg.revise:
            revise_answers(self.cfg, self.model, self.tok, wins, self.constitution)
        from posttrain.redteam.summary import append_attempts

        append_attempts(self.attempts_log, self.fp, (
            {"prompt_id": r.id, "request": r.text, "category": r.category, **a}
            for r in reqs for a in r.attempts))
        return wins


def _contrast(cfg: RedteamConfig) -> list[dict[str, Any]]:
    if not cfg.contrast:
        return []
    from posttrain.cai import load_constitution
    from posttrain.redteam.contrast import contrast_pairs, unwrapped_pairs
    from posttrain.redteam.preferences import fixed_refusal

    refusal = fixed_refusal(cfg, load_constitution(cfg.constitution))
    successes = [json.loads(line) for line in cfg.path.read_text().splitlines() if line]
    pairs, _ = contrast_pairs(cfg, refusal)
    return unwrapped_pairs(successes, refusal) + pairs


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _log_result(summary: dict[str, Any], path: Path) -> None:
    c, m = summary["counts"], summary["metrics"]
    if "request_success" not in m:
        log.info("redteam: no attempt made; %s", path)
        return
    r = m["request_success"]
    log.info("redteam: %d/%d requests broken (%.1f%% [%.1f, %.1f]), %d of %d attempts "
             "succeeded, %d errors; %s", c["requests_broken"], c["requests"], 100 * r["value"],
             100 * r["low"], 100 * r["high"], c["successes"], c["attempts"], c["error"], path)
