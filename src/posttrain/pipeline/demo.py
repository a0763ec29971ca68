"""``posttrain demo``: the shipped demo pipelines (``files/demo.yaml``, ``files/demo-quick.yaml``,
and ``files/demo-smollm2.yaml``, a real small chat model).

The demo is an ordinary pipeline file: ``posttrain demo --print`` shows it, and a copy runs
with ``posttrain pipeline run``. Running it writes every stage's run directory, the report
(``report.html``, ``report.md``) and prints the summary table.
"""

from __future__ import annotations

from pathlib import Path

FILES = Path(__file__).parent / "files"


def demo_file(quick: bool = False, smollm2: bool = False) -> Path:
    if smollm2:
        return FILES / "demo-smollm2.yaml"
    return FILES / ("demo-quick.yaml" if quick else "demo.yaml")


def run_demo(output_dir: str | Path = "demo-run", quick: bool = False, seed: int = 0,
             workers: int | None = None, smollm2: bool = False) -> dict[str, Path]:
    """Run the demo pipeline into ``output_dir``; returns ``{stage: model or run dir}``."""
    from posttrain.pipeline.runner import run_pipeline

    return run_pipeline(demo_file(quick, smollm2), output_dir=output_dir, workers=workers,
                        overrides=[f"seed={seed}"])
