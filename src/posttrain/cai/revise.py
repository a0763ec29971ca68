"""``posttrain cai revise``: the supervised phase of Constitutional AI (seed §5.8).

For each prompt the model answers; then, ``rounds`` times, it is shown a principle's critique
request after its answer and writes a critique, then the principle's revision request and
writes a revision, which becomes the answer of the next round::

    user: PROMPT                 assistant: ANSWER
    user: <principle.critique>   assistant: CRITIQUE
    user: <principle.revision>   assistant: REVISION       (x rounds, a principle each)

A principle is drawn per round from the constitution (by the row's ``category`` when it has
one, by weight); its few-shot examples, if any, are shown first as an earlier conversation.
Each prompt gives one SFT row: ``prompt`` + ``completion`` (the last revision), with the
provenance: ``original`` (the first answer), ``principles``, ``critiques`` and ``revisions``
(a prompt whose last revision is empty gives none, with a warning).
Output and resume work as in ``posttrain generate`` (rows appended per batch, a sidecar with
the config's fingerprint; a rerun continues after the last finished batch).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from posttrain.errors import ConfigError
from posttrain.generate.run import ROWS_FILE, RowsConfig

log = logging.getLogger("posttrain")

Message = dict[str, str]


@dataclass
class ReviseConfig(RowsConfig):
    """Critique -> revise against a constitution: SFT rows with their provenance."""

    RANGES: ClassVar[dict[str, str]] = {**RowsConfig.RANGES, "rounds": ">= 1"}

    model: str = field(default="tiny", metadata={"help": "the model that answers, critiques "
                                                         "and revises"})
    data: str | list | None = field(default=None, metadata={
        "help": "prompts: task:NAME, rg:NAME, a file of prompt rows, or a list of them (a "
                "'category' column picks principles)"})
    output_dir: str = field(default="runs/revise", metadata={
        "help": f"rows go to OUTPUT_DIR/{ROWS_FILE} unless output is set"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    max_new_tokens: int = field(default=128, metadata={"help": "per answer, critique, revision"})
    max_length: int = field(default=2048, metadata={
        "help": "the longest conversation (prompt, answers, critiques) in tokens"})
    seed: int = field(default=0, metadata={"help": "principle draws and sampling"})
    constitution: str | None = field(default=None, metadata={
        "help": "the principles: hhh, demo, or a YAML file (docs/cai.md)"})
    rounds: int = field(default=1, metadata={"help": "critique -> revise rounds per prompt"})

    def validate(self) -> None:
        if not self.data or not self.constitution:
            raise ConfigError("cai revise needs data=PROMPTS and constitution=NAME|FILE")
        super().validate()


def run_revise(cfg: ReviseConfig) -> Path:
    """Answer, critique and revise every prompt; returns the rows file."""
    from posttrain.cai.constitution import load_constitution
    from posttrain.generate.run import load_prompts, write_rows

    constitution = load_constitution(str(cfg.constitution))  # errors before the model loads
    rows = load_prompts(cfg)

    def batches(model: Any, tok: Any) -> Any:
        reviser = _Reviser(cfg, constitution, model, tok)
        return lambda chunk, start: reviser.batch([pid for pid, _ in chunk],
                                                  [r for _, r in chunk], start)

    return write_rows(cfg, rows, "cai revise", batches)


class _Reviser:
    def __init__(self, cfg: ReviseConfig, constitution: Any, model: Any, tok: Any) -> None:
        from posttrain.rollout import KVCacheGenerator, default_stop_ids

        self.cfg, self.constitution, self.tok = cfg, constitution, tok
        self.gen = KVCacheGenerator(model, tok, precision=cfg.precision,
                                    stop_token_ids=default_stop_ids(model, tok))

    def batch(self, ids: list[str], rows: list[dict[str, Any]], start: int) -> list[dict]:
        convs = [_as_messages(r["prompt"]) for r in rows]
        answers = self._say(convs, [[]] * len(rows), start, 0)
        out = [{"prompt_id": pid, "prompt": r["prompt"], "original": a, "principles": [],
                "critiques": [], "revisions": []}
               for pid, r, a in zip(ids, rows, answers, strict=True)]
        for k in range(self.cfg.rounds):
            rngs = [random.Random(f"{self.cfg.seed}-{pid}-{k}") for pid in ids]
            principles = [self.constitution.sample(g, r.get("category"))
                          for g, r in zip(rngs, rows, strict=True)]
            shots = [_few_shot(p) for p in principles]
            convs = [c + [{"role": "assistant", "content": a},
                          {"role": "user", "content": p.critique}]
                     for c, a, p in zip(convs, answers, principles, strict=True)]
            critiques = self._say(convs, shots, start, 2 * k + 1)
            convs = [c + [{"role": "assistant", "content": cr},
                          {"role": "user", "content": p.revision}]
                     for c, cr, p in zip(convs, critiques, principles, strict=True)]
            answers = self._say(convs, shots, start, 2 * k + 2)
            for row, p, cr, a in zip(out, principles, critiques, answers, strict=True):
                row["principles"].append(p.name)
                row["critiques"].append(cr)
                row["revisions"].append(a)
        for row, a in zip(out, answers, strict=True):
            row["completion"] = [{"role": "assistant", "content": a}]
        kept = [row for row, a in zip(out, answers, strict=True) if a]
        if len(kept) < len(out):  # an empty revision is no demonstration
            log.warning("cai revise: %d of %d prompts ended with an empty revision; dropped",
                        len(out) - len(kept), len(out))
        return kept

    def _say(self, convs: list[list[Message]], shots: list[list[Message]], start: int,
             turn: int) -> list[str]:
        """One assistant turn for every conversation (after its few-shot turns)."""
        from posttrain.data.chat import render_prompt
        from posttrain.rollout import SamplingParams

        budget = self.cfg.max_length - self.cfg.max_new_tokens
        ids = []
        for s, c in zip(shots, convs, strict=True):
            ids.append(render_prompt(self.tok, s + c))
            if len(ids[-1]) > budget:  # the few-shot turns go first, then the oldest tokens
                ids[-1] = render_prompt(self.tok, c)[-budget:]
        sampling = SamplingParams(temperature=self.cfg.temperature,
                                  max_new_tokens=self.cfg.max_new_tokens,
                                  seed=(self.cfg.seed * 1_000_003 + start * 7 + turn) % 2**62)
        ro = self.gen.generate(ids, 1, sampling)
        return [t.strip() for t in self.tok.batch_decode(ro.completion_ids,
                                                          skip_special_tokens=True)]


def _as_messages(prompt: Any) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _few_shot(principle: Any) -> list[Message]:
    out: list[Message] = []
    for ex in principle.examples:
        out += [{"role": "user", "content": ex.prompt},
                {"role": "assistant", "content": ex.answer},
                {"role": "user", "content": principle.critique},
                {"role": "assistant", "content": ex.critique},
                {"role": "user", "content": principle.revision},
                {"role": "assistant", "content": ex.revision}]
    return out
