"""FSDP2 (``strategy=fsdp2``): parameters, gradients and AdamW states sharded over the ranks.

``fully_shard`` is applied to each decoder layer, then to the root (embeddings, final norm,
LM head): a layer's full weights exist only while it runs (all-gathered before its forward and
again for its backward) and gradients are reduce-scattered, averaged over ranks like DDP's,
so the engine's loss scaling and normaliser are the same for both strategies. ``precision=
bf16`` computes in bf16 and reduces gradients in fp32 (the sharded fp32 weights stay the
master copy); ``cpu_offload=true`` keeps the shards and the optimizer step on the CPU.

Checkpoints of a sharded run are ``torch.distributed.checkpoint`` (DCP) directories: every rank
writes its own shards, and DCP re-shards on load, so a run resumes on another world size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
from torch.distributed.tensor import DTensor

from posttrain.errors import TrainingError
from posttrain.models.lora import has_lora

log = logging.getLogger("posttrain")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class HF lists in ``_no_split_modules`` (the
    decoder layer of every HF causal LM), found through LoRA/peft wrappers too."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise TrainingError(f"strategy=fsdp2: found no decoder layers in {type(model).__name__} "
                            "(its _no_split_modules names none); use strategy=ddp")
    return layers


def mixed_precision(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction when ``precision=bf16`` and the device runs
    bf16 (the same test as the engine's autocast); fp32 throughout otherwise."""
    bf16 = precision == "bf16" and not (device.type == "cuda" and
                                        not torch.cuda.is_bf16_supported())
    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: nn.Module, precision: str, cpu_offload: bool) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root; ``model`` is changed in place (its
    parameters become DTensor shards) and returned."""
    if isinstance(model, FSDPModule):
        return model
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"mp_policy": mixed_precision(precision, device)}
    if cpu_offload and device.type == "cpu":
        log.warning("cpu_offload=true has no effect: the model already trains on the CPU")
    elif cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    _route_body_calls(model)
    return model


def _route_body_calls(model: nn.Module) -> None:
    """Recipes call a model's body directly, then a head on the positions they need
    (``models/completion.py``, ``models/reward.py``): such a call runs the root's FSDP2
    forward hooks, as if the root's own forward wrapped it. The root's weights (embeddings,
    final norm, heads) are then gathered for the head, its gradients reduce-scattered at the
    end of the backward, as in a root forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if not isinstance(body, nn.Module) or body is model:
        return
    state = model._get_fsdp_state()  # type: ignore[operator]
    routed: list[bool] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        nested = state._training_state == TrainingState.FORWARD  # inside the root's forward
        routed.append(not nested)
        return (args, kwargs) if nested else state._pre_forward(model, args, kwargs)

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return state._post_forward(model, args, output) if routed.pop() else output

    body.register_forward_pre_hook(pre, with_kwargs=True)
    body.register_forward_hook(post, with_kwargs=True)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """Inside the block, backward reduce-scatters gradients only if ``sync`` (the last
    micro-batch of a step): the others accumulate locally, as DDP's ``no_sync``."""
    if not is_sharded(model) or sync:
        return nullcontext()
    return _no_sync(model)


@contextmanager
def _no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the full weights stay gathered on every rank, so forwards need no
    collective and ranks may run different numbers of them (sampling completions of different
    lengths, an evaluation on rank 0 alone). Every rank must enter the block."""
    mods = _fsdp_modules(model)
    if not mods:
        yield model
        return
    for m in mods:
        m.unshard()  # type: ignore[operator]
        m.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()  # type: ignore[operator]
            m.set_reshard_after_forward(True, recurse=False)  # type: ignore[operator]


def full_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s total norm as a float (over sharded gradients it is a DTensor)."""
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered to rank 0's CPU (other ranks get an empty dict).
    Every rank must call it. A tied weight (LM head = embeddings) is kept under its first
    name only, as ``save_pretrained`` of the unsharded model writes it."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    for name in tied_aliases(model):
        state.pop(name, None)
    return state


def tied_aliases(model: nn.Module) -> list[str]:
    """Every name of a parameter after its first (the same Parameter in several modules)."""
    seen: set[int] = set()
    aliases = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.append(name)
        seen.add(id(p))
    return aliases


def model_state_options(model: nn.Module) -> StateDictOptions:
    # Under LoRA the frozen base is the starting model, reloaded on resume: save the adapter
    # (loading then leaves the base as it is; set_state_dict checks the adapter keys).
    lora = has_lora(model)
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def save_sharded(path: Path, parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> None:
    """Each named (model, optimizer)'s state into the DCP directory ``path`` (every rank
    writes its shards; every rank must call it)."""
    state: dict[str, Any] = {}
    for name, (model, optimizer) in parts.items():
        msd, osd = get_state_dict(model, optimizer, options=model_state_options(model))
        state[name] = {"model": msd, "optim": osd}
    dcp.save(state, checkpoint_id=str(path), process_group=_group())


def load_sharded(path: Path, parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> None:
    """Load what ``save_sharded`` wrote, re-sharded to this run's world size (or into plain
    unsharded models)."""
    state: dict[str, Any] = {}
    for name, (model, optimizer) in parts.items():
        msd, osd = get_state_dict(model, optimizer, options=model_state_options(model))
        state[name] = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path), process_group=_group())
    for name, (model, optimizer) in parts.items():
        keys = set_state_dict(model, optimizer, model_state_dict=state[name]["model"],
                              optim_state_dict=state[name]["optim"],
                              options=model_state_options(model))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        if trained & set(keys.missing_keys):
            raise TrainingError(f"{path}: no saved weights for the trained parameters "
                                f"{sorted(trained & set(keys.missing_keys))[:3]} of {name}")


def load_replica_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                           saved: dict[str, Any]) -> None:
    """Load an unsharded optimizer's ``state_dict`` (a ``strategy=ddp`` checkpoint: states by
    parameter index) into the optimizer of the sharded ``model``: each rank keeps its shard."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if len(names) != len(saved["state"]) and saved["state"]:
        raise TrainingError(f"the checkpoint's optimizer has states for {len(saved['state'])} "
                            f"parameters, the model trains {len(names)}")
    by_name = {
        "state": {names[int(i)]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                         for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def _group() -> dist.ProcessGroup | None:
    return dist.group.WORLD if dist.is_initialized() else None
