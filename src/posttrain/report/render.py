"""Rendering a report: a self-contained HTML page (plots inlined as base64 PNG, no network)
and the same content as markdown (plots linked from ``plots/``)."""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.report.plots import Plot
from posttrain.report.runs import Source, Stage
from posttrain.report.stages import markdown_table, table_rows

SAMPLES_SHOWN = 8
_TEXT_MAX = 800  # characters of a prompt or response shown

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
  color:#1f2328;background:#f6f8fa}
main{max-width:1340px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:0 0 8px}
h3{font-size:15px;margin:18px 0 8px;color:#424a53}
.sub,figcaption,.note{color:#57606a}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;
  margin:18px 0}
nav a{margin-right:12px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 12px;border-bottom:1px solid #eaeef2;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{border-bottom:2px solid #d0d7de}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:16px}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #eaeef2;border-radius:4px}
figcaption{font-size:12.5px;margin-top:4px}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;border-radius:4px}
summary{cursor:pointer;font-weight:600}
table.samples{width:100%;table-layout:fixed}
table.samples th:nth-child(1){width:32%}table.samples th:nth-child(3){width:18%}
table.samples td{text-align:left;vertical-align:top;white-space:pre-wrap;
  font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.failed{color:#cf222e}.pending,.running{color:#9a6700}
"""


@dataclass
class StageSection:
    """Everything shown for one stage."""

    stage: Stage
    plots: list[Plot] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    samples_total: int = 0
    config: str | None = None


def anchor(name: str) -> str:
    return "stage-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _text(value: Any) -> str:
    """A prompt or response as text: message lists as ``role: content`` lines."""
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        value = "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    elif not isinstance(value, str):
        value = json.dumps(value)
    return value if len(value) <= _TEXT_MAX else value[:_TEXT_MAX] + " …"


def _extras(row: dict[str, Any]) -> str:
    """The row's other scalar fields (correct, reward, ...), as ``key=value``."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()
                     if k not in ("prompt", "response") and isinstance(v, str | int | float | bool)
                     and len(str(v)) < 60)


# ---- HTML ---------------------------------------------------------------------------------


def _html_table(stages: list[Stage]) -> str:
    names, rows = table_rows(stages)
    head = "".join(f'<th><a href="#{anchor(n)}">{html.escape(n)}</a></th>' for n in names)
    body = []
    for label, cells in rows:
        tds = "".join(f'<td class="{html.escape(c)}">{html.escape(c)}</td>' if label == "status"
                      else f"<td>{html.escape(c)}</td>" for c in cells)
        body.append(f"<tr><th>{html.escape(label)}</th>{tds}</tr>")
    return (f"<table><thead><tr><th>metric</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _html_figure(p: Plot) -> str:
    data = base64.b64encode(p.path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(p.title)}">'
            f"<figcaption>{html.escape(p.caption)}</figcaption></figure>")


def _html_plots(plots: list[Plot]) -> str:
    curves = [p for p in plots if not p.slug.startswith("instrument-")]
    instruments = [p for p in plots if p.slug.startswith("instrument-")]
    out = []
    if curves:
        out.append('<h3>Curves</h3><div class="plots">'
                   + "".join(_html_figure(p) for p in curves) + "</div>")
    if instruments:
        out.append('<h3>Instruments (seed §5.3, §5.6)</h3><div class="plots">'
                   + "".join(_html_figure(p) for p in instruments) + "</div>")
    return "".join(out)


def _html_samples(sec: StageSection) -> str:
    if not sec.samples:
        return ""
    rows = "".join(f"<tr><td>{html.escape(_text(r.get('prompt', '')))}</td>"
                   f"<td>{html.escape(_text(r.get('response', '')))}</td>"
                   f"<td>{html.escape(_extras(r))}</td></tr>" for r in sec.samples)
    return (f"<h3>Sample completions ({len(sec.samples)} of {sec.samples_total})</h3>"
            '<table class="samples"><thead><tr><th>prompt</th><th>response</th>'
            f"<th>verdict</th></tr></thead><tbody>{rows}</tbody></table>")


def _html_section(sec: StageSection) -> str:
    s = sec.stage
    where = f" · <code>{html.escape(str(s.dir))}</code>" if s.dir is not None else ""
    kind = f' <span class="sub">({html.escape(s.kind)})</span>' if s.kind != "run" else ""
    status = html.escape(s.status)
    parts = [f'<section id="{anchor(s.name)}"><h2>{html.escape(s.name)}{kind}</h2>'
             f'<div class="sub"><span class="{status}">{status}</span>{where}</div>']
    if s.error:
        parts.append(f'<pre class="failed">{html.escape(s.error)}</pre>')
    parts.append(_html_plots(sec.plots) or '<p class="note">No curves logged.</p>')
    parts.append(_html_samples(sec))
    if sec.config is not None:
        parts.append("<h3>Config</h3><details><summary>config.yaml (resolved, as run)</summary>"
                     f"<pre>{html.escape(sec.config)}</pre></details>")
    return "".join(parts) + "</section>"


def render_html(src: Source, sections: list[StageSection]) -> str:
    what = f"pipeline of {len(src.stages)} stages" if src.pipeline else "single run"
    nav = "".join(f'<a href="#{anchor(s.name)}">{html.escape(s.name)}</a>' for s in src.stages)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(src.title)}: posttrain report</title><style>{CSS}</style>"
        f"</head><body><main><h1>{html.escape(src.title)}</h1>"
        f'<div class="sub">posttrain report · {what} · '
        f"<code>{html.escape(str(src.root.resolve()))}</code></div>"
        f"<section><h2>Stages</h2><nav>{nav}</nav><p></p>{_html_table(src.stages)}</section>"
        + "".join(_html_section(s) for s in sections)
        + "</main></body></html>\n")


# ---- markdown -----------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def render_markdown(src: Source, sections: list[StageSection], root: Path) -> str:
    lines = [f"# {src.title}", "", markdown_table(src.stages), ""]
    for sec in sections:
        s = sec.stage
        lines += [f"## {s.name} ({s.kind})", "", f"Status: {s.status}.", ""]
        for p in sec.plots:
            lines += [f"![{p.title}]({p.path.relative_to(root).as_posix()})", "",
                      f"*{p.caption}*", ""]
        if sec.samples:
            lines += [f"Sample completions ({len(sec.samples)} of {sec.samples_total}):", "",
                      "| prompt | response | verdict |", "|---|---|---|"]
            lines += [f"| {_md_cell(_text(r.get('prompt', '')))} | "
                      f"{_md_cell(_text(r.get('response', '')))} | {_md_cell(_extras(r))} |"
                      for r in sec.samples]
            lines.append("")
        if sec.config is not None:
            lines += ["<details><summary>config.yaml</summary>", "", "```yaml",
                      sec.config.rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)
