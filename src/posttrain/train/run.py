"""Run set-up shared by recipes: the run directory, resume, and loading the policy."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.models.attention import enable_packed_attention
from posttrain.models.device import pick_device
from posttrain.models.io import load_model, load_tokenizer, resize_for_tokenizer
from posttrain.models.lora import apply_lora, is_adapter_dir
from posttrain.report.instruments import INSTRUMENTS
from posttrain.train import checkpoint as ckpt
from posttrain.train import distributed as ddp
from posttrain.train.config import TrainConfig
from posttrain.train.engine import seed_everything

log = logging.getLogger("posttrain")


def prepare_run(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Create ``output_dir`` and seed; return (run_dir, checkpoint to resume from or None).

    Joins the torchrun process group when launched with several processes. The resolved
    config is written by the ``Engine``, once the recipe has made its run-time choices.
    """
    info = ddp.init_distributed()
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log.warning("resume=true but %s has no checkpoint; starting from scratch", run_dir)
    ddp.barrier(info)  # every rank has checked the directory before rank 0 writes to it
    if info.is_main:
        if resume_from is None:
            clear_run(run_dir)  # a fresh start: nothing of an earlier run may mix with it
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            step = ckpt.load_trainer_state(resume_from)["step"]
            for log_file in ("metrics.jsonl", INSTRUMENTS):
                truncate_after_step(run_dir / log_file, step)
    seed_everything(cfg.seed)
    ddp.barrier(info)
    return run_dir, resume_from


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, a run that would replace a finished run's ``final/`` or mix
    with an unfinished run's checkpoints; ``overwrite=true`` allows both."""
    if overwrite:
        return
    if (run_dir / "final").exists():
        raise PosttrainError(
            f"{run_dir} is a finished run (final/ exists); use a new output_dir, "
            "or overwrite=true to replace it"
        )
    if not resume and ckpt.list_checkpoints(run_dir):
        raise PosttrainError(
            f"output_dir '{run_dir}' already holds a run; pass resume=true to continue it, "
            "overwrite=true to replace it, or choose another output_dir"
        )


# What a run writes into its directory; a fresh start removes them and nothing else, since
# output_dir may be a directory that also holds the user's own files.
RUN_FILES = (
    "final", ".tmp-final", "checkpoints", "metrics.jsonl", INSTRUMENTS, "tensorboard",
)


def clear_run(run_dir: Path) -> None:
    """Remove an earlier run's model, checkpoints and step logs from ``run_dir``."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():  # a link is removed, not what it points to
            path.unlink()


def truncate_after_step(path: Path, step: int) -> None:
    """Drop the rows of a step-indexed JSONL log written after the checkpoint we resume from:
    they will be written again."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(f"{ln}\n" for ln in keep))


def load_policy(cfg: TrainConfig, resume_from: Path | None) -> tuple[Any, Any]:
    """(model, tokenizer) from the config's spec, or from the checkpoint when resuming."""
    # Under LoRA a checkpoint holds only the adapter: resume = base from cfg.model + adapter.
    saved = resume_from / "model" if resume_from is not None else None
    adapter = saved if saved is not None and is_adapter_dir(saved) else None
    spec = str(saved) if saved is not None and adapter is None else cfg.model
    tokenizer = load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)
    model = load_model(spec, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    resize_for_tokenizer(model, tokenizer)
    enable_packed_attention(model)
    model = apply_lora(model, cfg.lora, adapter_dir=adapter)  # unchanged when lora.r == 0
    return model.to(pick_device()), tokenizer
