"""Reward model training (seed §5.3, EQ 5.2): a scalar head on the LM, Bradley–Terry loss.

    rows (prompt, chosen, rejected[, margin]) -> (chosen, rejected) token sequences
    model = causal LM body + a fresh one-output linear head (sequence classifier)
    for each step: ONE packed forward over [c_1, r_1, c_2, r_2, ...]
                   -> reward at each sequence's last token
                   -> -log sigma(r_w - r_l - margin) summed / pairs in the whole step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from posttrain.data.batching import BatchStream, move_batch, pack
from posttrain.data.pairs import Pair, encode_pairs
from posttrain.errors import ConfigError
from posttrain.losses.preference import bradley_terry_loss
from posttrain.models.attention import enable_packed_attention
from posttrain.models.device import autocast_context, pick_device
from posttrain.models.io import load_tokenizer, resize_for_tokenizer
from posttrain.models.reward import load_reward_model, sequence_rewards
from posttrain.train import checkpoint as ckpt
from posttrain.train import distributed as ddp
from posttrain.train.config import TrainConfig
from posttrain.train.loop import train_offline
from posttrain.train.run import prepare_run


@dataclass
class RMConfig(TrainConfig):
    """Reward model: a scalar head on the LM trained with the Bradley-Terry loss on pairs."""

    RANGES: ClassVar[dict[str, str]] = {"center_weight": ">= 0"}

    center_weight: float = field(default=0.0, metadata={
        "help": "reward-centring penalty c * (r_w + r_l)^2 (Eisenstein et al. 2023); 0 = off"})
    use_margin: bool = field(default=True, metadata={
        "help": "use the rows' optional 'margin' column in the loss"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (AdamW)"})

    def validate(self) -> None:
        super().validate()
        if self.data is None:
            raise ConfigError("config key 'data' is required for rm "
                              "(preference rows: prompt, chosen, rejected)")


def load_rm_policy(cfg: RMConfig, resume_from: Path | None) -> tuple[nn.Module, Any]:
    """(sequence classifier, tokenizer): a causal LM's body + new head, or a checkpoint."""
    # A sharded checkpoint's weights are loaded by Engine.restore into the starting model.
    saved = resume_from is not None and not ckpt.is_sharded(resume_from)
    spec = str(resume_from / "model") if saved else cfg.model
    tokenizer = load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)
    model = load_reward_model(spec, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    resize_for_tokenizer(model, tokenizer)
    # Saved RMs must work with HF's own forward too, which finds the last token by pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    enable_packed_attention(model)
    return model.to(pick_device()), tokenizer


def make_collate(device: torch.device):  # noqa: ANN201
    def collate(pairs: list[Pair]) -> dict[str, Any]:
        batch = pack([s for p in pairs for s in (p.a, p.b)])
        batch["margin"] = torch.tensor([p.margin for p in pairs])
        batch["num_pairs"] = len(pairs)
        return move_batch(batch, device)

    return collate


def make_step(cfg: RMConfig):  # noqa: ANN201
    def rm_step(model: nn.Module, batch: dict[str, Any], normalizer: float):  # noqa: ANN202
        r = sequence_rewards(model, batch)  # (2B,)
        margin = batch["margin"] if cfg.use_margin else None
        return bradley_terry_loss(r[0::2], r[1::2], normalizer, margin=margin,
                                  center_weight=cfg.center_weight)

    return rm_step


@torch.no_grad()
def evaluate_rm(model: nn.Module, stream: BatchStream, precision: str) -> dict[str, float]:
    """Held-out pairwise accuracy, margin and mean rewards over one pass of ``stream``."""
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    for _ in range(len(stream)):
        batch = stream.next()
        with autocast_context(precision, device):
            r = sequence_rewards(model, batch)
        _, m = bradley_terry_loss(r[0::2], r[1::2], 1.0)
        b = batch["num_pairs"]
        for k in ("rm/accuracy", "rm/margin", "rm/chosen", "rm/rejected"):
            sums[k] = sums.get(k, 0.0) + float(m[k]) * b
        n += b
    model.train()
    return {f"eval/{k.split('/')[1]}": v / max(n, 1) for k, v in sums.items()}


def train_reward_model(cfg: RMConfig) -> Path:
    """Train a Bradley–Terry reward model; returns the final HF model directory
    (``AutoModelForSequenceClassification.from_pretrained(final)``)."""
    run_dir, resume_from = prepare_run(cfg)
    model, tokenizer = load_rm_policy(cfg, resume_from)
    device = next(model.parameters()).device
    enc = dict(max_length=cfg.max_length, on_bad_row=cfg.on_bad_row)
    train = encode_pairs(cfg.data, tokenizer, **enc)
    collate = make_collate(device)
    info = ddp.current()
    stream = BatchStream(train.examples, cfg.batch_size, collate, seed=cfg.seed,
                         rank=info.rank, world_size=info.world_size)
    eval_fn = None
    if cfg.eval_data:
        held = encode_pairs(cfg.eval_data, tokenizer, split="test", **enc)
        eval_stream = BatchStream(held.examples, 2 * cfg.batch_size, collate, cfg.seed, False)
        eval_fn = lambda: evaluate_rm(model, eval_stream, cfg.precision)  # noqa: E731

    return train_offline(cfg, model, tokenizer, run_dir, resume_from, stream, make_step(cfg),
                         lambda b: float(b["num_pairs"]), eval_fn,
                         first_metrics=train.stats("data"))
