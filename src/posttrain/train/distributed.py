"""Multi-process data parallelism on PyTorch's own engine: torchrun + DDP or FSDP2.

``torchrun --nproc_per_node N -m posttrain.cli sft ...`` runs N ranks; each takes a disjoint
slice of every global batch (``BatchStream`` with ``rank``/``world_size``), the loss normaliser
is summed over ranks, and DDP (or FSDP2's reduce-scatter, ``train/fsdp.py``) averages
gradients. Rank 0 alone logs and writes the HF export.

A rank that dies or stalls must not leave the others waiting forever: the process group is
created with ``dist_timeout`` seconds, so a collective that a peer never joins fails; each
rank records the step it is on in the rendezvous store, so the error names the rank that fell
behind (``peer_failure``). torchrun then stops the remaining workers and exits non-zero.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from posttrain.errors import TrainingError

log = logging.getLogger("posttrain")

# Test hook: "exit@R:N" makes rank R exit (as if killed) when it starts step N, "hang@R:N"
# makes it stall there; used by the tests of failure handling, never set in a real run.
FAULT_ENV = "POSTTRAIN_FAULT"
_STEP_KEY = "posttrain/step/{}"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float = 1800.0, need_group: bool = False) -> DistInfo:
    """Join the process group torchrun set up, with collectives that fail after
    ``timeout_s`` seconds. One process: nothing, unless ``need_group`` (FSDP2 shards over a
    device mesh, which needs a process group even of one rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not need_group:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if world <= 1:  # no torchrun rendezvous: an in-memory store for the single rank
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
            atexit.register(_destroy)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return current()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def all_reduce_sum(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_max(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_tensor(t: torch.Tensor, info: DistInfo, device: torch.device,
                      op: str = "sum") -> torch.Tensor:
    """The elementwise sum (or ``op="max"``) of ``t`` over ranks, reduced on ``device``
    (NCCL reduces only CUDA tensors) and returned on ``t``'s device; ``t`` itself on one
    process."""
    if not info.enabled:
        return t
    out = t.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out.to(t.device)


def all_gather_object(obj: object, info: DistInfo) -> list[object]:
    """Every rank's ``obj``, in rank order."""
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if torch.cuda.is_available() else None
    wrapped = DistributedDataParallel(model, device_ids=ids)
    _route_body_calls(wrapped)
    return wrapped


def _route_body_calls(wrapped: nn.Module) -> None:
    """Recipes may call the model's body directly, then a head on the positions they need
    (a reward model's score head, ``models/reward.py``): such a call with gradients runs
    DDP's forward bookkeeping (gradient sync on the backward), as if DDP's own forward
    wrapped it."""
    inner = wrapped.module
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if not isinstance(body, nn.Module) or body is inner:
        return
    depth: list[int] = [0]  # > 0 inside DDP's own forward: nothing to add
    routed: list[bool] = []

    def enter(*_: object) -> None:
        depth[0] += 1

    def leave(*_: object) -> None:
        depth[0] -= 1

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # Forwards without gradients (evaluation, possibly on rank 0 alone) stay local.
        routed.append(depth[0] == 0 and torch.is_grad_enabled())
        return wrapped._pre_forward(*args, **kwargs) if routed[-1] else (args, kwargs)

    def post(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        return wrapped._post_forward(output) if routed.pop() else output

    wrapped.register_forward_pre_hook(enter)
    wrapped.register_forward_hook(leave, always_call=True)
    body.register_forward_pre_hook(pre, with_kwargs=True)
    body.register_forward_hook(post, with_kwargs=True)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---- ranks that die or stall ------------------------------------------------------------------


def mark_step(info: DistInfo, step: int) -> None:
    """Record in the rendezvous store that this rank starts ``step`` (one small write per
    step), so that a failed collective can tell which rank fell behind."""
    _inject_fault(info, step)
    if info.enabled:
        _store().set(_STEP_KEY.format(info.rank), str(step))


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def peer_steps(info: DistInfo, wait_s: float = 5.0) -> dict[int, int | None]:
    """The step each rank last started (None: never recorded, or the store is gone)."""
    store = _store()
    store.set_timeout(timedelta(seconds=wait_s))
    out: dict[int, int | None] = {}
    for r in range(info.world_size):
        key = _STEP_KEY.format(r)
        try:
            out[r] = int(store.get(key)) if store.check([key]) else None
        except Exception:  # rank 0 hosts the store: if it died, nothing can be read
            out[r] = None
    return out


def describe_peers(info: DistInfo, step: int) -> str:
    """Which ranks are behind this one, from the steps they recorded."""
    try:
        steps = peer_steps(info)
    except Exception:
        return "the rendezvous store is unreachable (rank 0, which hosts it, may have died)"
    behind = [r for r, s in steps.items() if r != info.rank and (s is None or s < step)]
    if not behind:
        return "every rank reached this step: a rank died or stalled inside it"
    where = ", ".join(f"rank {r} at step {steps[r]}" if steps[r] is not None
                      else f"rank {r} (step unknown)" for r in behind)
    return f"{where} (this rank: step {step}): that rank died or stalled"


def _is_comm_failure(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Timed out", "timed out", "Connection",
                            "connection"))


@contextmanager
def peer_failure(info: DistInfo, step: int, what: str, timeout_s: float) -> Iterator[None]:
    """Turn a collective that failed because another rank died or stalled into one
    TrainingError naming the rank(s) behind, instead of a backend traceback."""
    try:
        yield
    except Exception as e:
        if not info.enabled or not _is_comm_failure(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"rank {info.rank}: {what} failed waiting for the other ranks (dist_timeout="
            f"{timeout_s:g}s): {describe_peers(info, step)}; backend said: {first}") from e


def _inject_fault(info: DistInfo, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, _, where = spec.partition("@")
    rank, _, at = where.partition(":")
    if int(rank) != info.rank or int(at) != step:
        return
    log.warning("%s=%s: rank %d %s at step %d", FAULT_ENV, spec, info.rank, kind, step)
    if kind == "exit":
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a stalled process still dies when killed
    while True:
        time.sleep(60)
