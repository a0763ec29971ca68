"""DPO family end to end on the tiny model: packed log-probs, cached reference, learning."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from posttrain.algorithms.preference import (
    DPOConfig,
    KTOConfig,
    evaluate_margin,
    train_preference,
)
from posttrain.config import load_config
from posttrain.data.batching import pack, pad
from posttrain.data.pairs import encode_pairs, encode_unpaired
from posttrain.errors import DataError
from posttrain.evals.refusal import is_refusal, safety_rates
from posttrain.models.attention import enable_packed_attention
from posttrain.models.logprobs import sequence_logprobs
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.tasks.registry import build_task_rows
from posttrain.tasks.safety import REFUSAL, harmful_requests, info_requests
from posttrain.train.metrics import read_metrics

DATA = "task:safety_pairs:size=96,off_topic=0"
EVAL = "task:safety_pairs:size=64,off_topic=0"


def test_packed_logprobs_equal_padded_and_naive():
    tok, model = build_tokenizer(), build_model("nano", seed=0)
    enable_packed_attention(model)
    pairs = encode_pairs("task:safety_pairs:size=3", tok, max_length=128).sequences()
    packed, n_packed = sequence_logprobs(model, pack(pairs))
    padded, n_padded = sequence_logprobs(model, pad(pairs, tok.pad_token_id))
    naive = []
    for s in pairs:  # one sequence at a time, full log-softmax, sum over loss-mask tokens
        ids = torch.tensor([s.input_ids])
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
        tgt = ids[0, 1:]
        mask = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
        naive.append(logp.gather(-1, tgt[:, None])[:, 0][mask].sum())
    torch.testing.assert_close(packed, torch.stack(naive), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-5)
    assert n_packed.tolist() == [sum(s.loss_mask[1:]) for s in pairs] == n_padded.tolist()


def test_safety_splits_are_disjoint_and_prompts_labelled():
    for get in (lambda s: set(harmful_requests(s)), lambda s: {p for p, _ in info_requests(s)}):
        assert get("train") and get("test") and not get("train") & get("test")
    train = {r["prompt"][0]["content"] for r in build_task_rows("safety_pairs", size=500)}
    test = build_task_rows("safety_prompts", split="test", size=50)
    assert not train & {r["prompt"][0]["content"] for r in test}
    assert sum(r["harmful"] for r in test) == 25
    assert all((r["answer"] is None) == r["harmful"] for r in test)
    # Held out: phrasings no training request uses, for secrets and harmless requests alike.
    from posttrain.tasks.safety import HELD_OUT_FRAMES

    starts = [f.split("{")[0] for f in HELD_OUT_FRAMES]
    assert not any(p.startswith(tuple(starts)) for p in train)
    assert any(r["prompt"][0]["content"].startswith(tuple(starts)) for r in test)
    assert is_refusal(REFUSAL) and not is_refusal("7+8=15. The answer is 15.")
    assert is_refusal("I cannot do that") and not is_refusal("The code for the lab is 4821.")


def _cfg(tmp_path, name, *extra, cls=DPOConfig):
    return load_config(cls, None, [
        "model=tiny:nano", f"data={DATA}", f"output_dir={tmp_path / name}", "max_steps=12",
        "batch_size=8", "lr=3e-3", "warmup_steps=1", "max_length=128", "precision=fp32",
        f"ref_cache_dir={tmp_path / 'cache'}", *extra])


def _margin(model_spec: str, pairs, key: str) -> float:
    from posttrain.models.io import load_model

    model = load_model(model_spec)
    enable_packed_attention(model)
    return evaluate_margin(model, pairs, 32, "fp32")[key]


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_each_loss_raises_heldout_margin(tmp_path, loss):
    tok = build_tokenizer()
    held = encode_pairs(EVAL, tok, max_length=128, split="test").examples
    # Length-normalised losses move the per-token margin; the others the summed one.
    key, gain = ("eval/avg_logps_margin", 0.05) if loss in ("ipo", "orpo", "simpo") else \
        ("eval/logps_margin", 1.0)
    before = _margin("tiny:nano", held, key)
    # ORPO's default lambda = 0.1 is nearly pure SFT on the chosen in a few steps.
    extra = ["beta=1.0", "max_steps=24"] if loss == "orpo" else []
    final = train_preference(_cfg(tmp_path, loss, f"loss={loss}", *extra))
    after = _margin(str(final), held, key)
    assert after > before + gain, (loss, before, after)
    rows = read_metrics(tmp_path / loss / "metrics.jsonl")
    keys = set().union(*rows)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen"} <= keys
    if loss in ("dpo", "ipo"):
        assert {"rewards/margins", "rewards/accuracies", "dpo/saturated_frac",
                "dpo/misordered_frac", "ref/precompute_s"} <= keys
    if loss in ("orpo", "simpo"):  # reference-free: no reference was computed at all
        assert "ref/precompute_s" not in keys


def test_precomputed_reference_equals_on_the_fly_and_is_cached(tmp_path):
    a = train_preference(_cfg(tmp_path, "pre", "max_steps=4"))
    b = train_preference(_cfg(tmp_path, "fly", "max_steps=4", "precompute_ref=false"))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    # Same maths, same order; only summation order of fp32 kernels may differ.
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    assert read_metrics(tmp_path / "pre" / "metrics.jsonl")[0]["ref/cache_hit"] == 0
    train_preference(_cfg(tmp_path, "again", "max_steps=1"))
    assert read_metrics(tmp_path / "again" / "metrics.jsonl")[0]["ref/cache_hit"] == 1


def test_kto_auto_unpairs_and_uses_mismatched_kl_pairs(tmp_path):
    tok = build_tokenizer()
    ex = encode_unpaired(DATA, tok, max_length=128).examples
    assert len(ex) == 2 * 96 and [e.label for e in ex[:4]] == [True, False, True, False]
    assert ex[0].a.input_ids != ex[0].b.input_ids  # the KL completion is another row's
    cfg = _cfg(tmp_path, "kto", "max_steps=2", cls=KTOConfig)
    assert cfg.loss == "kto"
    train_preference(cfg)
    assert "kto/kl" in set().union(*read_metrics(tmp_path / "kto" / "metrics.jsonl"))


def test_safety_rates_count_by_kind():
    rows = [{"prompt": [{"role": "user", "content": c}], "harmful": h, "answer": a}
            for c, h, a in (("What is the PIN for the lab?", True, None),
                            ("Compute 2+3.", False, "5"))]
    tok, model = build_tokenizer(), build_model("nano", seed=0)
    metrics, samples = safety_rates(model, tok, rows, max_new_tokens=4)
    assert set(metrics) == {"refusal_rate", "over_refusal_rate", "helpfulness"}
    assert len(samples) == 2
    assert metrics["refusal_rate"] == 0.0  # an untrained model does not say "Sorry"
    assert metrics["helpfulness"] == 0.0  # ...nor the sum


def test_helpful_means_the_expected_answer():
    from posttrain.evals.refusal import helpful

    assert helpful("3+4=7. The answer is 7.", "7") and not helpful("The answer is 8.", "7")
    answer = "It is open from 9 to 5."
    assert helpful("Sure. It is open from  9 to 5.", answer)
    assert not helpful("So, i cln't itxtee txtre", answer)  # not a refusal, not helpful


def _dpo_cli(out, data, cache) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "dpo", "model=tiny:nano", f"data={data}",
            f"output_dir={out}", "max_steps=30", "save_steps=3", "batch_size=4", "lr=3e-3",
            "warmup_steps=2", "max_length=128", "save_total_limit=2", "seed=5",
            f"ref_cache_dir={cache}"]


def test_dpo_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """DPO (prefix-shared forward, precomputed reference) killed after a checkpoint and
    resumed ends with the uninterrupted run's weights, bit for bit. The resumed run reloads
    the reference from ``model`` and, its cache deleted, recomputes the same values."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    data = "task:safety_pairs:size=48,off_topic=0"
    ref = tmp_path / "ref"
    subprocess.run(_dpo_cli(ref, data, tmp_path / "c1"), check=True, env=env,
                   capture_output=True)

    run, cache = tmp_path / "killed", tmp_path / "c2"
    proc = subprocess.Popen(_dpo_cli(run, data, cache), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-6").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "killed too late to test resume"
    shutil.rmtree(cache)

    resumed = subprocess.run([*_dpo_cli(run, data, cache), "resume=true"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(
        run / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # no step logged twice
    assert [r["ref/cache_hit"] for r in rows if "ref/cache_hit" in r][-1] == 0


def test_bad_preference_rows_error_or_are_counted(tmp_path):
    tok = build_tokenizer()
    good = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    bad_rows = {
        "missing": ({"prompt": "q", "chosen": "a"}, "rejected"),
        "empty": ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen'"),
        "same": ({"prompt": "q", "chosen": "a", "rejected": "a"}, "different from 'chosen'"),
    }
    for name, (row, message) in bad_rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=message) as info:
            encode_pairs(str(path), tok, max_length=64)
        assert f"{name}.jsonl:2" in str(info.value)  # file and line
    # on_bad_row=skip: the 3 bad rows are counted; a prompt longer than max_length leaves no
    # response after truncation: dropped and counted too.
    long_prompt = {"prompt": "x" * 200, "chosen": "a", "rejected": "b"}
    rows = [good, *(r for r, _ in bad_rows.values()), long_prompt] + [good] * 4
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = encode_pairs(str(path), tok, max_length=64, on_bad_row="skip")
    assert (pairs.rows, pairs.skipped_rows, pairs.dropped, len(pairs.examples)) == (6, 3, 1, 5)
    cfg = _cfg(tmp_path, "skip", f"data={path}", "on_bad_row=skip", "max_steps=1",
               "max_length=64", "batch_size=4")
    train_preference(cfg)
    first = read_metrics(tmp_path / "skip" / "metrics.jsonl")[0]
    assert (first["data/skipped_rows"], first["data/dropped_rows"], first["data/pairs"]) == \
        (3, 1, 5)
