"""FSDP2 (strategy=fsdp2): 2 processes (torchrun, gloo) == 1 process with the same global batch,
sharded checkpoints that resume on another world size and after a SIGKILL, and a rank that
dies or stalls ends the run instead of hanging it.

Tolerances: a 2-rank run sums each gradient in two halves (each rank's micro-batch, then the
reduce-scatter) where one process sums it in one pass, and the cores' thread count may change
between steps (train/threads.py), so fp32 results agree to rounding, not bit for bit: losses to
rel 1e-4 and weights to atol 1e-5 after a few steps at lr 3e-3 (tests/test_distributed.py's
bounds for DDP). A wrong normaliser or a duplicated batch is off by far more (factors of 2).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.train.metrics import read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMON = ["model=tiny:nano", "lr=3e-3", "precision=fp32", "grad_accum=2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, args: list[str], **env: str) -> list[str]:
    cli = ["-m", "posttrain.cli", *args]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_port()), *cli]


def run(nproc: int, args: list[str], timeout: float = 240,
        **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_launch(nproc, args), env={**ENV, **env}, capture_output=True,
                          text=True, timeout=timeout)


def ok(nproc: int, args: list[str]) -> None:
    out = run(nproc, args)
    assert out.returncode == 0, out.stderr[-3000:]


def sft(out: Path, data: Path, nproc: int, *extra: str) -> list[str]:
    """The same global batch (4 sequences x 2 micro-batches) on any number of processes."""
    return ["sft", *COMMON, f"data={data}", f"output_dir={out}", "max_steps=4", "save_steps=2",
            f"batch_size={4 // nproc}", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl")
            if "train/loss" in r}


def assert_same_weights(a_dir: Path, b_dir: Path, name: str = "model.safetensors",
                        atol: float = 1e-5) -> None:
    a, b = load_file(a_dir / "final" / name), load_file(b_dir / "final" / name)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4)


# ---- no processes --------------------------------------------------------------------------


def test_decoder_layers_are_found_through_lora(nano_dir):
    from posttrain.models.io import load_model
    from posttrain.models.lora import LoraConfig, apply_lora
    from posttrain.train.fsdp import decoder_layers

    model = load_model(str(nano_dir))
    n = model.config.num_hidden_layers
    assert len(decoder_layers(model)) == n
    assert len(decoder_layers(apply_lora(model, LoraConfig(r=2)))) == n


# ---- two processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """One process (ddp) and two (fsdp2) of the same SFT run, shared by the tests below."""
    from posttrain.tasks.registry import build_task_rows
    from tests.conftest import write_jsonl

    root = tmp_path_factory.mktemp("fsdp_sft")
    data = write_jsonl(root / "chat.jsonl", build_task_rows("chat", size=64, seed=1))
    ok(1, sft(root / "one", data, 1))
    ok(2, sft(root / "two", data, 2, "strategy=fsdp2", "hf_checkpoints=true"))
    return root, data


@pytest.mark.slow
def test_one_process_fsdp2_equals_plain_training(sft_runs, tmp_path):
    """fsdp2 also runs without torchrun (a one-rank process group): same steps as ddp."""
    root, data = sft_runs
    ok(1, sft(tmp_path / "fsdp", data, 1, "strategy=fsdp2"))
    assert losses(root / "one") == pytest.approx(losses(tmp_path / "fsdp"), rel=1e-5)
    assert_same_weights(root / "one", tmp_path / "fsdp")
    step2 = tmp_path / "fsdp" / "checkpoints" / "step-2"
    assert (step2 / "sharded" / ".metadata").is_file() and not (step2 / "model").exists()


@pytest.mark.slow
def test_ddp_checkpoint_resumes_under_fsdp2_on_two_processes(sft_runs, tmp_path):
    """A replica's checkpoint (HF weights + one optimizer state) continued by 2 sharded
    ranks: each takes its shard of the AdamW moments, and the run ends as the DDP one."""
    root, data = sft_runs
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(root / "one" / "checkpoints", resumed / "checkpoints")
    ok(2, sft(resumed, data, 2, "strategy=fsdp2", "resume=true"))
    assert sorted(losses(resumed)) == [3, 4]
    assert losses(resumed)[4] == pytest.approx(losses(root / "one")[4], rel=1e-4)
    assert_same_weights(root / "one", resumed)


@pytest.mark.slow
def test_two_process_fsdp2_sft_equals_one(sft_runs):
    root, _ = sft_runs
    assert losses(root / "one") == pytest.approx(losses(root / "two"), rel=1e-4)
    assert_same_weights(root / "one", root / "two")
    step2 = root / "two" / "checkpoints" / "step-2"
    shards = sorted(p.name for p in (step2 / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(root / "two" / "final")  # one plain HF directory
    AutoModelForCausalLM.from_pretrained(step2 / "model")  # hf_checkpoints=true


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sharded_checkpoint_resumes_on_any_world_size(sft_runs, tmp_path, nproc):
    """The 2-rank run's step-2 checkpoint, resumed on 1 and on 2 processes: the next step's
    loss and the final weights are the uninterrupted run's."""
    root, data = sft_runs
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(root / "two" / "checkpoints", resumed / "checkpoints")
    ok(nproc, sft(resumed, data, nproc, "strategy=fsdp2", "resume=true"))
    got, want = losses(resumed), losses(root / "one")
    assert min(got) == 3  # resumed after step 2: no step trained twice
    assert got[3] == pytest.approx(want[3], rel=1e-4)
    assert got[4] == pytest.approx(want[4], rel=1e-4)
    assert_same_weights(root / "one", resumed)


@pytest.mark.slow
def test_sigkilled_fsdp2_run_resumes_exactly(sft_runs, tmp_path):
    """SIGKILL the whole 2-rank run (torchrun and its workers) once a checkpoint exists, at
    whatever point it has reached; resume: the final weights are the uninterrupted run's."""
    root, data = sft_runs
    run_dir = tmp_path / "killed"
    args = sft(run_dir, data, 2, "strategy=fsdp2", "save_steps=1")
    proc = subprocess.Popen(_launch(2, args), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "step-1").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists(), "killed too late: the run had finished"
    ok(2, [*args, "resume=true"])
    assert_same_weights(root / "two", run_dir)
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]  # each step logged once


DPO = ["dpo", *COMMON, "data=task:safety_pairs:size=32,off_topic=0", "max_steps=3"]


@pytest.fixture(scope="module")
def dpo_one(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_dpo")
    ok(1, [*DPO, f"output_dir={root / 'one'}", "batch_size=4", f"ref_cache_dir={root}"])
    return root / "one"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_dpo_equals_one(dpo_one, tmp_path, strategy):
    """Each rank takes its half of every batch of pairs (the reference log-probs are
    precomputed on each rank for all pairs)."""
    ok(2, [*DPO, f"output_dir={tmp_path / 'two'}", "batch_size=2", f"strategy={strategy}",
           f"ref_cache_dir={tmp_path}"])
    assert losses(dpo_one) == pytest.approx(losses(tmp_path / "two"), rel=1e-4)
    assert_same_weights(dpo_one, tmp_path / "two")


RM = ["rm", *COMMON, "data=task:safety_pairs:size=32,off_topic=0", "max_steps=3"]


@pytest.fixture(scope="module")
def rm_one(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_rm")
    ok(1, [*RM, f"output_dir={root / 'one'}", "batch_size=4"])
    return root / "one"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_reward_model_equals_one(rm_one, tmp_path, strategy):
    """The reward model runs its body, then its score head on the last tokens (not the
    model's own forward): that body call runs DDP's or FSDP2's forward hooks (without them
    DDP would not sync the gradients, and FSDP2 would meet sharded embeddings)."""
    ok(2, [*RM, f"output_dir={tmp_path / 'two'}", "batch_size=2", f"strategy={strategy}"])
    assert losses(rm_one) == pytest.approx(losses(tmp_path / "two"), rel=1e-4)
    # AdamW divides each update by its gradient's running RMS, so an element whose gradient
    # is almost zero (an embedding row seen once) turns rounding into up to ~lr/100 of
    # weight: 1e-4 here, against 3e-3 per step for a wrong batch.
    assert_same_weights(rm_one, tmp_path / "two", atol=1e-4)


@pytest.mark.slow
def test_two_process_fsdp2_grpo_trains_whole_groups_and_resumes_on_one(tmp_path):
    """Each rank samples, rewards and trains its own whole groups (its sampling seed differs,
    so the completions, unlike SFT's and DPO's batches, are not those of one process: the
    update itself is the engine's, checked above). Every group of a step is trained on one
    rank or another, the export is one HF directory, and the sharded checkpoint resumes on
    one process."""
    args = ["grpo", "model=tiny:nano", "data=task:arithmetic:size=64", "max_steps=3",
            "prompts_per_step=4", "num_generations=4", "max_new_tokens=8", "lr=3e-3",
            "rewards=[tests.test_fsdp:digit_frac]", "precision=fp32", "save_steps=2",
            "batch_size=4", "strategy=fsdp2"]  # one group per micro-batch
    ok(2, [*args, f"output_dir={tmp_path / 'two'}"])
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "train/loss" in r]
    # Both ranks' groups with reward spread are trained (zero-spread ones are skipped, so a
    # rank may have fewer micro-batches than the other: it pads, or FSDP2 would hang).
    trained = [r["grpo/groups_trained"] for r in rows]
    assert trained == [4 - round(4 * r["grpo/zero_std_frac"]) for r in rows]
    assert len(set(trained)) > 1 and min(trained) > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoints", resumed / "checkpoints")
    ok(1, [*args, f"output_dir={resumed}", "resume=true"])
    assert sorted(losses(resumed)) == [3]


REPLAY = '''
import sys
from posttrain.algorithms.grpo import GRPOConfig, setup_grpo
from posttrain.algorithms.ppo import PPOConfig, setup_ppo
from posttrain.config import load_config
from posttrain.rollout import Rollouts
from posttrain.train import online


class Replay:
    """Completions that depend only on the prompt and the sample's index in its group; a
    prompt of even token sum gets the same completion n times (a zero-spread group)."""

    def generate(self, prompts, n, sampling):
        idx = lambda p, j: j if sum(p) % 2 else 0  # noqa: E731
        comps = [[(sum(p) * 7 + 13 * idx(p, j) + k * 5) % 200 + 30
                  for k in range(2 + (sum(p) + idx(p, j)) % 5)]
                 for p in prompts for j in range(n)]
        return Rollouts([list(p) for p in prompts], comps, [[0.0] * len(c) for c in comps],
                        ["stop"] * len(comps), n)


kind, args = sys.argv[1], sys.argv[2:]
config, setup = {"grpo": (GRPOConfig, setup_grpo), "ppo": (PPOConfig, setup_ppo)}[kind]
run, recipe = setup(load_config(config, None, args))
recipe.generator = Replay()
online.run_online(recipe.engine, recipe, recipe.cursor, run.held_out, run.resume_from)
'''


GRPO_REPLAY = ["grpo", "model=tiny:nano", "data=task:arithmetic:size=64", "max_steps=4",
               "prompts_per_step=4", "num_generations=4", "max_new_tokens=8", "lr=3e-3",
               "rewards=[tests.test_fsdp:text_length]", "precision=fp32", "batch_size=4"]

# 8 completions a step in 2 minibatches of 4, 2 epochs, at most 2 per forward: a rank holds
# 0 to 4 of a minibatch's completions, so ranks pad; the KL controller moves beta.
PPO_REPLAY = ["ppo", "model=tiny:nano", "data=task:arithmetic:size=64", "max_steps=3",
              "prompts_per_step=4", "num_generations=2", "mini_batch_size=4", "batch_size=2",
              "ppo_epochs=2", "max_new_tokens=8", "lr=3e-3", "value_lr=3e-3",
              "value_model=policy", "kl_target=0.01", "kl_horizon=20",
              "rewards=[tests.test_fsdp:text_length]", "precision=fp32"]


def replay(tmp_path: Path, out: str, nproc: int, *extra: str, args: list[str] = GRPO_REPLAY
           ) -> list[dict]:
    script = tmp_path / "replay.py"
    script.write_text(REPLAY)
    cmd = [sys.executable, str(script)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port()), str(script)]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*cmd, *args, *extra, f"output_dir={tmp_path / out}"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(tmp_path / out / "metrics.jsonl")


@pytest.fixture(scope="module")
def grpo_one(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_grpo")
    return root, replay(root, "one", 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_grpo_update_equals_one_on_the_same_rollouts(grpo_one, tmp_path, strategy):
    """The GRPO recipe (rank shares, rewards, advantages, zero-spread skipping, padding,
    the update, reduced metrics) with the sampler replaced by one whose completions depend
    only on the prompt: 2 ranks == 1 process with the same global batch."""
    root, one = grpo_one
    two = replay(tmp_path, "two", 2, f"strategy={strategy}")
    for key in ("train/loss", "grpo/groups_trained", "reward/mean"):
        a = [r[key] for r in one if key in r]
        assert a and a == pytest.approx([r[key] for r in two if key in r], rel=1e-4, abs=1e-6)
    trained = [r["grpo/groups_trained"] for r in one if "train/loss" in r]
    assert any(0 < t < 4 for t in trained)  # zero-spread groups skipped: a rank pads
    assert_same_weights(root / "one", tmp_path / "two")


@pytest.fixture(scope="module")
def ppo_one(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_ppo")
    return root, replay(root, "one", 1, args=PPO_REPLAY)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_ppo_equals_one_on_the_same_rollouts(ppo_one, tmp_path, strategy):
    """PPO across ranks (rank shares, scores, values, advantages whitened over the whole step,
    shared minibatch permutation with padding, the policy and value updates, the KL
    controller on the step's mean KL) with replayed completions: 2 ranks == 1 process."""
    root, one = ppo_one
    two = replay(tmp_path, "two", 2, f"strategy={strategy}", "save_steps=2", args=PPO_REPLAY)
    for key in ("train/loss", "ppo/value_loss", "objective/kl", "objective/beta",
                "advantages/mean", "reward/mean"):
        a = [r[key] for r in one if key in r]
        assert a and a == pytest.approx([r[key] for r in two if key in r], rel=1e-4, abs=1e-6)
    betas = [r["objective/beta"] for r in one if "objective/beta" in r]
    assert len(set(betas)) > 1  # the controller moved: its input is the whole step's KL
    assert_same_weights(root / "one", tmp_path / "two")
    assert_same_weights(root / "one", tmp_path / "two", name="value/model.safetensors")
    # The step-2 checkpoint (both models, optimizers, KL controller, cursor) resumes on one
    # process to the uninterrupted run's last step.
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    resumed = replay(tmp_path, "resumed", 1, f"strategy={strategy}", "save_steps=2",
                     "resume=true", args=PPO_REPLAY)
    assert [r["step"] for r in resumed if "train/loss" in r] == [12]
    assert_same_weights(root / "one", tmp_path / "resumed")
    assert_same_weights(root / "one", tmp_path / "resumed", name="value/model.safetensors")


def test_each_rank_takes_whole_contiguous_groups():
    from posttrain.train.distributed import DistInfo
    from posttrain.train.online import rank_slice

    rows = [{"i": i} for i in range(8)]
    parts = [rank_slice(rows, DistInfo(rank=r, world_size=4)) for r in range(4)]
    assert [row for p in parts for row in p] == rows and all(len(p) == 2 for p in parts)


# ---- failures end the run ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "strategy"), [("exit", "ddp"), ("hang", "fsdp2")])
def test_a_dead_or_stalled_rank_ends_the_run(tmp_path, chat_jsonl, fault, strategy):
    """Rank 1 exits (as if killed) or stalls when it starts step 2: the run exits non-zero
    well within the collective timeout plus start-up, and says which rank fell behind."""
    timeout = 5
    t0 = time.monotonic()
    out = run(2, sft(tmp_path / "run", chat_jsonl, 2, f"strategy={strategy}",
                     f"dist_timeout={timeout}"), timeout=120, POSTTRAIN_FAULT=f"{fault}@1:2")
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert elapsed < 90, elapsed  # start-up (~10 s on 2 cores) + timeout + torchrun's stop
    if fault == "hang":
        assert "rank 1 at step 1 (this rank: step 2)" in out.stderr, out.stderr[-3000:]
    else:  # rank 0 sees the connection drop, or torchrun stops it: either names rank 1
        assert "rank 1" in out.stderr or "rank      : 1" in out.stderr, out.stderr[-3000:]


def digit_frac(prompts: list, completions: list, **_: object) -> list[float]:
    """A reward a random tiny model's samples spread on: the share of digits it writes."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def text_length(prompts: list, completions: list, **_: object) -> list[float]:
    """A reward the replayed completions (of 2 to 6 tokens) spread on: their length."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(t) / 10 for t in texts]


def test_ranks_on_one_node_share_one_sandbox_pool(monkeypatch):
    from posttrain.sandbox import pool

    monkeypatch.setattr(pool.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = pool.default_workers()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert alone == 32 and pool.default_workers() * 8 == alone


@pytest.mark.slow
def test_export_gathers_a_sharded_checkpoint_into_one_hf_directory(tmp_path, chat_jsonl):
    """posttrain export: the shards of step 2 == the HF copy the run wrote beside them."""
    run_dir = tmp_path / "run"
    ok(1, ["sft", *COMMON, f"data={chat_jsonl}", f"output_dir={run_dir}", "max_steps=4",
           "save_steps=2", "batch_size=2", "strategy=fsdp2", "hf_checkpoints=true"])
    step = run_dir / "checkpoints" / "step-2"
    out = run(1, ["export", str(step), str(tmp_path / "exported")])
    assert out.returncode == 0, out.stderr[-3000:]
    a = load_file(tmp_path / "exported" / "model.safetensors")
    b = load_file(step / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    again = run(1, ["export", str(run_dir), str(tmp_path / "exported")])  # not empty
    assert again.returncode == 2 and "not empty" in again.stderr
    none = run(1, ["export", str(tmp_path), str(tmp_path / "x")])
    assert none.returncode == 2 and "no checkpoint to export" in none.stderr
