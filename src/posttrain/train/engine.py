"""The one training engine shared by every recipe (DESIGN.md §4).

A recipe hands the engine micro-batches and a pure loss; the engine owns the optimizer and LR
schedule, gradient accumulation (with an explicit global normaliser), grad-norm clipping, bf16
autocast, gradient checkpointing, the NaN/inf guard, metrics and atomic checkpoints.

A run may train a second model beside the policy (PPO's value model): ``add_model`` gives it
its own optimizer and schedule, ``update(..., model=name)`` steps it through the same
accumulation, clipping and guard, and checkpoints carry its weights and optimizer state.

Under torchrun the trained models are DDP replicas (``strategy=ddp``) or FSDP2 shards
(``strategy=fsdp2``, ``train/fsdp.py``); both average gradients over ranks, so the loss
scaling below is the same. A sharded run checkpoints with torch.distributed.checkpoint and
gathers the full weights to rank 0 for the HF export.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from posttrain.config.serialize import config_to_dict, save_config
from posttrain.errors import TrainingError
from posttrain.models.compile import compile_decoder_layers
from posttrain.models.device import autocast_context
from posttrain.models.lora import has_lora, save_pretrained_for_run
from posttrain.train import checkpoint as ckpt
from posttrain.train import distributed as ddp
from posttrain.train import fsdp
from posttrain.train.allocator import use_warm_host_memory
from posttrain.train.config import TrainConfig
from posttrain.train.metrics import MetricsLogger
from posttrain.train.progress import Progress
from posttrain.train.threads import govern_threads

log = logging.getLogger("posttrain")

Batch = dict[str, Any]
# loss_fn(model, micro_batch, normalizer) -> (loss, metrics); loss already divided by normalizer.
LossFn = Callable[[nn.Module, Batch, float], tuple[Tensor, dict[str, Tensor]]]
# count_fn(micro_batch) -> this micro-batch's share of the normaliser (e.g. its target tokens).
CountFn = Callable[[Batch], float]

_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_adamw(params: list[nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where torch has one for the parameters' device (CPU and
    CUDA): one pass per tensor instead of ~10 elementwise ops (SmolLM2-135M on the 2-core CPU:
    0.17 s vs 1.2 s per step; the same update up to fp32 rounding)."""
    devices = {p.device.type for p in params}
    if devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # an older torch or an unsupported dtype
            pass
    return torch.optim.AdamW(params, **kwargs)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


class ModelOptimizer:
    """One trained model's AdamW, LR schedule and guarded step: a non-finite loss or gradient
    skips the step, and ``cfg.max_bad_steps`` of them in a row abort the run."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, lr: float, total_steps: int,
                 name: str = "", lr_key: str = "lr", fused: bool = True):
        self.cfg, self.model, self.name, self.lr_key = cfg, model, name, lr_key
        self.train_model = model  # what runs its forwards: the engine may wrap it (DDP)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError(f"the {name or 'policy'} model has no trainable parameters")
        kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        self.optimizer = (make_adamw(self.params, **kwargs) if fused
                          else torch.optim.AdamW(self.params, **kwargs))
        self.scheduler = get_scheduler(
            _SCHEDULERS[cfg.lr_scheduler], self.optimizer,
            num_warmup_steps=cfg.warmup_steps, num_training_steps=max(total_steps, 1),
        )
        self.skipped_steps = 0
        self.bad_streak = 0

    def step(self, loss: float, step: int) -> tuple[float, bool]:
        """Clip, then step unless ``loss`` or the gradient is non-finite; advance the schedule.
        Returns (grad norm, whether the optimizer stepped)."""
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = fsdp.full_norm(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        stepped = self._guarded_step(loss, grad_norm, step)
        self.scheduler.step()
        return grad_norm, stepped

    def _guarded_step(self, loss: float, grad_norm: float, step: int) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.bad_streak = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.bad_streak += 1
        what = f"{self.name} model: " if self.name else ""
        log.warning("step %d: %snon-finite loss/gradient (loss=%s, grad_norm=%s); step skipped",
                    step, what, loss, grad_norm)
        if self.bad_streak >= self.cfg.max_bad_steps:
            raise TrainingError(
                f"{what}{self.bad_streak} consecutive steps had a non-finite loss or gradient "
                f"(last loss={loss}, grad_norm={grad_norm}); aborting. Lower {self.lr_key}, use "
                f"precision=fp32, or check the data. The last good checkpoint is intact."
            )
        return False

    def state_dict(self, optimizer: bool = True) -> dict[str, Any]:
        """Schedule and counters, and unless ``optimizer`` is False (a sharded checkpoint
        holds it in its DCP directory) the optimizer state."""
        state = {"scheduler": self.scheduler.state_dict(),
                 "skipped_steps": self.skipped_steps, "bad_streak": self.bad_streak}
        if optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = int(state["skipped_steps"])
        self.bad_streak = int(state["bad_streak"])


class Engine:
    """Optimisation state of one run; see ``update`` for one optimizer step.

    Creating the engine writes ``config.yaml``: by then the recipe has resolved every choice
    it makes at run time (e.g. prefix sharing off for a model that cannot share), so the file
    holds exactly the config that runs.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        tokenizer: Any,
        run_dir: Path,
        total_steps: int,
    ):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.run_dir, self.total_steps = run_dir, total_steps
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            use_warm_host_memory()  # steps reuse warm pages (train/allocator.py)
        self.sharded = cfg.strategy == "fsdp2"
        # prepare_run joins the process group; an engine built without it (a library caller)
        # still needs one to shard over
        self.dist = (ddp.init_distributed(cfg.dist_timeout, need_group=True) if self.sharded
                     else ddp.current())
        if cfg.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
            model.config.use_cache = False
        if cfg.compile:
            compile_decoder_layers(model)
        if self.sharded:  # in place: the optimizer below must see the DTensor shards
            fsdp.shard(model, cfg.precision, cfg.cpu_offload)
        self.policy = ModelOptimizer(cfg, model, cfg.lr, total_steps)
        self.others: dict[str, ModelOptimizer] = {}
        self.step = 0
        # The DDP wrapper runs forwards; ``self.model`` stays the plain module for saving.
        # FSDP2 shards the module itself: both names are the same object.
        self.train_model = model if self.sharded else ddp.wrap_ddp(model, self.dist)
        if self.dist.is_main:
            ckpt.clean_stale_temporaries(run_dir)  # a killed save's leftovers may fill the disk
            save_config(cfg, run_dir / "config.yaml")
        sinks = list(cfg.report_to) if self.dist.is_main else []
        self.metrics = MetricsLogger(run_dir, sinks, config=config_to_dict(cfg),
                                     enabled=self.dist.is_main)
        self.progress = Progress(total_steps, enabled=None if self.dist.is_main else False)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.policy.optimizer

    @property
    def scheduler(self) -> Any:
        return self.policy.scheduler

    def add_model(self, name: str, model: nn.Module, lr: float, lr_key: str,
                  fused: bool = True) -> None:
        """Train ``model`` beside the policy with its own optimizer and LR schedule (same
        warmup, decay and length); checkpoints save it in ``model/<name>/``. Under fsdp2 it
        is sharded like the policy, under torchrun's DDP wrapped like it."""
        if self.sharded:
            fsdp.shard(model, self.cfg.precision, self.cfg.cpu_offload)
        opt = ModelOptimizer(self.cfg, model, lr, self.total_steps, name=name, lr_key=lr_key,
                             fused=fused)
        if not self.sharded:
            opt.train_model = ddp.wrap_ddp(model, self.dist)
        self.others[name] = opt

    # ---- one optimizer step -------------------------------------------------------------
    def update(self, micro_batches: Sequence[Batch], loss_fn: LossFn, count_fn: CountFn,
               extra_count: float = 0.0, model: str | None = None) -> dict:
        """Accumulate gradients over ``micro_batches`` and take one optimizer step.

        The normaliser is the sum of ``count_fn`` over all micro-batches of all ranks, plus
        ``extra_count``: the share of work the recipe left out because its gradient is exactly
        zero (GRPO's zero-advantage groups), so skipping it changes nothing. The accumulated
        gradient equals that of one large batch's mean (DESIGN.md §3). DDP averages gradients
        over ranks, so each rank's loss is scaled by the world size. Metrics are averaged over
        the micro-batches weighted by their counts.

        ``model`` names a model added with ``add_model``: it takes its own step, and neither
        the run's step counter nor the progress bar moves.
        """
        govern_threads()  # between steps: the cores other processes left free
        with ddp.peer_failure(self.dist, self.step + 1, f"step {self.step + 1}",
                              self.cfg.dist_timeout):
            if model is not None:
                return self._update_other(self.others[model], micro_batches, loss_fn,
                                          count_fn)
            ddp.mark_step(self.dist, self.step + 1)
            return self._update_policy(micro_batches, loss_fn, count_fn, extra_count)

    def _update_policy(self, micro_batches: Sequence[Batch], loss_fn: LossFn, count_fn: CountFn,
                       extra_count: float) -> dict:
        t0 = time.perf_counter()
        self.model.train()
        total_loss, sums = self._accumulate(self.policy, self.train_model, micro_batches, loss_fn,
                                            count_fn, extra_count)
        grad_norm, stepped = self.policy.step(total_loss, self.step + 1)
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = ddp.all_reduce_sum(sum(int(mb.get("num_tokens", 0)) for mb in micro_batches),
                                    self.dist, self.device)
        samples = ddp.all_reduce_sum(
            sum(int(mb.get("num_sequences", 0)) for mb in micro_batches), self.dist, self.device)
        out = {
            "train/loss": total_loss, "train/grad_norm": grad_norm,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/skipped_steps": self.policy.skipped_steps,
            "perf/step_time_s": dt, "perf/tokens_per_s": tokens / dt, "perf/samples_per_s":
            samples / dt, "perf/tokens": tokens,
        }
        out.update(sums)
        if not stepped:
            out["train/nonfinite"] = 1
        self.progress.advance(self.step, total_loss)
        return out

    def _update_other(self, opt: ModelOptimizer, micro_batches: Sequence[Batch],
                      loss_fn: LossFn, count_fn: CountFn) -> dict:
        opt.model.train()
        total_loss, sums = self._accumulate(opt, opt.train_model, micro_batches, loss_fn,
                                            count_fn, 0.0)
        grad_norm, stepped = opt.step(total_loss, self.step)
        out = {**sums, f"train/{opt.name}_grad_norm": grad_norm,
               f"train/{opt.name}_lr": opt.scheduler.get_last_lr()[0]}
        if not stepped:
            out[f"train/{opt.name}_nonfinite"] = 1
        return out

    def _accumulate(self, opt: ModelOptimizer, model: nn.Module, micro_batches: Sequence[Batch],
                    loss_fn: LossFn, count_fn: CountFn,
                    extra_count: float) -> tuple[float, dict[str, float]]:
        """Backward every micro-batch's loss (already divided by the global normaliser);
        returns the summed loss and the count-weighted metrics, both reduced over ranks."""
        counts = [float(count_fn(mb)) for mb in micro_batches]
        counted = ddp.all_reduce_sum(sum(counts), self.dist, self.device)
        normalizer = max(counted + ddp.all_reduce_sum(extra_count, self.dist, self.device), 1.0)
        opt.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        sums: dict[str, float] = {}
        for i, (mb, count) in enumerate(zip(micro_batches, counts, strict=True)):
            with self._maybe_no_sync(model, last=i == len(micro_batches) - 1):
                with autocast_context(self.cfg.precision, self.device):
                    loss, metrics = loss_fn(model, mb, normalizer)
                (loss * self.dist.world_size).backward()
            total_loss += float(loss.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * count / max(counted, 1.0)
        total_loss = ddp.all_reduce_sum(total_loss, self.dist, self.device)
        sums = {k: ddp.all_reduce_sum(v, self.dist, self.device) for k, v in sums.items()}
        return total_loss, sums

    def _maybe_no_sync(self, model: nn.Module, last: bool) -> AbstractContextManager:
        """Skip DDP's gradient all-reduce (FSDP2's reduce-scatter) on all but the last
        micro-batch of a step."""
        if fsdp.is_sharded(model):
            return fsdp.gradient_sync(model, sync=last)
        if self.dist.enabled and not last and isinstance(model, DistributedDataParallel):
            return model.no_sync()
        return nullcontext()

    # ---- logging and checkpoints -------------------------------------------------------------
    def log(self, metrics: dict[str, Any]) -> None:
        self.metrics.log(self.step, metrics)

    def save(self, cursor: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        """Atomic checkpoint of the models + optimizers + schedulers + RNG + data cursor +
        the recipe's ``extra`` state: rank 0 writes it, or under fsdp2 every rank writes its
        shards (torch.distributed.checkpoint) and rank 0 the rest."""
        self._assert_finite()
        with ddp.peer_failure(self.dist, self.step, f"checkpoint step-{self.step}",
                              self.cfg.dist_timeout):
            path = self._save_sharded(cursor, extra) if self.sharded else \
                self._save_replicated(cursor, extra)
        if self.dist.is_main:
            log.info("saved checkpoint %s", path)
        return path

    def _trainer_state(self, cursor: dict[str, Any], extra: dict[str, Any] | None,
                       optimizer: bool, rngs: list[object]) -> dict[str, Any]:
        return {"step": self.step, **self.policy.state_dict(optimizer), "rng": rngs,
                "cursor": cursor, "extra": extra or {},
                "models": {name: opt.state_dict(optimizer) for name, opt in self.others.items()}}

    def _save_replicated(self, cursor: dict[str, Any], extra: dict[str, Any] | None) -> Path:
        path = ckpt.checkpoints_dir(self.run_dir) / f"step-{self.step}"
        rngs = ddp.all_gather_object(ckpt.rng_state(), self.dist)  # every rank's, in rank order
        if self.dist.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir, self.step, partial(self._save_models, final=False),
                self._trainer_state(cursor, extra, optimizer=True, rngs=rngs),
                self.cfg.save_total_limit,
            )
        ddp.barrier(self.dist)
        return path

    def _save_sharded(self, cursor: dict[str, Any], extra: dict[str, Any] | None) -> Path:
        rngs = ddp.all_gather_object(ckpt.rng_state(), self.dist)
        return ckpt.save_sharded_checkpoint(
            self.run_dir, self.step, self._write_shards,
            self._trainer_state(cursor, extra, optimizer=False, rngs=rngs),
            self.cfg.save_total_limit, self.dist)

    def _write_shards(self, path: Path) -> None:
        """Every rank's shards into ``path``; with ``hf_checkpoints`` also the gathered model
        in HF format beside it (``model/``, as a ddp checkpoint holds it)."""
        fsdp.save_sharded(path, self._parts())
        if self.cfg.hf_checkpoints:
            states = self._gather()
            if self.dist.is_main:
                self._save_gathered(path.parent / "model", states, final=False)

    def _gather(self) -> dict[str, dict[str, Tensor]]:
        """Every trained model's full weights on rank 0 (every rank must call it)."""
        return {name: fsdp.full_state_dict(model) for name, (model, _) in self._parts().items()}

    def _parts(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """Every trained model with its optimizer, by checkpoint name."""
        return {"policy": (self.model, self.optimizer),
                **{name: (opt.model, opt.optimizer) for name, opt in self.others.items()}}

    def restore(self, checkpoint: Path) -> dict[str, Any]:
        """Load optimizers/schedulers/RNG/counters (model weights are loaded by the caller,
        except from a sharded checkpoint, which holds them with the optimizer states and
        re-shards them to this run's world size; a ``strategy=ddp`` checkpoint resumes under
        fsdp2 too, its optimizer state sharded on load); returns the trainer state
        (``cursor``, ``extra``)."""
        state = ckpt.load_trainer_state(checkpoint)
        if ckpt.is_sharded(checkpoint):
            with ddp.peer_failure(self.dist, self.step, f"loading {checkpoint}",
                                  self.cfg.dist_timeout):
                fsdp.load_sharded(checkpoint / ckpt.SHARDED_DIR, self._parts())
        elif self.sharded:  # a replica's optimizer state (strategy=ddp): shard it
            fsdp.load_replica_optimizer(self.model, self.optimizer, state.pop("optimizer"))
            for name, opt in self.others.items():
                fsdp.load_replica_optimizer(opt.model, opt.optimizer,
                                            state["models"][name].pop("optimizer"))
        self.policy.load_state_dict(state)
        for name, opt in self.others.items():
            opt.load_state_dict(state["models"][name])
        self._restore_rng(state["rng"])
        self.step = int(state["step"])
        self.progress.advance(self.step, None)
        return state

    def _restore_rng(self, saved: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Each rank takes back its own RNG streams (dropout, any unseeded sampling); on a
        larger world size the new ranks keep the streams they were seeded with."""
        rngs = saved if isinstance(saved, list) else [saved]
        if self.dist.rank < len(rngs):
            ckpt.set_rng_state(rngs[self.dist.rank])

    def _assert_finite(self) -> None:
        """Refuse to save NaN/inf weights; under fsdp2 each rank checks its shards and all
        ranks learn the verdict (a rank alone must not leave the others in the save)."""
        bad = next((b for m in [self.model, *(o.model for o in self.others.values())]
                    if (b := ckpt.nonfinite_parameter(m)) is not None), None)
        if self.sharded and ddp.all_reduce_sum(float(bad is not None), self.dist,
                                               self.device) > 0:
            bad = bad or "(on another rank)"
        if bad is not None:
            raise TrainingError(f"refusing to save: parameter '{bad}' has NaN/inf values")

    def _save_models(self, path: Path, final: bool) -> None:
        """The policy in ``path`` (full model, or under LoRA the adapter; ``final`` with
        ``lora.merge=true``: merged weights), each added model in ``path/<name>``."""
        merge = final and self.cfg.lora.merge
        save_pretrained_for_run(self.model, self.tokenizer, path, merge=merge)
        for name, opt in self.others.items():
            save_pretrained_for_run(opt.model, self.tokenizer, path / name, merge=merge)

    def _save_gathered(self, path: Path, states: dict[str, dict[str, Tensor]],
                       final: bool) -> None:
        """Rank 0: the full weights gathered from the shards, as ``_save_models`` writes them."""
        for name, (model, _) in self._parts().items():
            out = path if name == "policy" else path / name
            if final and name == "policy" and has_lora(model) and self.cfg.lora.merge:
                save_pretrained_for_run(self._replica(states[name]), self.tokenizer, out,
                                        merge=True)
                continue
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out, state_dict=states[name], safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(out)

    def _replica(self, state: dict[str, Tensor]) -> nn.Module:
        """An unsharded CPU copy of the policy holding ``state`` (merging LoRA adapters needs
        whole modules): built from the run's starting model, then loaded."""
        from posttrain.train.policy import load_policy

        replica, _ = load_policy(self.cfg, None)
        missing, unexpected = replica.load_state_dict(state, strict=False)
        if set(missing) - set(fsdp.tied_aliases(replica)) or unexpected:
            raise TrainingError(f"the gathered weights do not fit a fresh {self.cfg.model}: "
                                f"missing {missing}, unexpected {unexpected}")
        return replica.cpu()

    def save_final(self) -> Path:
        """The final model, written to a temporary directory and renamed to ``final/``; a
        failed write (a full disk) says what survives (see ``checkpoint.removed_on_failure``).
        Under fsdp2 the shards are first gathered to rank 0, which writes one HF directory."""
        self._assert_finite()
        final = self.run_dir / "final"
        with ddp.peer_failure(self.dist, self.step, "the final export", self.cfg.dist_timeout):
            states = self._gather() if self.sharded else None
            if self.dist.is_main:
                self._write_final(final, states)
            ddp.barrier(self.dist)
        return final

    def _write_final(self, final: Path, states: dict[str, dict[str, Tensor]] | None) -> None:
        tmp = self.run_dir / f".tmp-final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with ckpt.removed_on_failure(tmp, f"final/ in {self.run_dir}", self._final_lost):
            if states is None:
                self._save_models(tmp, final=True)
            else:
                self._save_gathered(tmp, states, final=True)
            ckpt.fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def _final_lost(self) -> str:
        """What survives a failed final/ write: the last checkpoint, or nothing."""
        found = ckpt.list_checkpoints(self.run_dir)
        if found:
            return (f"the last checkpoint {found[-1][1].name} is intact; free space, then "
                    "resume=true finishes the run from it")
        need = ckpt.format_bytes(self.save_bytes()[1])
        return (f"no checkpoint was saved with save_steps={self.cfg.save_steps}, so the "
                f"{self.step} trained steps are lost; final/ needs about {need}: free space "
                "and rerun")

    def save_bytes(self) -> tuple[int, int]:
        """Estimated bytes of (a checkpoint, final/): the weights each writes (under LoRA a
        checkpoint holds only the adapter, final/ too unless merged) plus, in a checkpoint,
        AdamW's two moments per trainable parameter."""
        merge = self.cfg.lora.merge
        opts = [self.policy, *self.others.values()]
        weights = [_param_bytes(o.model, trainable_only=has_lora(o.model)) for o in opts]
        final = [_param_bytes(o.model, trainable_only=has_lora(o.model) and not merge)
                 for o in opts]
        moments = sum(2 * _param_bytes(o.model, trainable_only=True) for o in opts)
        return sum(weights) + moments, sum(final)

    def check_free_space(self) -> None:
        """Warn at the start when the first save will not fit on the run's filesystem."""
        if not self.dist.is_main:
            return
        checkpoint, final = self.save_bytes()
        if self.cfg.save_steps and checkpoint >= final:
            ckpt.warn_if_no_room(self.run_dir, checkpoint, "a checkpoint (weights + optimizer "
                                 "state)")
        else:
            ckpt.warn_if_no_room(self.run_dir, final, "final/")

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()


def _param_bytes(model: nn.Module, trainable_only: bool) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p.requires_grad or not trainable_only)
