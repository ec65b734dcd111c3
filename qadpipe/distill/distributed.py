"""torchrun plumbing for stage two: process group, DDP / FSDP2 wrapping, full state dicts.

Launched plainly (``qadpipe distill``) this is a world of one and nothing is wrapped.  Under
``torchrun`` (``RANK``/``WORLD_SIZE`` set) the process group is gloo on CPU and nccl on
GPU; the student is wrapped with DDP or FSDP2 (``fully_shard`` on every decoder layer, then
on the root), as ``distill.distributed`` says.  Under FSDP2 the student is built sharded: every
rank shards a skeleton of it on the meta device and receives its shards of the values rank 0
built on the host (:func:`load_sharded_from_main`), so a GPU holds 1/world of the fp32
weights from the start, never the whole student.

Checkpoints hold *full* (unsharded, FQN-keyed) model and optimizer state dicts, gathered
with ``torch.distributed.checkpoint.state_dict``: one format whatever the strategy or world
size, readable by ``qadpipe export`` and by a plain ``load_state_dict``; or, with
``distill.checkpoint_format: sharded``, each rank's own (:func:`local_model_state`, written by
:mod:`qadpipe.distill.sharded_checkpoint`, resharded on load).  ``--resume`` on another world
size shares out the cache rows the saved ranks had left (:mod:`qadpipe.distill.loader`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from qadpipe.devices import resolve_device
from qadpipe.errors import DistillError, QadpipeError, first_line

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


#: How long the training collectives wait for a rank (NCCL's watchdog then ends the job).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
#: How long the other ranks wait for rank 0's output write (see :func:`init_control_group`).
WRITE_TIMEOUT = datetime.timedelta(hours=12)

_control_group: Optional[Any] = None
_writer_group: Optional[Any] = None


def init_distributed(device: str) -> DistEnv:
    """Join the torchrun process group when launched by torchrun; otherwise a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, "distill.device", local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if resolved.type == "cuda":   # also alone on cuda:N: the RNG state a checkpoint keeps is the current GPU's
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        init_control_group()
        # made now, not at the first background shard write: a rank that fails before it (its
        # host copy out of memory) would leave the others waiting in new_group for the timeout
        writer_group()
    return DistEnv(rank, world_size, local_rank, resolved)


def init_control_group() -> None:
    """A gloo group, with a timeout of hours, for the one wait that may last: the other ranks
    waiting to learn whether rank 0's checkpoint or final/ write worked.  An 8B student's
    ~100 GB at a shared filesystem's 50 MB/s takes half an hour, past the training collectives'
    timeout, and a rank waiting in an NCCL all-reduce that long is ended by NCCL's watchdog
    (with the job).  A gloo wait on the host is no NCCL work: nothing times it out but this
    group, and a rank 0 that dies closes its connections, which ends the wait at once."""
    global _control_group
    _control_group = _long_wait_group()


def writer_group() -> Optional[Any]:
    """A second such group, for the shard writes that run on every rank's writer thread while
    its training thread goes on (see :mod:`qadpipe.distill.background_save`): the ranks
    exchange DCP's plans and results there, and two threads' collectives on one group would
    interleave.  Made by :func:`init_distributed` (else at first use: every rank calls); None
    in a world of one."""
    global _writer_group
    if not dist.is_initialized():
        return None
    if _writer_group is None:
        _writer_group = _long_wait_group()
    return _writer_group


def _long_wait_group() -> Any:
    """A new gloo group that connects within the collectives' timeout and then waits for hours
    (:data:`WRITE_TIMEOUT`).  Collective: every rank calls."""
    try:   # connected within the collectives' timeout: a wrong interface fails as soon as NCCL's would
        group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    except Exception as exc:   # gloo's own error types; the usual cause is the interface it picked
        raise DistillError(f"distill: cannot connect the ranks' gloo group ({first_line(exc)}); where the host names "
                           "resolve to an interface the nodes cannot reach each other on, set GLOO_SOCKET_IFNAME "
                           "(as NCCL_SOCKET_IFNAME)") from None
    dist.distributed_c10d._set_pg_timeout(WRITE_TIMEOUT, group)   # then waits for hours
    return group


def shutdown() -> None:
    global _control_group, _writer_group
    if dist.is_initialized():
        dist.destroy_process_group()   # every group, the control and writer groups too
    _control_group = _writer_group = None


def wrap(module: nn.Module, layers: nn.ModuleList, strategy: str, env: DistEnv) -> nn.Module:
    """DDP or FSDP2 around ``module`` (FSDP2 also shards each of ``layers``); as is for one process."""
    if not env.distributed:
        return module
    if strategy == "ddp":
        return DistributedDataParallel(module, device_ids=None)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    raise DistillError(f"distill.distributed: got '{strategy}', expected ddp or fsdp2")


def load_sharded_from_main(module: nn.Module, whole: Optional[nn.Module], device: torch.device, prefix: str) -> None:
    """Give ``module`` -- a skeleton on the meta device that :func:`wrap` has sharded with
    FSDP2 -- the values of ``whole``, rank 0's complete student on the host (None on the other
    ranks; its names are ``module``'s without ``prefix``).  Each rank allocates only its shards
    on ``device``, and receives them one tensor at a time (``broadcast_from_rank0``): no rank
    but 0 ever holds the whole student, and rank 0 on the host only.  Buffers the state dict
    leaves out (rotary frequencies) are rank 0's too.  Every rank must call."""
    materialize(module, device)
    state = {prefix + name: value for name, value in whole.state_dict().items()} if whole is not None else {}
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = dict(module.named_buffers())
    if whole is not None:
        with torch.no_grad():
            for name, value in whole.named_buffers():
                buffers[prefix + name].copy_(value)
    broadcast_from_main(buffers.values())


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate the meta tensors of ``module`` (a skeleton :func:`wrap` has sharded: each rank
    its own shards) on ``device``, uninitialised, for a state dict to fill; the buffers it
    already holds (what its init computed from the config: rotary frequencies) keep their values."""
    kept = {name: buffer.detach().clone() for name, buffer in module.named_buffers() if not buffer.is_meta}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in kept:
                buffer.copy_(kept[name])


def reshard(module: nn.Module) -> None:
    """Put FSDP2's shards back in ``module`` after a forward outside training (calibration, a
    held-out eval).  FSDP2 leaves the root's parameters (embeddings, final norm, head) gathered
    after a forward and reshards them in the backward; with no backward they stay gathered,
    registered as plain tensors: an optimizer built then holds those, which training never
    updates, and a state dict taken then no longer matches the optimizer's parameters."""
    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if enabled:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum/max across ranks (identity in a world of one); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_reduce_number(value: float, device: torch.device, op: str = "sum") -> float:
    """Sum/max of one number over ranks.  Its tensor lives on this rank's device: NCCL, the
    GPU backend, serves CUDA tensors only (a CPU tensor has no backend there).  In a world of
    one, no tensor at all: its ``.item()`` would make the host wait for the GPU every step."""
    if not dist.is_initialized():
        return float(value)
    return all_reduce(torch.tensor(float(value), dtype=torch.float64, device=device), op).item()


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0's values, in place, on every rank (every rank must call, with its tensors in the
    same order; nothing to do in a world of one)."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def computed_by_main(is_main: bool, compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0 and its result on every rank: one answer where ranks asking
    one by one could get different ones (a cache another job is still extending).  An error
    on rank 0 is raised on every rank, instead of leaving them waiting for its result."""
    result, failure = None, None
    if is_main:
        try:
            result = compute()
        except Exception as exc:   # raised below, on every rank
            failure = exc
    if not dist.is_initialized():
        if failure is not None:
            raise failure
        return result
    # qadpipe's errors travel as they are; any other as its one-line text (it may not pickle)
    sent = failure if isinstance(failure, QadpipeError) or failure is None else \
        f"{type(failure).__name__}: {first_line(failure)}"
    box = [(result, sent)]
    dist.broadcast_object_list(box, src=0)
    result, received = box[0]
    if failure is not None:
        raise failure
    if isinstance(received, Exception):
        raise received
    if received is not None:
        raise DistillError(f"rank 0 failed ({received}); this rank stops too")
    return result


def done_by_main(is_main: bool, work: Callable[[], T], what: str = "write its output") -> Optional[T]:
    """``work()`` on rank 0 while the other ranks wait, then every rank learns whether it
    worked: a write failing on rank 0 (a full disk) raises on all ranks, instead of leaving
    them in a barrier until the process-group timeout.  ``what`` it does, for their error line.
    Returns ``work()``'s result on rank 0, None on the others."""
    result, failure = None, None
    control_group()   # connected now, by every rank: made after rank 0's work, it would wait for it
    if is_main:
        try:
            result = work()
        except Exception as exc:   # re-raised below, once the other ranks know
            failure = exc
    raise_if_any_failed(failure, what)
    return result


def control_group() -> Optional[Any]:
    """The gloo group with hours of timeout (see :func:`init_control_group`) for waits that may
    outlast the collectives' timeout: rank 0's writes, and every rank's shard writes; None in a
    world of one."""
    if not dist.is_initialized():
        return None
    if _control_group is None:   # a process group set up by another caller than init_distributed
        init_control_group()
    return _control_group


def raise_if_any_failed(failure: Optional[BaseException], what: str = "write its output") -> None:
    """Every rank learns whether rank 0's work failed (``failure`` there): rank 0 raises its
    own error, the others one line saying it could not do ``what`` (every rank must call; they
    wait for rank 0 on the control group, see :func:`init_control_group`)."""
    failed = torch.tensor(float(failure is not None))
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=control_group())
    if failed.item():
        if failure is not None:
            raise failure
        raise DistillError(f"rank 0 could not {what} (its own error says why); this rank stops too")


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state dict on CPU (complete on rank 0; every rank must call).

    ``cpu_offload`` copies each entry on its own, so from a GPU tied parameters (embeddings and
    LM head) come back as separate CPU tensors and every checkpoint would hold the embedding
    twice (+1.2 GB for a 151936 x 2048 vocab); ties are restored from the live module."""
    state = get_model_state_dict(module, options=_FULL)
    inner = module.module if isinstance(module, DistributedDataParallel) else module   # DDP's names lack "module."
    first_name: dict[int, str] = {}
    for name, param in inner.named_parameters(remove_duplicate=False):
        kept = first_name.setdefault(id(param), name)
        if kept != name and kept in state and name in state:
            state[name] = state[kept]
    return state


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names (complete on rank 0; every rank must call)."""
    return get_optimizer_state_dict(module, optimizer, options=_FULL)


def local_model_state(module: nn.Module) -> dict[str, Any]:
    """The model state dict as this rank holds it (FSDP2: its shards, as DTensors): what a
    sharded checkpoint writes, and fills in place when read (every rank must call)."""
    return get_model_state_dict(module)


def stored_once(module: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (``module``'s :func:`local_model_state`) without the second name of a tied
    parameter (an LM head tied to the embeddings), which a sharded checkpoint would otherwise
    store twice.  Both names' tensors share the parameter's storage, so reading the first
    fills the other."""
    first: set[int] = set()
    tied = set()
    for name, param in unwrap(module).named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.add(name)
        first.add(id(param))
    return {name: value for name, value in state.items() if name not in tied}


def load_local_model_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Load a :func:`local_model_state`-shaped state (quantizers see it: an input's range marks
    it calibrated)."""
    set_model_state_dict(module, state)


def local_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as this rank holds it, keyed by parameter names (every rank must call)."""
    return get_optimizer_state_dict(module, optimizer)


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         full: bool = True) -> None:
    """Load a full optimizer state (from :func:`full_optimizer_state`) under any strategy
    (full-state loading needs a process group; a world of one loads it as is), or, not
    ``full``, one shaped by :func:`local_optimizer_state`.  The kernel choice stays this run's:
    a checkpoint from before AdamW was fused carries ``fused=None`` in its groups, which would
    otherwise switch a resumed run to the slower foreach path."""
    options = StateDictOptions(full_state_dict=full and dist.is_initialized())
    kernels = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in optimizer.param_groups]
    set_optimizer_state_dict(module, optimizer, state, options=options)
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Global gradient norm (clipped to ``max_norm`` when > 0); works on FSDP2's DTensors too."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
