"""Supervised fine-tuning (seed §5.2, EQ 5.1), and plain causal-LM training on ``text`` rows.

    rows -> tokens with an assistant-only loss mask -> packed micro-batches
    for each step: loss = sum of target-token NLL / targets in the whole accumulated batch
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.data.batching import BatchStream, move_batch, pack, pad
from posttrain.data.encode import encode_dataset
from posttrain.errors import ConfigError
from posttrain.losses.sft import sft_loss
from posttrain.models.device import autocast_context
from posttrain.models.forward import target_logits
from posttrain.train import distributed as ddp
from posttrain.train.config import TrainConfig
from posttrain.train.loop import train_offline
from posttrain.train.policy import load_policy
from posttrain.train.run import prepare_run

SFT_FORMATS = ("messages", "prompt_completion", "text")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: NLL on assistant tokens (chat rows) or on all tokens (text)."""

    packing: bool = field(
        default=True,
        metadata={"help": "padding-free packing of each micro-batch (exact for sdpa/eager)"},
    )
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})

    def validate(self) -> None:
        super().validate()
        if self.data is None:
            raise ConfigError("config key 'data' is required for sft (a file, dir, or task:NAME)")


def count_targets(batch: dict[str, Any]) -> float:
    return float(batch["num_target_tokens"])


def sft_step(model: torch.nn.Module, batch: dict[str, Any], normalizer: float):  # noqa: ANN201
    # bf16 logits under autocast: sft_loss upcasts them chunk by chunk (no (N, V) fp32 copy).
    logits, targets = target_logits(model, batch, upcast=False)  # (N, V), (N,)
    loss, metrics = sft_loss(logits, targets, normalizer, consume_logits=True)
    metrics["sft/target_token_frac"] = torch.tensor(
        batch["num_target_tokens"] / max(batch["num_tokens"], 1))
    return loss, metrics


def make_collate(tokenizer: Any, packing: bool, device: torch.device):  # noqa: ANN201
    def collate(examples: list) -> dict[str, Any]:
        batch = pack(examples) if packing else pad(examples, tokenizer.pad_token_id)
        return move_batch(batch, device)

    return collate


@torch.no_grad()
def evaluate_nll(model: torch.nn.Module, stream: BatchStream, precision: str) -> dict[str, float]:
    """Token-mean NLL and accuracy over one pass of ``stream``."""
    model.eval()
    device = next(model.parameters()).device
    nll = correct = n = 0.0
    for _ in range(len(stream)):
        batch = stream.next()
        with autocast_context(precision, device):
            logits, targets = target_logits(model, batch, upcast=False)
        n_b = targets.numel()
        loss, m = sft_loss(logits, targets, normalizer=1.0)
        nll, correct, n = nll + float(loss), correct + float(m["sft/token_accuracy"]) * n_b, n + n_b
    model.train()
    return {"eval/loss": nll / max(n, 1), "eval/token_accuracy": correct / max(n, 1)}


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT end to end; returns the final HF model directory."""
    run_dir, resume_from = prepare_run(cfg)
    model, tokenizer = load_policy(cfg, resume_from)
    device = next(model.parameters()).device
    enc = dict(formats=SFT_FORMATS, max_length=cfg.max_length, on_bad_row=cfg.on_bad_row)
    train = encode_dataset(cfg.data, tokenizer, **enc)
    collate = make_collate(tokenizer, cfg.packing, device)
    info = ddp.current()
    stream = BatchStream(train.examples, cfg.batch_size, collate, seed=cfg.seed,
                         rank=info.rank, world_size=info.world_size)
    eval_fn = None
    if cfg.eval_data:
        held_out = encode_dataset(cfg.eval_data, tokenizer, split="test", **enc)
        eval_stream = BatchStream(held_out.examples, cfg.batch_size, collate, cfg.seed, False)
        eval_fn = lambda: evaluate_nll(model, eval_stream, cfg.precision)  # noqa: E731

    return train_offline(cfg, model, tokenizer, run_dir, resume_from, stream, sft_step,
                         count_targets, eval_fn,
                         first_metrics=train.stats("data"))
