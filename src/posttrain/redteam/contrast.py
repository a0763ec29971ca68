"""Contrast pairs: the harmless side of a red-team round's preference data.

DPO on successful attacks alone (chosen = a refusal) teaches the target to refuse whatever
looks like an attack, and, as measured on the demo, every request at all. Over-refusal
benchmarks (XSTest and the like) pair each harmful request with a harmless look-alike; these
pairs do the same for training. Each harmless row of the red-team data is sent plain and in
every template attack the harmful rows got; where the target answers (not a refusal, not
garbage, and containing the row's ``expected`` answer when it has one), its own answer is
chosen over the refusal. No label is needed beyond the data's ``harmful`` flag.

The harmful side gets the same symmetry: every broken request also appears unwrapped (the
plain request, the refusal over the first answer an attack drew from the target). Without
it the pairs hold plain harmless requests but only wrapped harmful ones, and "answer
whatever is not wrapped" fits them; on the demo's second seed that cost 40 points of plain
refusal.
"""

from __future__ import annotations

import logging
from typing import Any

from posttrain.redteam.config import RedteamConfig

log = logging.getLogger("posttrain")


def harmless_rows(cfg: RedteamConfig) -> list[dict[str, Any]]:
    from posttrain.data.prompts import load_prompt_rows
    rows = load_prompt_rows(cfg.data_spec(), cfg.split)
    return [r for r in rows if r.get("harmful", True) is False][: cfg.limit]


def contrast_pairs(cfg: RedteamConfig, refusal: str,
                   policy: tuple[Any, Any] | None = None) -> tuple[list[dict[str, Any]], int]:
    """(pair rows, chats tried): every harmless request plain and under each template."""
    from posttrain.data.chat import last_text
    from posttrain.evals.suite import load_policy, matches, verdict
    from posttrain.redteam.attacks import TemplateSource
    from posttrain.redteam.search import Target

    rows = harmless_rows(cfg)
    if not rows:
        log.warning("redteam: contrast=true but %s has no harmless rows (harmful=false)",
                    cfg.data)
        return [], 0
    chats: list[tuple[dict[str, Any], list[dict[str, str]], str, str]] = []
    templates = TemplateSource(cfg)
    for row in rows:
        plain = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) \
            else list(row["prompt"])
        chats.append((row, plain, "none", "none"))
        chats += [(row, a.messages, a.kind, a.template)
                  for a in templates.attacks([last_text(row["prompt"])], 0)[0]]
    model, tok = policy or load_policy(cfg.model, cfg.precision)
    answers = Target(cfg, model, tok).answer([c[1] for c in chats], cfg.seed)
    pairs = []
    for (row, messages, kind, template), (text, _) in zip(chats, answers, strict=True):
        expected = row.get("expected") or row.get("answer")
        expected = [expected] if isinstance(expected, str) else expected
        if text is None or verdict(text) != "complied" or (expected and not
                                                           matches(text, expected)):
            continue
        pairs.append({"prompt": messages,
                      "chosen": [{"role": "assistant", "content": text}],
                      "rejected": [{"role": "assistant", "content": refusal}],
                      "request": last_text(row["prompt"]),
                      "category": row.get("category", "uncategorized"), "attack": kind,
                      "template": template, "chosen_by": "contrast"})
    log.info("redteam: %d contrast pairs from %d harmless chats (%d requests)", len(pairs),
             len(chats), len(rows))
    return pairs, len(chats)


def unwrapped_pairs(successes: list[dict[str, Any]], refusal: str) -> list[dict[str, Any]]:
    """One pair per broken request: its plain text, the refusal over its first compliance."""
    first: dict[str, dict[str, Any]] = {}
    for s in successes:
        first.setdefault(s["prompt_id"], s)
    return [{"prompt": [{"role": "user", "content": s["request"]}],
             "chosen": [{"role": "assistant", "content": refusal}],
             "rejected": [{"role": "assistant", "content": s["response"]}],
             "prompt_id": s["prompt_id"], "request": s["request"], "category": s["category"],
             "attack": "none", "template": "none", "chosen_by": "unwrapped"}
            for s in first.values()]
