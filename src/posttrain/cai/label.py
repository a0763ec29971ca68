"""``posttrain cai label``: AI feedback (RLAIF) preference rows, i.e. ``posttrain generate``
with ``keep=judged`` and two samples per prompt by default (``generate/run.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.generate.run import GenerateConfig, run_generate

__all__ = ["LabelConfig", "run_generate"]


@dataclass
class LabelConfig(GenerateConfig):
    """Two answers per prompt from the policy, compared by an AI judge under a constitution
    (both orders): preference rows for posttrain rm / dpo."""

    n: int = field(default=2, metadata={"help": "samples per prompt (the first two that "
                                                "differ are compared)"})
    keep: Literal["all", "best", "passing", "pairs", "judged"] = field(default="judged",
                                                                      metadata={
        "help": "judged: preference rows by the AI judge (other values: see posttrain "
                "generate)"})
    output_dir: str = field(default="runs/feedback", metadata={
        "help": "the rows go to OUTPUT_DIR/rows.jsonl unless output is set"})
