"""Offline preference optimisation (seed §5.5, EQ 5.5): DPO, robust/cDPO, IPO, hinge, KTO,
ORPO, SimPO. ``posttrain dpo loss=...``; ``posttrain kto|orpo|simpo`` preset ``loss``.

    rows -> (chosen, rejected) token sequences
    reference log-probs: computed once before training, cached on disk by fingerprint
        (reference-free losses, orpo and simpo, load no reference at all)
    for each step: ONE packed forward over [p_1, c_1, r_1, p_2, c_2, r_2, ...] (no padding;
                   each pair's prompt p_i computed once, both responses attend to it:
                   models/prefix.py; KTO and prefix_sharing=false: [x_1+c_1, x_1+r_1, ...])
                   -> summed completion log-probs per sequence (index_add over sequence ids)
                   -> losses.preference.<loss>(...) / pairs in the whole step
    at the end: each of the first 128 training pairs' margin under the final policy ->
                instruments.jsonl (INSTRUMENT 5.1; drawn by ``posttrain report``)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from posttrain.config.checks import Needs
from posttrain.data.batching import BatchStream, move_batch, pack
from posttrain.data.pairs import Pair, PairSet, encode_pairs, encode_unpaired
from posttrain.errors import ConfigError, DataError
from posttrain.losses import preference as L
from posttrain.models.device import autocast_context
from posttrain.models.logprobs import (
    AdapterDisabledReference,
    FrozenReference,
    Reference,
    default_cache_dir,
    precompute_reference,
    sequence_logprobs,
)
from posttrain.models.prefix import enable_prefix_attention, pack_pairs
from posttrain.models.reference import load_frozen_model
from posttrain.report.instruments import append_row, sketch
from posttrain.train import distributed as ddp
from posttrain.train import fsdp
from posttrain.train.config import TrainConfig
from posttrain.train.loop import total_steps, train_offline
from posttrain.train.policy import load_policy
from posttrain.train.run import prepare_run

log = logging.getLogger("posttrain")

LOSSES = ("dpo", "robust", "ipo", "hinge", "kto", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
LENGTH_NORMALISED = ("ipo", "orpo", "simpo")
# beta when left unset: DPO/IPO/hinge/KTO 0.1 (TRL's default); SimPO 2.0 (paper); ORPO's
# lambda 0.1 (paper).
DEFAULT_BETA = {"simpo": 2.0}
WITH_REFERENCE = tuple(x for x in LOSSES if x not in REFERENCE_FREE)


@dataclass
class DPOConfig(TrainConfig):
    """Offline preference optimisation: DPO, robust/cDPO, IPO, hinge, KTO, ORPO, SimPO."""

    RANGES: ClassVar[dict[str, str]] = {
        "beta": "> 0", "label_smoothing": "[0, 0.5)", "simpo_gamma": ">= 0",
        "desirable_weight": ">= 0", "undesirable_weight": ">= 0", "nll_weight": ">= 0",
    }
    # Each loss reads only its own keys (pair_loss, make_step); any other is silently unused.
    ONLY_WITH: ClassVar[dict[str, Needs]] = {
        "label_smoothing": Needs("loss", ("dpo", "robust")),
        "simpo_gamma": Needs("loss", ("simpo",)),
        "desirable_weight": Needs("loss", ("kto",)),
        "undesirable_weight": Needs("loss", ("kto",)),
        "nll_weight": Needs("loss", tuple(x for x in LOSSES if x != "kto"),
                            "KTO rows are unpaired: there is no chosen response"),
        "ref_model": Needs("loss", WITH_REFERENCE, "orpo and simpo use no reference"),
        "precompute_ref": Needs("loss", WITH_REFERENCE, "orpo and simpo use no reference"),
    }

    loss: Literal["dpo", "robust", "ipo", "hinge", "kto", "orpo", "simpo"] = field(
        default="dpo", metadata={"help": "dpo | robust | ipo | hinge | kto | orpo | simpo"})
    beta: float | None = field(default=None, metadata={
        "help": "dpo/robust/hinge/kto beta, ipo tau, simpo beta, orpo lambda; null = the "
                "loss's default (0.1; simpo 2.0)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "label-noise rate eps: cDPO for loss=dpo, rDPO for loss=robust"})
    simpo_gamma: float = field(default=1.0, metadata={"help": "SimPO target reward margin"})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO weight of desirable"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO weight, undesirable"})
    nll_weight: float = field(default=0.0, metadata={
        "help": "add this x token-mean NLL of the chosen (RPO); 0 = plain loss"})
    precompute_ref: bool = field(default=True, metadata={
        "help": "reference log-probs once before training (cached), else every step"})
    ref_cache_dir: str | None = field(default=None, metadata={
        "help": "reference cache dir; null = $POSTTRAIN_CACHE or ~/.cache/posttrain"})
    ref_model: str | None = field(default=None, metadata={
        "help": "reference model spec; null = the starting policy (model)"})
    prefix_sharing: bool = field(default=True, metadata={
        "help": "compute each pair's shared prompt once in the forward (exact; not for kto, "
                "nor for attention implementations that cannot: flash/flex)"})
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW)"})

    def validate(self) -> None:
        super().validate()
        if self.data is None:
            raise ConfigError(f"config key 'data' is required for {self.loss} "
                              "(preference rows: prompt, chosen, rejected)")
        if self.loss == "kto" and not (self.desirable_weight or self.undesirable_weight):
            raise ConfigError("desirable_weight and undesirable_weight are both 0: the KTO loss "
                              "would be 0 and nothing would be learned")

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.loss, 0.1)


@dataclass
class KTOConfig(DPOConfig):
    loss: Literal["dpo", "robust", "ipo", "hinge", "kto", "orpo", "simpo"] = field(
        default="kto", metadata={"help": "dpo | robust | ipo | hinge | kto | orpo | simpo"})


@dataclass
class ORPOConfig(DPOConfig):
    loss: Literal["dpo", "robust", "ipo", "hinge", "kto", "orpo", "simpo"] = field(
        default="orpo", metadata={"help": "dpo | robust | ipo | hinge | kto | orpo | simpo"})


@dataclass
class SimPOConfig(DPOConfig):
    loss: Literal["dpo", "robust", "ipo", "hinge", "kto", "orpo", "simpo"] = field(
        default="simpo", metadata={"help": "dpo | robust | ipo | hinge | kto | orpo | simpo"})


# ---- data ------------------------------------------------------------------------------


def pair_collate(prefix_sharing: bool):  # noqa: ANN201
    """Sequences [a_1, b_1, a_2, b_2, ...] -> one packed row: prefix-shared per pair
    (``pack_pairs``) or plain padding-free (``pack``)."""
    return pack_pairs if prefix_sharing else pack


def make_collate(device: torch.device, ref: Tensor | None, kto: bool,  # noqa: ANN201
                 prefix_sharing: bool = False):
    """Micro-batch of pairs: one packed row of all 2B sequences [a_1, b_1, a_2, b_2, ...],
    each pair's prompt shared when ``prefix_sharing`` (KTO: the B completions, and the B KL
    sequences as a separate no-grad ``kl_batch``)."""

    def collate(pairs: list[Pair]) -> dict[str, Any]:
        idx = torch.tensor([p.index for p in pairs])
        if kto:
            batch = pack([p.a for p in pairs])
            batch["kl_batch"] = pack([p.b for p in pairs])
            batch["desirable"] = torch.tensor([p.label for p in pairs])
        else:
            batch = pair_collate(prefix_sharing)([s for p in pairs for s in (p.a, p.b)])
            batch["margin"] = torch.tensor([p.margin for p in pairs])
        batch["num_pairs"] = len(pairs)
        if ref is not None:
            batch["ref_logps"] = ref[idx].reshape(-1)  # (2B,) in the same a/b interleaving
        return move_batch(batch, device)

    return collate


def count_pairs(batch: dict[str, Any]) -> float:
    return float(batch["num_pairs"])


# ---- the step --------------------------------------------------------------------------


class SaturationWatch:
    """Warn once when most pairs are saturated (INSTRUMENT 5.1): they no longer teach."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, metrics: dict[str, Tensor]) -> None:
        frac = next((v for k, v in metrics.items() if k.endswith("/saturated_frac")), None)
        if frac is not None and not self.warned and float(frac) > 0.5:
            self.warned = True
            log.warning("%.0f%% of pairs are saturated (gradient weight sigma(-margin) < %.2f): "
                        "they stop teaching; lower beta or lr, or add harder pairs",
                        100 * float(frac), L.SATURATION)


def _ref_logps(batch: dict[str, Any], reference: Reference | None) -> Tensor:
    if "ref_logps" in batch:
        return batch["ref_logps"]
    assert reference is not None, "a reference-based loss needs ref_logps or a reference"
    return reference.logprobs(batch)


def pair_loss(cfg: DPOConfig, logps: Tensor, lengths: Tensor, ref: Tensor | None,
              normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The configured pair loss on interleaved sequences [a_1, b_1, a_2, b_2, ...]: summed
    log-probs ``logps`` (2B,), completion ``lengths`` (2B,), reference log-probs ``ref`` (2B,)
    (None for the reference-free losses)."""
    beta = cfg.beta_value
    pc, pr, nc, nr = logps[0::2], logps[1::2], lengths[0::2], lengths[1::2]
    if cfg.loss == "simpo":
        return L.simpo_loss(pc / nc, pr / nr, normalizer, beta=beta, gamma=cfg.simpo_gamma)
    if cfg.loss == "orpo":
        return L.orpo_loss(pc / nc, pr / nr, normalizer, lam=beta)
    assert ref is not None, "a reference-based loss needs reference log-probs"
    rc, rr = ref[0::2], ref[1::2]
    if cfg.loss == "ipo":
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    return L.dpo_loss(pc, pr, rc, rr, normalizer, beta=beta, variant=cfg.loss,
                      label_smoothing=cfg.label_smoothing)


def make_step(cfg: DPOConfig, reference: Reference | None):  # noqa: ANN201
    """loss_fn(model, batch, normalizer) for the engine; ``reference`` is used only when the
    batch carries no precomputed ``ref_logps``."""
    beta, watch = cfg.beta_value, SaturationWatch()

    def pair_step(model: nn.Module, batch: dict[str, Any], normalizer: float):  # noqa: ANN202
        logps, lengths = sequence_logprobs(model, batch)  # (2B,), (2B,)
        ref = None if cfg.loss in REFERENCE_FREE else _ref_logps(batch, reference)
        loss, m = pair_loss(cfg, logps, lengths, ref, normalizer)
        if cfg.nll_weight > 0:
            nll, m2 = L.chosen_nll(logps[0::2] / lengths[0::2], normalizer, cfg.nll_weight)
            loss, m = loss + nll, {**m, **m2}
        m["logps/chosen"] = logps[0::2].detach().mean()
        m["logps/rejected"] = logps[1::2].detach().mean()
        if "num_unshared_tokens" in batch:  # what prefix sharing saved in this forward
            saved = 1 - batch["num_tokens"] / batch["num_unshared_tokens"]
            m["perf/prefix_saved_frac"] = torch.tensor(saved)
        watch(m)
        return loss, m

    def kto_step(model: nn.Module, batch: dict[str, Any], normalizer: float):  # noqa: ANN202
        logps, _ = sequence_logprobs(model, batch)  # (B,)
        kl_batch = batch["kl_batch"]
        with torch.no_grad():
            kl_logps, _ = sequence_logprobs(model, kl_batch)
        if "ref_logps" in batch:
            ref, ref_kl = batch["ref_logps"][0::2], batch["ref_logps"][1::2]
        else:
            ref, ref_kl = reference.logprobs(batch), reference.logprobs(kl_batch)
        kl = (kl_logps.float() - ref_kl).mean()
        loss, m = L.kto_loss(logps, ref, batch["desirable"], kl, normalizer, beta=beta,
                             desirable_weight=cfg.desirable_weight,
                             undesirable_weight=cfg.undesirable_weight)
        d = batch["desirable"]
        if d.any():
            m["logps/chosen"] = logps.detach()[d].mean()
        if (~d).any():
            m["logps/rejected"] = logps.detach()[~d].mean()
        return loss, m

    return kto_step if cfg.loss == "kto" else pair_step


# ---- evaluation ------------------------------------------------------------------------


@torch.no_grad()
def evaluate_margin(model: nn.Module, pairs: list[Pair], batch_size: int, precision: str,
                    paired: bool = True, prefix_sharing: bool = False) -> dict[str, float]:
    """Held-out mean log-prob of chosen, rejected, and their margin (summed over tokens;
    ``avg_logps_margin``: of per-token means, the quantity length-normalised losses move).
    For unpaired KTO data, 'chosen' = desirable and 'rejected' = undesirable completions.
    ``prefix_sharing`` (paired only) needs ``enable_prefix_attention(model)``."""
    model.eval()
    device = next(model.parameters()).device
    good, bad, wins, avg_good, avg_bad = [], [], [], [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        seqs = [s for p in chunk for s in (p.a, p.b)] if paired else [p.a for p in chunk]
        collate = pair_collate(prefix_sharing and paired)
        with autocast_context(precision, device):
            logps, lengths = sequence_logprobs(model, move_batch(collate(seqs), device))
        logps, avg = logps.float().cpu(), (logps.float() / lengths.clamp(min=1)).cpu()
        labels = [j % 2 == 0 for j in range(len(seqs))] if paired else [p.label for p in chunk]
        for lp, a, is_good in zip(logps.tolist(), avg.tolist(), labels, strict=True):
            (good if is_good else bad).append(lp)
            (avg_good if is_good else avg_bad).append(a)
        if paired:
            wins += (logps[0::2] > logps[1::2]).tolist()
    model.train()
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    out = {"eval/logps_chosen": mean(good), "eval/logps_rejected": mean(bad),
           "eval/logps_margin": mean(good) - mean(bad),
           "eval/avg_logps_margin": mean(avg_good) - mean(avg_bad)}
    if paired:
        out["eval/logps_accuracy"] = mean(wins)
    return out


MARGIN_PAIRS = 128  # pairs in INSTRUMENT 5.1's end-of-training histogram


@torch.no_grad()
def pair_margins(cfg: DPOConfig, model: nn.Module, pairs: list[Pair],
                 collate: Callable[[list[Pair]], dict[str, Any]],
                 reference: Reference | None) -> list[float]:
    """INSTRUMENT 5.1: each pair's margin, the quantity its loss feeds the sigmoid (the
    loss's own ``*/margin``, pair by pair), under the current policy."""
    model.eval()
    device, out = next(model.parameters()).device, []
    for i in range(0, len(pairs), cfg.batch_size):
        batch = collate(pairs[i : i + cfg.batch_size])
        with autocast_context(cfg.precision, device):
            logps, lengths = sequence_logprobs(model, batch)  # (2B,), (2B,)
            ref = None if cfg.loss in REFERENCE_FREE else _ref_logps(batch, reference)
        for j in range(0, len(logps), 2):
            _, m = pair_loss(cfg, logps[j : j + 2], lengths[j : j + 2],
                             None if ref is None else ref[j : j + 2], 1.0)
            out.append(float(next(v for k, v in m.items() if k.endswith("/margin"))))
    model.train()
    return out


def record_margins(cfg: DPOConfig, model: nn.Module, pairs: list[Pair],
                   collate: Callable[[list[Pair]], dict[str, Any]],
                   reference: Reference | None, run_dir: Path, step: int) -> None:
    """The final policy's margins on the first ``MARGIN_PAIRS`` training pairs, one
    ``instruments.jsonl`` row. Training pairs, as ``*/saturated_frac`` measures: the
    histogram shows which of them still carry gradient (held-out margins: ``eval/``)."""
    margins = pair_margins(cfg, model, pairs[:MARGIN_PAIRS], collate, reference)
    append_row(run_dir, {"step": step, "kind": "margins", "loss": cfg.loss, "split": "train",
                         "n": len(margins), "margins": sketch(margins)})


# ---- the recipe ------------------------------------------------------------------------


def build_reference(cfg: DPOConfig, model: nn.Module, resume_from: Path | None,
                    device: torch.device, prefix_sharing: bool) -> tuple[Reference, bool]:
    """The frozen reference, and whether it can share prefixes: ``ref_model`` if given; else
    the starting policy: its base with LoRA adapters disabled (peft model), or a frozen copy
    (also when resuming, where the loaded policy is the checkpoint's and the reference must
    be reloaded from ``model``). A copy of the policy keeps its attention implementation."""
    ac = lambda: autocast_context(cfg.precision, device)  # noqa: E731
    if cfg.ref_model or resume_from is not None:
        ref, can_share = load_frozen_model(cfg.ref_model or cfg.model, device,
                                           trust_remote_code=cfg.trust_remote_code,
                                           seed=cfg.seed, prefix=prefix_sharing)
        return FrozenReference(ref, ac, copy=False), can_share
    if hasattr(model, "disable_adapter"):
        return AdapterDisabledReference(model, ac), True
    return FrozenReference(model, ac), True


def _no_prefix_sharing(whose: str) -> bool:
    log.info("%s attention implementation cannot share prefixes; packing padding-free", whose)
    return False


def train_preference(cfg: DPOConfig) -> Path:
    """Run the configured preference loss end to end; returns the final HF model dir."""
    run_dir, resume_from = prepare_run(cfg)
    model, tokenizer = load_policy(cfg, resume_from)
    device = next(model.parameters()).device
    kto = cfg.loss == "kto"
    prefix = cfg.prefix_sharing and not kto  # unpaired: no two sequences share a prompt
    if prefix and not enable_prefix_attention(model):
        prefix = _no_prefix_sharing("the policy's")
    enc = dict(max_length=cfg.max_length, on_bad_row=cfg.on_bad_row)
    train = (encode_unpaired if kto else encode_pairs)(cfg.data, tokenizer, **enc)

    reference, ref_table, ref_stats = None, None, {}
    if cfg.loss not in REFERENCE_FREE:
        reference, can_share = build_reference(cfg, model, resume_from, device, prefix)
        if prefix and not can_share:
            prefix = _no_prefix_sharing("the reference model's")
        if cfg.precompute_ref:
            cache = Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else default_cache_dir()
            values, ref_stats = precompute_reference(
                reference, train.sequences(), batch_size=2 * cfg.batch_size, device=device,
                cache_dir=cache, collate=pair_collate(prefix),
                # the forward kind is in the key: a resumed run reads bit-identical values
                tag=f"{cfg.precision}|prefix={prefix}")
            ref_table = values.reshape(-1, 2)
            reference = None  # frees the frozen copy: precomputed values are all we need
    cfg = dataclasses.replace(cfg, prefix_sharing=prefix)  # config.yaml: what runs

    collate = make_collate(device, ref_table, kto, prefix)
    info = ddp.current()
    stream = BatchStream(train.examples, cfg.batch_size, collate, seed=cfg.seed,
                         rank=info.rank, world_size=info.world_size)
    steps = total_steps(cfg.max_steps, cfg.epochs, len(stream), cfg.grad_accum)
    eval_fn = None
    if cfg.eval_data:
        held = (encode_pairs(cfg.eval_data, tokenizer, split="test", **enc) if not kto else
                _kto_eval_set(cfg.eval_data, tokenizer, enc))
        eval_fn = lambda: evaluate_margin(model, held.examples, 2 * cfg.batch_size,  # noqa: E731
                                          cfg.precision, held.paired, prefix)

    final = train_offline(cfg, model, tokenizer, run_dir, resume_from, stream,
                          make_step(cfg, reference), count_pairs, eval_fn,
                          first_metrics={**train.stats("data"), **ref_stats})
    if not kto:  # KTO's examples are unpaired: no margins
        with fsdp.gathered(model):  # every rank gathers (fsdp2), rank 0 alone runs forwards
            if info.is_main:
                record_margins(cfg, model, train.examples, collate, reference, run_dir, steps)
    return final


def _kto_eval_set(spec: str, tokenizer: Any, enc: dict[str, Any]) -> PairSet:
    """Held-out data for KTO: preference pairs if it has them, else unpaired rows."""
    try:
        return encode_pairs(spec, tokenizer, split="test", **enc)
    except DataError:
        return encode_unpaired(spec, tokenizer, split="test", **enc)
