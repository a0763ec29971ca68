"""Attack sources: each turns harmful requests into candidate attacks on the target.

    templates      every jailbreak transformation of ``evals/jailbreak.py`` (kinds, split,
                   per_kind), expanded deterministically from the seed
    a model        an attacker model samples ``attempts`` rewrites of each request under an
                   instruction prompt (``attacker_prompt``); each rewrite is one user message

A source is asked only for the requests still unbroken when its turn comes (sources are tried
in the order of ``attacker``), so a model attacker costs nothing for requests the templates
already broke.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from posttrain.redteam.config import ATTACKER_PROMPT, TEMPLATES, RedteamConfig

Message = dict[str, str]


@dataclass(frozen=True)
class Attack:
    """One attack: the chat the target sees, its ``kind`` (a transformation, or
    ``attacker_model``) and ``template`` (``kind/index``, or the attacker model's name)."""

    messages: list[Message]
    kind: str
    template: str


class Source(Protocol):
    name: str

    def attacks(self, requests: Sequence[str], start: int) -> list[list[Attack]]:
        """The candidate attacks of each request (``start``: the batch's first prompt)."""
        ...


class TemplateSource:
    name = TEMPLATES

    def __init__(self, cfg: RedteamConfig) -> None:
        self.cfg = cfg

    def attacks(self, requests: Sequence[str], start: int) -> list[list[Attack]]:
        from posttrain.evals.jailbreak import expand

        c = self.cfg
        return [[Attack(v.messages, v.kind, v.template)
                 for v in expand(r, c.seed, c.kinds, split=c.template_split,
                                 per_kind=c.per_kind)] for r in requests]


class ModelSource:
    """An attacker model (loaded on first use, or the target itself when it is the same)."""

    def __init__(self, cfg: RedteamConfig, spec: str, target: tuple[Any, Any] | None) -> None:
        self.cfg, self.name = cfg, spec
        self.policy = target if spec == cfg.model else None

    def attacks(self, requests: Sequence[str], start: int) -> list[list[Attack]]:
        from posttrain.evals.suite import generate_texts

        model, tok = self._load()
        c = self.cfg
        ask = c.attacker_prompt or ATTACKER_PROMPT
        asks = [[{"role": "user", "content": ask.replace("{request}", r)}] for r in requests]
        texts = generate_texts(model, tok, asks, n=c.attempts,
                               temperature=c.attacker_temperature, max_new_tokens=c.max_new_tokens,
                               seed=(c.seed * 1_000_003 + start) % 2**62, precision=c.precision)
        return [[Attack([{"role": "user", "content": (t or "").strip()}], "attacker_model",
                        self.name) for t in ts] for ts in texts]

    def _load(self) -> tuple[Any, Any]:
        if self.policy is None:
            from posttrain.evals.suite import load_policy

            self.policy = load_policy(self.name, self.cfg.precision)
        return self.policy


def sources(cfg: RedteamConfig, target: tuple[Any, Any]) -> list[Source]:
    return [TemplateSource(cfg) if a == TEMPLATES else ModelSource(cfg, a, target)
            for a in cfg.attacker]
