"""Metric sinks: jsonl always, TensorBoard and W&B (offline, no network) on request, all at once;
each sink holds the same namespaced scalars."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from posttrain.algorithms.sft import SFTConfig, train_sft
from posttrain.config import load_config
from posttrain.train.metrics import read_metrics


def read_wandb_history(run_dir: Path) -> list[dict[str, float]]:
    """History rows of an offline W&B run, read from its ``.wandb`` file.

    The file is a LevelDB-style log (wandb's own format): a 7-byte header, then 32 KiB
    blocks of records ``crc32 (4) | length (2) | type (1) | payload``; type 1 = whole record,
    2/3/4 = first/middle/last fragment. Each record is a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, part, rows = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                # Keys containing "/" arrive split into ``nested_key``.
                rows.append({i.key or "/".join(i.nested_key): float(i.value_json)
                             for i in rec.history.item})
    return rows


def read_tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture()
def no_network(monkeypatch):
    # Offline mode must not need the network: point every endpoint at a closed local port.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_sft_run_reports_to_jsonl_tensorboard_and_offline_wandb(tmp_path, chat_jsonl, no_network):
    pytest.importorskip("wandb")
    cfg = load_config(SFTConfig, None, [
        "model=tiny:nano", f"data={chat_jsonl}", f"output_dir={tmp_path}", "max_steps=3",
        "batch_size=4", "max_length=96", "report_to=[jsonl,tensorboard,wandb]"])
    train_sft(cfg)
    jsonl = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in jsonl] == [1, 2, 3]
    assert all("/" in k for r in jsonl for k in r if k not in ("step", "time"))  # namespaced
    tb = read_tensorboard(tmp_path)
    wb = read_wandb_history(tmp_path)
    wb_train = [r for r in wb if "train/loss" in r]
    assert [step for step, _ in tb["train/loss"]] == [1, 2, 3]
    assert [int(r["_step"]) for r in wb_train] == [1, 2, 3]
    for row, (_, tb_loss), wb_row in zip(jsonl, tb["train/loss"], wb_train, strict=True):
        assert tb_loss == pytest.approx(row["train/loss"], rel=1e-6)
        assert wb_row["train/loss"] == pytest.approx(row["train/loss"], rel=1e-12)
        assert wb_row["sft/token_accuracy"] == pytest.approx(row["sft/token_accuracy"])


def test_jsonl_is_always_written(tmp_path, chat_jsonl):
    cfg = load_config(SFTConfig, None, [
        "model=tiny:nano", f"data={chat_jsonl}", f"output_dir={tmp_path}", "max_steps=1",
        "batch_size=4", "max_length=96", "report_to=[tensorboard]"])
    train_sft(cfg)
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == 1
    assert not (tmp_path / "wandb").exists()
