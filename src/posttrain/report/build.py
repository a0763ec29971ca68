"""``build_report(dir)``: read the run or pipeline, draw its plots, write the pages."""

from __future__ import annotations

from pathlib import Path

from posttrain.report.plots import stage_plots
from posttrain.report.render import (
    SAMPLES_SHOWN,
    StageSection,
    render_html,
    render_markdown,
)
from posttrain.report.runs import Source, Stage, load_source, read_jsonl


def _section(src: Source, stage: Stage, plots_dir: Path) -> StageSection:
    sec = StageSection(stage)
    d = stage.dir
    if d is None:
        return sec
    # One flat plots/ folder: a pipeline's PNGs are named after their stage.
    prefix = f"{stage.name}-" if src.pipeline else ""
    sec.plots = stage_plots(d, read_jsonl(d / "metrics.jsonl"), plots_dir, prefix)
    samples = [r for src_dir in (d, *stage.eval_dirs)
               for r in read_jsonl(src_dir / "samples.jsonl") if "prompt" in r or "response" in r]
    sec.samples, sec.samples_total = samples[:SAMPLES_SHOWN], len(samples)
    if (d / "config.yaml").exists():
        sec.config = (d / "config.yaml").read_text(errors="replace")
    return sec


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and ``plots/*.png`` into
    ``run_dir``, a run directory or a pipeline directory; returns the HTML file's path.

    Raises ``NotARunError`` (a ``PosttrainError``) for a directory that is neither.
    """
    src = load_source(run_dir)
    plots_dir = src.root / "plots"
    for old in plots_dir.glob("*.png"):  # a rebuild must not keep plots a run no longer has
        old.unlink()
    sections = [_section(src, s, plots_dir) for s in src.stages]
    (src.root / "report.md").write_text(render_markdown(src, sections, src.root))
    out = src.root / "report.html"
    out.write_text(render_html(src, sections))
    return out
