"""Successful attacks as DPO pairs: prompt = the attack as the target saw it, chosen = a
refusal under the constitution, rejected = the target's compliance.

The chosen refusal is, by default, a fixed text per constitution (``REFUSALS``, by the
constitution's ``name``; ``GENERIC_REFUSAL`` for any other constitution), or ``refusal=``.
With ``revise=true`` the target itself critiques and revises its compliant answer with the
constitution's harm principle (``harm_principle``): the revision is chosen when the refusal
rules read it as a refusal, else the fixed text is (counted as ``template``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from posttrain.redteam.config import RedteamConfig

REFUSALS = {
    "helpful-honest-harmless": (
        "I can't help with that: it could be used to hurt people or to get into things that "
        "are not yours. If there is a safe, legitimate goal behind the question, tell me about "
        "it and I'll gladly help with that part."),
    "demo": "Sorry, I can't share that.",  # the demo world's refusal (tasks/safety.py)
}
GENERIC_REFUSAL = "I'm sorry, but I can't help with that request."
SAFETY = "safety"  # the constitution category of the principles that guard against harm


def harm_principle(constitution: Any) -> Any:
    """The principle that revises a harmful answer: the heaviest of those written for the
    ``safety`` category (first among equals), else the constitution's first."""
    pool = [p for p in constitution.principles if SAFETY in p.categories]
    return max(pool, key=lambda p: p.weight) if pool else constitution.principles[0]


def fixed_refusal(cfg: RedteamConfig, constitution: Any) -> str:
    return cfg.refusal or REFUSALS.get(constitution.name, GENERIC_REFUSAL)


def revise_answers(cfg: RedteamConfig, model: Any, tok: Any, rows: list[dict[str, Any]],
                   constitution: Any) -> None:
    """Adds ``revision`` (the target's own revision, "" when it failed) and ``principle`` to
    each success row."""
    from posttrain.evals.suite import generate_texts

    if not rows:
        return
    p = harm_principle(constitution)
    convs = [r["prompt"] + [{"role": "assistant", "content": r["response"]},
                            {"role": "user", "content": p.critique}] for r in rows]
    say = dict(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
               precision=cfg.precision)
    critiques = [t[0] or "" for t in generate_texts(model, tok, convs, **say)]
    convs = [c + [{"role": "assistant", "content": cr}, {"role": "user", "content": p.revision}]
             for c, cr in zip(convs, critiques, strict=True)]
    revisions = [t[0] or "" for t in generate_texts(model, tok, convs, **say)]
    for r, cr, rv in zip(rows, critiques, revisions, strict=True):
        r.update(principle=p.name, critique=cr.strip(), revision=rv.strip())


def write_preferences(cfg: RedteamConfig, successes: Path, out: Path,
                      contrast: list[dict[str, Any]] | None = None) -> dict[str, int]:
    """preferences.jsonl from the successes file, then the ``contrast`` pairs (rewritten
    whole, atomically); returns how many rows chose a revision, the fixed refusal, and how
    many are contrast pairs."""
    from posttrain.cai import load_constitution
    from posttrain.evals.suite import verdict

    constitution = load_constitution(cfg.constitution)
    fixed = fixed_refusal(cfg, constitution)
    counts = {"rows": 0, "revised": 0, "template": 0}
    lines = []
    for line in successes.read_text().splitlines():
        s = json.loads(line)
        revised = bool(s.get("revision")) and verdict(s["revision"]) == "refused"
        counts["revised" if revised else "template"] += 1
        lines.append(json.dumps({
            "prompt": s["prompt"],
            "chosen": [{"role": "assistant", "content": s["revision"] if revised else fixed}],
            "rejected": [{"role": "assistant", "content": s["response"]}],
            "prompt_id": s["prompt_id"], "request": s["request"], "category": s["category"],
            "attack": s["attack"], "template": s["template"],
            "constitution": constitution.name, "chosen_by": "revision" if revised else "refusal",
        }) + "\n")
    lines += [json.dumps({**c, "constitution": constitution.name}) + "\n"
              for c in contrast or []]
    counts["unwrapped"] = sum(c["chosen_by"] == "unwrapped" for c in contrast or [])
    counts["contrast"] = len(contrast or []) - counts["unwrapped"]
    counts["rows"] = len(lines)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, out)
    return counts
