"""Run reports on synthetic run directories: files, valid non-blank plots, the summary's
width, the stage.json / pipeline.json schema, the CLI."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from posttrain.cli import main
from posttrain.report import (
    NotARunError,
    build_report,
    load_source,
    print_summary,
    write_report,
)
from posttrain.report.instruments import read_rows, sketch
from posttrain.report.stages import fmt

STEPS = 12


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(run: Path, cls: str, extra: str = "") -> None:
    (run / "config.yaml").write_text(f"# Resolved {cls}, exactly as run.\nmodel: tiny:nano\n"
                                     f"lr: 0.001\n{extra}")


def make_grpo_run(run: Path) -> Path:
    """Metrics, advantages and samples as a GRPO run writes them."""
    run.mkdir(parents=True)
    _config(run, "GRPOConfig")
    rows = [{"step": 0, "time": 0.0, "data/rows": 64}]
    adv = []
    for s in range(1, STEPS + 1):
        acc = s / (STEPS + 2)
        rows.append({"step": s, "time": 2.0 * s, "train/loss": 0.1 * math.sin(s),
                     "reward/mean": acc, "reward/accuracy": acc, "grpo/entropy": 2 - 0.1 * s,
                     "grpo/kl": 0.01 * s, "grpo/zero_std_frac": 1 - acc,
                     "completions/mean_length": 20 + s, "completions/max_length": 32,
                     **({"eval/accuracy": acc} if s % 4 == 0 else {})})
        values = np.random.default_rng(s).normal(0, 1, 64) * (np.arange(64) % 3 > 0)
        adv.append({"step": s, "kind": "advantages", "n": 64, "adv": sketch(values.tolist())})
    _jsonl(run / "metrics.jsonl", rows)
    _jsonl(run / "instruments.jsonl", adv)
    _jsonl(run / "samples.jsonl", [{"prompt": f"What is {i}+1?", "response": f"<b>{i + 1}</b>",
                                    "correct": True, "reward": 1.0} for i in range(12)])
    (run / "final").mkdir()
    return run


def make_dpo_run(run: Path) -> Path:
    run.mkdir(parents=True)
    _config(run, "DPOConfig", "loss: dpo\nbeta: 0.1\n")
    rows = [{"step": 0, "time": 0.0, "data/pairs": 96}]
    for s in range(1, STEPS + 1):
        rows.append({"step": s, "time": 1.0 * s, "train/loss": 0.69 / s, "dpo/margin": 0.3 * s,
                     "dpo/saturated_frac": s / 20, "dpo/misordered_frac": 0.5 / s,
                     "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
                     "rewards/margins": 0.2 * s, "rewards/accuracies": 1 - 0.5 / s,
                     "logps/chosen": -50 + s, "logps/rejected": -50 - s})
    rows[-1].update({"eval/logps_accuracy": 0.8, "eval/logps_margin": 3.2})
    _jsonl(run / "metrics.jsonl", rows)
    margins = np.random.default_rng(0).normal(2.5, 2.0, 128).tolist()
    _jsonl(run / "instruments.jsonl", [{"step": STEPS, "kind": "margins", "loss": "dpo",
                                        "split": "train", "n": 128, "margins": sketch(margins)}])
    (run / "final").mkdir()
    return run


def make_pipeline(root: Path) -> Path:
    """A pipeline directory as the runner writes it: pipeline.json + stage.json per stage."""
    root.mkdir(parents=True)
    runs = {"sft": None, "dpo": make_dpo_run(root / "dpo"), "grpo": make_grpo_run(root / "grpo")}
    (root / "sft").mkdir()
    _config(root / "sft", "SFTConfig")
    _jsonl(root / "sft" / "metrics.jsonl", [{"step": s, "time": s, "train/loss": 3 / s,
                                             "sft/token_accuracy": 0.1 * s} for s in (1, 2, 3)])
    summaries = {
        "sft": ("sft", "done", 61.0, {"format_rate": 0.97, "eval/accuracy": 0.31}),
        "dpo": ("dpo", "cached", 20.5, {"refusal_rate": 0.95, "over_refusal_rate": 0.04,
                                        "kl_to_sft": 2.04}),
        "grpo": ("grpo", "done", 3725.0, {"eval/accuracy": 0.672, "completions/mean_length":
                                          31.25, "grpo/zero_std_frac": 0.4}),
    }
    for name in runs:
        kind, status, seconds, metrics = summaries[name]
        (root / name / "stage.json").write_text(json.dumps(
            {"name": name, "kind": kind, "status": status, "seconds": seconds,
             "metrics": metrics}))
    (root / "pipeline.json").write_text(json.dumps(
        {"name": "my pipeline", "stages": ["sft", "dpo", "grpo", "eval"]}))
    return root


def assert_png_ok(path: Path) -> None:
    """A valid PNG that shows something: not one flat colour, and ink on > 1% of it."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        px = np.asarray(im.convert("L"), dtype=float)
    assert px.shape[0] > 100 and px.shape[1] > 100, path
    assert px.var() > 50, f"{path} is blank (pixel variance {px.var():.1f})"
    assert (px < 200).mean() > 0.01, f"{path} has almost no ink"


def test_single_grpo_run_report(tmp_path: Path) -> None:
    run = make_grpo_run(tmp_path / "grpo")
    out = build_report(run)
    assert out == run / "report.html" and (run / "report.md").exists()
    pngs = sorted(p.stem for p in (run / "plots").glob("*.png"))
    assert pngs == ["accuracy", "entropy", "instrument-5-2-advantages",
                    "instrument-5-2-zero-spread", "kl", "length", "loss", "reward"]
    for p in (run / "plots").glob("*.png"):
        assert_png_ok(p)
    page = out.read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r"""(src|href)=["']?(https?:)?//|url\(""", page), "a network fetch"
    assert "&lt;b&gt;3&lt;/b&gt;" in page and "<b>3</b>" not in page  # samples escaped
    assert "Sample completions (8 of 12)" in page and "correct=True" in page
    assert "<details><summary>config.yaml" in page and "lr: 0.001" in page
    md = (run / "report.md").read_text()
    assert "![INSTRUMENT 5.2: advantages](plots/instrument-5-2-advantages.png)" in md
    src = load_source(run)
    assert not src.pipeline and src.stages[0].kind == "grpo"
    assert src.stages[0].metrics["eval/accuracy"] == pytest.approx(12 / 14)  # last eval value
    assert src.stages[0].seconds == 2.0 * STEPS


def test_dpo_run_report_has_instrument_5_1(tmp_path: Path) -> None:
    run = make_dpo_run(tmp_path / "dpo")
    build_report(run)
    pngs = {p.stem for p in (run / "plots").glob("*.png")}
    assert {"instrument-5-1-margins", "instrument-5-1-fractions", "implicit-reward",
            "logps", "loss", "accuracy"} <= pngs
    assert not any(p.startswith("instrument-5-2") for p in pngs)
    for p in (run / "plots").glob("*.png"):
        assert_png_ok(p)
    assert load_source(run).stages[0].kind == "dpo"


def test_pipeline_report_schema_and_order(tmp_path: Path) -> None:
    root = make_pipeline(tmp_path / "pipe")
    build_report(root)
    src = load_source(root)
    assert src.title == "my pipeline" and src.pipeline
    assert [(s.name, s.kind, s.status) for s in src.stages] == [
        ("sft", "sft", "done"), ("dpo", "dpo", "cached"), ("grpo", "grpo", "done"),
        ("eval", "run", "pending")]
    assert src.stages[1].metrics == {"refusal_rate": 0.95, "over_refusal_rate": 0.04,
                                     "kl_to_sft": 2.04}
    pngs = {p.name for p in (root / "plots").glob("*.png")}
    assert {"sft-loss.png", "dpo-instrument-5-1-margins.png",
            "grpo-instrument-5-2-advantages.png"} <= pngs
    for p in (root / "plots").glob("*.png"):
        assert_png_ok(p)
    page = (root / "report.html").read_text()
    # the stage table: stages are columns (one header cell each), metrics are rows
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", page).group(1)
    assert re.findall(r'href="#stage-(\w+)"', header) == ["sft", "dpo", "grpo", "eval"]
    assert "<tr><th>refusal_rate</th><td></td><td>95%</td><td></td><td></td></tr>" in page
    assert "1h02m" in page  # grpo's 3725 s


def test_summary_fits_100_columns(tmp_path: Path) -> None:
    root = make_pipeline(tmp_path / "pipe")
    buf = io.StringIO()
    print_summary(root, console=Console(file=buf, width=200, color_system=None))
    lines = buf.getvalue().splitlines()
    assert max(len(ln) for ln in lines) <= 100
    text = buf.getvalue()
    for cell in ("95%", "4%", "2.04", "67.2%", "31.2", "1h02m", "pending", "cached"):
        assert cell in text, cell
    assert "…" not in text  # nothing cut


def test_summary_splits_many_stages_into_tables_that_fit() -> None:
    stages = [{"name": f"round_{i}_dpo", "metrics": {"eval/logps_accuracy": 0.5 + i / 40,
                                                     "rewards/margins": 1234.5 * i}}
              for i in range(14)]
    buf = io.StringIO()
    print_summary(stages, "rounds", Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 100
    assert all(f"round_{i}_dpo" in text for i in range(14))
    assert text.count("eval/logps_accuracy") >= 2  # split over several tables
    assert "…" not in text


@pytest.mark.parametrize(("key", "value", "want"), [
    ("eval/accuracy", 0.998, "99.8%"), ("format_rate", 1.0, "100%"),
    ("grpo/zero_std_frac", 0.0, "0%"), ("kl_to_sft", 16.74, "16.7"),
    ("train/loss", 0.000012, "1.2e-05"), ("perf/tokens", 123456, "123k"),
    ("steps", 3, "3"), ("rm_score", 2.871, "2.87"), ("ok", True, "yes"), ("x", None, ""),
])
def test_cells_are_short(key: str, value: object, want: str) -> None:
    assert fmt(key, value) == want


def test_not_a_run_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotARunError):
        build_report(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is not a run directory" in err and "\n" not in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_cli_report_prints_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_dpo_run(tmp_path / "dpo")
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(run / "report.html")
    assert main(["report", "--quiet", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")


def test_rebuild_drops_stale_plots_and_survives_a_torn_line(tmp_path: Path) -> None:
    run = make_grpo_run(tmp_path / "grpo")
    (run / "plots").mkdir()
    (run / "plots" / "gone.png").write_bytes(b"old")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "train/lo')  # killed mid-write
    build_report(run)
    assert not (run / "plots" / "gone.png").exists()
    assert (run / "plots" / "loss.png").exists()


def test_pipeline_without_pipeline_json_uses_its_run_subdirectories(tmp_path: Path) -> None:
    make_dpo_run(tmp_path / "p" / "a")
    make_grpo_run(tmp_path / "p" / "b")
    src = load_source(tmp_path / "p")
    assert src.pipeline and {s.name for s in src.stages} == {"a", "b"}


def test_sketch_keeps_the_distribution() -> None:
    xs = list(range(1000))
    s = sketch(xs, k=11)
    assert s == [0, 100, 200, 300, 400, 500, 599, 699, 799, 899, 999]  # min, max, spread
    assert sketch([3.0, float("nan"), 1.0]) == [1.0, 3.0]


def test_read_rows_filters_kind_and_skips_torn_lines(tmp_path: Path) -> None:
    (tmp_path / "instruments.jsonl").write_text(
        '{"step": 1, "kind": "advantages", "adv": [0]}\n{"step": 2, "kind": "margins"}\n{"st')
    assert [r["step"] for r in read_rows(tmp_path, "advantages")] == [1]
    assert read_rows(tmp_path / "nowhere", "margins") == []


def test_demo_write_report_keeps_its_files(tmp_path: Path) -> None:
    stages = [{"name": "sft", "metrics": {"format_rate": 1.0}, "model": "x"},
              {"name": "grpo", "metrics": {"format_rate": 1.0, "accuracy": 0.62}}]
    buf = io.StringIO()
    write_report(tmp_path, "posttrain demo", stages, {"Samples": "- a -> b"}, {"seconds": 3.5},
                 Console(file=buf, width=100, color_system=None))
    assert json.loads((tmp_path / "report.json").read_text())["stages"][1]["name"] == "grpo"
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# posttrain demo") and "| metric | sft | grpo |" in md
    assert "| accuracy |  | 62% |" in md and "## Samples" in md
    assert "62%" in buf.getvalue()


def test_runner_records_with_extra_keys_are_read(tmp_path: Path) -> None:
    """pipeline/record.py's files: a ``file`` instead of a ``name``, fingerprints, inputs."""
    root = tmp_path / "out"
    make_dpo_run(root / "dpo")
    (root / "pipeline.json").write_text(json.dumps(
        {"file": "configs/my-pipe.yaml", "stages": ["dpo"], "resolved": {"dpo": {"beta": 0.1}}}))
    (root / "dpo" / "stage.json").write_text(json.dumps(
        {"name": "dpo", "kind": "dpo", "status": "failed", "fingerprint": "3f2a",
         "inputs": {"sft": "9c"}, "seconds": None, "metrics": {}, "error": "boom"}))
    src = load_source(root)
    assert src.title == "my-pipe"
    [stage] = src.stages
    assert (stage.status, stage.seconds, stage.error) == ("failed", None, "boom")
    assert 'class="failed">boom</pre>' in build_report(root).read_text()
