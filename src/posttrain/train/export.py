"""``posttrain export``: a checkpoint as one HF model directory, on demand.

A ``strategy=fsdp2`` checkpoint holds the policy as ``torch.distributed.checkpoint`` shards
(``checkpoints/step-N/sharded``), which transformers and vLLM cannot load. Export rebuilds the
run's starting model (its ``config.yaml``: model, LoRA settings), loads the policy's shards
into it in one process (DCP re-shards to any world size, one included), and saves it with
its tokenizer, as ``final/`` is saved (under LoRA the adapter, or the merged model with
``lora.merge``). A ``strategy=ddp`` checkpoint already holds an HF directory (``model/``):
export copies it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from posttrain.errors import ConfigError
from posttrain.train import checkpoint as ckpt

log = logging.getLogger("posttrain")

# The run's options that decide what model the shards fit.
_MODEL_KEYS = ("model", "lora", "seed", "trust_remote_code")


def find_checkpoint(source: Path) -> Path:
    """``source`` itself when it is a checkpoint, else its run's newest intact one."""
    if (source / ckpt.STATE_FILE).is_file():
        return source
    if not source.is_dir():
        raise ConfigError(f"{source}: no such run directory or checkpoint")
    latest = ckpt.latest_checkpoint(source)
    if latest is None:
        raise ConfigError(f"{source}: no checkpoint to export (a run directory with "
                          f"checkpoints/step-N, or one checkpoint directory)")
    return latest


def export_checkpoint(source: Path, out: Path) -> Path:
    """Write the policy of ``source`` (a run directory or a checkpoint) to ``out``."""
    path = find_checkpoint(Path(source))
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: not empty; export writes a new model directory")
    if not ckpt.is_sharded(path):
        shutil.copytree(path / "model", out, dirs_exist_ok=True)
        log.info("export: copied %s to %s", path / "model", out)
        return out
    _export_sharded(path, out)
    log.info("export: gathered %s into %s", path / ckpt.SHARDED_DIR, out)
    return out


def _export_sharded(path: Path, out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    from posttrain.models.lora import save_pretrained_for_run
    from posttrain.train.fsdp import model_state_options
    from posttrain.train.policy import load_policy

    cfg = run_config(path.parent.parent)
    model, tokenizer = load_policy(cfg, None)
    options = model_state_options(model)
    state = {"policy": {"model": get_model_state_dict(model, options=options)}}
    dcp.load(state, checkpoint_id=str(path / ckpt.SHARDED_DIR))
    set_model_state_dict(model, state["policy"]["model"], options=options)
    save_pretrained_for_run(model.cpu(), tokenizer, out, merge=cfg.lora.merge)


def run_config(run_dir: Path) -> object:
    """The run's model options (``config.yaml``) as a ``TrainConfig``."""
    from posttrain.config.loader import config_from_dict
    from posttrain.train.config import TrainConfig

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: missing; export needs the run's config to rebuild its "
                          f"model")
    saved = yaml.safe_load(path.read_text()) or {}
    return config_from_dict(TrainConfig, {k: saved[k] for k in _MODEL_KEYS if k in saved})


def export_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="posttrain export", description=(
        "write a checkpoint (a sharded fsdp2 one too) as one HF model directory"))
    p.add_argument("source", help="a run directory (its newest checkpoint) or a checkpoint "
                                  "(RUN/checkpoints/step-N)")
    p.add_argument("output_dir", help="the new model directory (must not exist or be empty)")
    a = p.parse_args(argv)
    print(export_checkpoint(Path(a.source), Path(a.output_dir)))
    return 0
