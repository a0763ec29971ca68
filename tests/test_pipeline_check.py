"""Pipeline files are checked whole before anything runs: one line per problem, naming the
file, the line, the stage and the key; a valid file becomes a plan (order, resolved configs,
fingerprints). Nothing here trains."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.pipeline import PipelineError, load_plan

# A line `<sft>` in a test's YAML stands for these keys, at that line's indentation.
BLOCKS = {"<sft>": ["kind: sft", "model: tiny:nano", "data: task:chat:size=8"],
          "<dpo>": ["kind: dpo", "model: ${sft.output}", "data: task:safety_pairs:size=8"]}


def write(tmp_path: Path, body: str) -> Path:
    lines = [f"output_dir: {tmp_path / 'out'}"]
    for ln in textwrap.dedent(body).splitlines():
        indent = ln[:len(ln) - len(ln.lstrip())]
        lines += [indent + b for b in BLOCKS.get(ln.strip(), [ln.strip()])]
    path = tmp_path / "pipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def marked_line(path: Path) -> int:
    """The line the test marked with `# <-`: where the error must point."""
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "# <-" in ln)


INVALID = {
    "unknown key": ("stage 'sft', key 'lrr': unknown config key 'lrr' for SFTConfig; did you "
                    "mean 'lr'?", """
        stages:
          sft:
            <sft>
            lrr: 1e-3  # <-
        """),
    "unknown nested key": ("stage 'sft', key 'lora.rank': unknown config key 'lora.rank'", """
        stages:
          sft:
            <sft>
            lora:
              rank: 4  # <-
        """),
    "wrong type": ("stage 'sft', key 'max_steps': expected int, got 'many'", """
        stages:
          sft:
            <sft>
            max_steps: many  # <-
        """),
    "out of range": ("stage 'sft', key 'batch_size': batch_size must be >= 1, got 0", """
        stages:
          sft:
            <sft>
            batch_size: 0  # <-
        """),
    "flat alias": ("stage 'grpo', key 'max_new_tokens': expected int, got 'lots'", """
        stages:
          grpo:
            kind: grpo
            data: task:arithmetic:size=8
            max_new_tokens: lots  # <-
        """),
    "bad default": ("stage 'sft', key 'precision': expected one of 'bf16', 'fp32', got 'fp16'",
                    """
        defaults:
          precision: fp16  # <-
        stages:
          sft:
            <sft>
        """),
    "unknown kind": ("stage 'rm', key 'kind': unknown stage kind 'rmm'; did you mean 'rm'?", """
        stages:
          sft:
            <sft>
          rm:
            kind: rmm  # <-
            model: ${sft.output}
        """),
    "missing kind": ("stage 'sft': missing required key 'kind'", """
        stages:
          sft:  # <-
            model: tiny:nano
        """),
    "unknown stage": ("stage 'dpo', key 'model': ${sfft.output} refers to no stage; did you "
                      "mean 'sft'?", """
        stages:
          sft:
            <sft>
          dpo:
            kind: dpo
            model: ${sfft.output}  # <-
            data: task:safety_pairs:size=8
        """),
    "bad reference": ("stage 'dpo', key 'reward.model': bad reference '${sft.model}'", """
        stages:
          sft:
            <sft>
          dpo:
            kind: ppo
            data: task:arithmetic:size=8
            reward:
              model: ${sft.model}  # <-
        """),
    "cycle": ("stage 'a', key 'model': reference cycle: a -> b -> a", """
        stages:
          a:
            kind: sft
            model: ${b.output}  # <-
            data: task:chat:size=8
          b:
            kind: sft
            model: ${a.dir}/final
            data: task:chat:size=8
        """),
    "owned key": ("stage 'sft', key 'output_dir': set by the pipeline", """
        stages:
          sft:
            <sft>
            output_dir: elsewhere  # <-
        """),
    "missing data": ("stage 'sft', key 'data': config key 'data' is required", """
        stages:
          sft:  # <-
            kind: sft
            model: tiny:nano
        """),
    "unused default": ("key 'beta': no stage of this pipeline has this option", """
        defaults:
          beta: 0.1  # <-
        stages:
          sft:
            <sft>
        """),
    "top-level typo": ("unknown top-level key 'stage'; did you mean 'stages'?", """
        stage:  # <-
          sft:
            <sft>
        """),
    "round 1 has no previous round": ("stage 'dpo', key 'model': ${dpo.output} in round 1",
                                      """
        stages:
          sft:
            <sft>
          dpo: {kind: dpo, model: "${dpo.output}", data: "task:safety_pairs"}  # <-
        repeat: {stages: [dpo], rounds: 2}
        """),
    "duplicate key": ("duplicate key 'lr'", """
        stages:
          sft:
            <sft>
            lr: 1e-3
            lr: 1e-4  # <-
        """),
    "invalid YAML": ("invalid YAML", """
        stages:
          sft:
            <sft>
            lr: [1e-3  # <-
          x: 1
        """),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_file_gives_one_line_naming_file_line_stage_key(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected, body = INVALID[case]
    path = write(tmp_path, body)
    assert main(["pipeline", "run", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    line = marked_line(path) + (1 if case == "invalid YAML" else 0)  # YAML sees it one later
    assert any(ln.startswith(f"error: {path}:{line}: {expected}") for ln in lines), lines
    # the typo also leaves the file without stages: said on a line of its own
    assert len(lines) == 1 + (case == "top-level typo"), lines
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was created


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, """
        stages:
          sft:
            <sft>
            lrr: 1e-3
          dpo:
            <dpo>
            beta: -1
        """)
    with pytest.raises(PipelineError) as err:
        load_plan(path)
    assert [p.split(": ", 1)[1][:30] for p in err.value.problems] == [
        "stage 'sft', key 'lrr': unknow", "stage 'dpo', key 'beta': beta "]


def test_override_errors_cite_the_command_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "stages:\n  sft:\n    <sft>\n")
    assert main(["pipeline", "check", str(path), "stages.sft.max_steps=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {path} (override 'stages.sft.max_steps=abc'): stage 'sft', key "
                   "'max_steps': expected int, got 'abc'")


def test_plan_orders_stages_after_their_inputs_and_resolves_references(tmp_path: Path) -> None:
    path = write(tmp_path, """
        seed: 3
        defaults: {precision: fp32, beta: 0.3}
        stages:
          dpo:
            <dpo>
            seed: 5
          sft:
            <sft>
        """)
    plan = load_plan(path)
    assert plan.names == ["sft", "dpo"]
    out = tmp_path / "out"
    sft, dpo = plan["sft"], plan["dpo"]
    assert dpo.config["model"] == str(out / "sft" / "final") and dpo.inputs == ("sft",)
    assert dpo.config["output_dir"] == str(out / "dpo") and dpo.config["resume"] is False
    assert (sft.config["seed"], dpo.config["seed"]) == (3, 5)  # the stage's own key wins
    assert sft.config["precision"] == dpo.config["precision"] == "fp32"
    assert dpo.config["beta"] == 0.3 and "beta" not in sft.config  # only kinds that have it


def test_fingerprint_follows_the_config_and_the_inputs(tmp_path: Path) -> None:
    body = """
        stages:
          sft:
            <sft>
          dpo:
            <dpo>
          other:
            kind: rm
            model: tiny:nano
            data: task:safety_pairs:size=8
        """
    path = write(tmp_path, body)
    fps = {s.name: s.fingerprint for s in load_plan(path).stages}
    assert fps == {s.name: s.fingerprint for s in load_plan(path).stages}
    moved = {s.name: s.fingerprint for s in load_plan(path, output_dir=tmp_path / "b").stages}
    assert moved == fps  # where a pipeline lives is not what it computes
    changed = {s.name: s.fingerprint for s in load_plan(path, ["stages.sft.lr=1e-3"]).stages}
    assert changed["sft"] != fps["sft"] and changed["dpo"] != fps["dpo"]  # downstream too
    assert changed["other"] == fps["other"]
    same = {s.name: s.fingerprint for s in load_plan(path, ["stages.sft.lr=2e-4"]).stages}
    assert same == fps  # sft's default lr, written out: the same resolved config


def test_editing_a_data_file_changes_the_fingerprint(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n')
    body = f"""
        stages:
          sft:
            kind: sft
            model: tiny:nano
            data: {rows}
          dpo:
            <dpo>
        """
    path = write(tmp_path, body)
    before = {s.name: s.fingerprint for s in load_plan(path).stages}
    rows.write_text('{"text": "two"}\n')
    after = {s.name: s.fingerprint for s in load_plan(path).stages}
    assert after["sft"] != before["sft"] and after["dpo"] != before["dpo"]


def test_flat_and_grouped_keys_give_one_fingerprint(tmp_path: Path) -> None:
    def fp(keys: str) -> str:
        path = write(tmp_path, f"""
            stages:
              grpo:
                kind: grpo
                data: task:arithmetic:size=8
                {keys}
            """)
        return load_plan(path).stages[0].fingerprint

    assert fp("max_new_tokens: 12") == fp("sampling.max_new_tokens: 12") == fp(
        "sampling: {max_new_tokens: 12}")


def test_repeat_rounds_chain_each_round_to_the_previous_one(tmp_path: Path) -> None:
    path = write(tmp_path, """
        stages:
          sft:
            <sft>
          gen:
            kind: sft
            model: ${dpo.output}
            data: task:chat:size=8
          dpo:
            kind: dpo
            model: ${dpo.output}
            ref_model: ${gen.output}
            data: task:safety_pairs:size=8
          grpo:
            kind: grpo
            model: ${dpo.output}
            data: task:arithmetic:size=8
        repeat:
          stages: [gen, dpo]
          rounds: 3
          start: {dpo: sft}
        """)
    plan = load_plan(path)
    assert plan.names == ["sft", "gen@1", "dpo@1", "gen@2", "dpo@2", "gen@3", "dpo@3", "grpo"]

    def final(name: str) -> str:
        return str(tmp_path / "out" / name / "final")

    assert plan["gen@1"].config["model"] == plan["dpo@1"].config["model"] == final("sft")
    assert plan["dpo@1"].config["ref_model"] == final("gen@1")  # earlier in the same round
    assert plan["gen@3"].config["model"] == plan["dpo@3"].config["model"] == final("dpo@2")
    assert plan["grpo"].config["model"] == final("dpo@3")  # after the block: the last round
    assert load_plan(path, ["repeat.rounds=1"]).names == ["sft", "gen@1", "dpo@1", "grpo"]


def test_check_shows_what_run_would_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "stages:\n  sft:\n    <sft>\n  dpo:\n    <dpo>\n")
    assert main(["pipeline", "check", str(path), "--until", "sft"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok: {path}: 2 stages -> {tmp_path / 'out'}"
    assert out[1].split() == ["sft", "sft", "from", "-", "fresh:", "new"] and len(out) == 2
    assert not (tmp_path / "out").exists()


DOCS = Path(__file__).parents[1] / "docs" / "pipelines.md"


def _doc_block(lang: str, containing: str) -> str:
    return next(b for b in re.findall(rf"```{lang}\n(.*?)```", DOCS.read_text(), re.S)
                if containing in b)


def test_the_docs_examples_are_what_the_runner_does(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    pipe = Path("pipe.yaml")
    pipe.write_text(_doc_block("yaml", "# pipe.yaml"))
    assert load_plan(pipe).names == ["sft", "rm", "ppo", "dpo", "grpo"]
    pipe.write_text(_doc_block("yaml", "runs/iterative"))
    assert load_plan(pipe).names == ["sft", "dpo@1", "dpo@2", "dpo@3", "grpo"]
    pipe.write_text(_doc_block("yaml", "${sfft.output}"))
    with pytest.raises(PipelineError) as err:
        load_plan(pipe)
    shown = _doc_block("text", "$ posttrain pipeline run pipe.yaml").splitlines()[1:]
    assert [f"error: {p}" for p in err.value.problems] == shown


def test_a_default_without_effect_in_a_stage_is_left_out_there(tmp_path: Path) -> None:
    path = write(tmp_path, """
        defaults: {eval_steps: 5}
        stages:
          plain:
            <sft>
          evaluated:
            <sft>
            eval_data: task:chat:size=4
        """)
    cfg = {s.name: s.config for s in load_plan(path).stages}
    assert cfg["plain"]["eval_steps"] == 0 and cfg["evaluated"]["eval_steps"] == 5
    written = write(tmp_path, """
        stages:
          sft:
            <sft>
            eval_steps: 5  # <-
        """)
    with pytest.raises(PipelineError) as err:
        load_plan(written)
    assert "eval_steps" in err.value.problems[0]
