"""Data parallelism for the harness; one process is the world of one.

Every function here serves one process and many alike: :func:`setup_distributed` returns a
:class:`DistInfo` of rank 0 of 1 without ``torchrun``, :func:`wrap_model` then returns the model
unchanged, :func:`shard_batch` returns the whole batch, and the reductions (:func:`reduce_mean`,
:func:`any_rank`, :func:`broadcast_object`, :func:`grad_norm`, :func:`evaluate`) are the local
value. So the training loop has one path.

Under ``torchrun`` the default process group is created from the environment, ``"ddp"`` wraps the
model in ``DistributedDataParallel`` and ``"fsdp2"`` shards it with ``fully_shard`` (dim 0 of every
parameter, which :mod:`slimopt`'s rules update exactly).

Example (one process):
    >>> import torch
    >>> from slimopt.train.parallel import setup_distributed, shard_batch, wrap_model
    >>> info = setup_distributed()
    >>> (info.rank, info.world_size), shard_batch(torch.arange(4), 0, 1).tolist()
    ((0, 1), [0, 1, 2, 3])
    >>> wrap_model(torch.nn.Linear(2, 2), "ddp").__class__.__name__
    'Linear'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` and ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that logs metrics and writes files other than checkpoint shards."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (also for a world of one under ``torchrun``)."""
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def setup_distributed(backend: str | None = None) -> DistInfo:
    """Initialize the default process group from the ``torchrun`` environment.

    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` set) this calls
    ``init_process_group`` with ``backend`` (default ``"cpu:gloo,cuda:nccl"`` when CUDA is
    available, so that CPU tensors, e.g. of FSDP2 with CPU offload, can be reduced too; else
    ``"gloo"``) and, on CUDA, selects the ``LOCAL_RANK``-th GPU. Without that environment it returns a single-process
    :class:`DistInfo` and initializes nothing. Calling it again returns the current state.

    Example:
        >>> from slimopt.train.parallel import setup_distributed
        >>> info = setup_distributed()  # no torchrun environment here
        >>> info.rank, info.world_size, info.is_main
        (0, 1, True)
    """
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend or ("cpu:gloo,cuda:nccl" if cuda else "gloo"), rank=rank, world_size=world
        )
    else:
        return DistInfo(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def cleanup_distributed() -> None:
    """Destroy the default process group if one is initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`wrap_model` shards separately before the root: every element of every
    ``nn.ModuleList`` that holds no other ``nn.ModuleList`` (the transformer blocks), and the
    input embedding and the untied output head, each alone, so that neither stays gathered for
    the whole step (the root then holds only what is left, such as the final norm)."""
    units: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and not any(
            isinstance(m, nn.ModuleList) for child in module for m in child.modules()
        ):
            units.extend(module)
    inside = {id(p) for u in units for p in u.parameters()}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    for module in (emb, head):
        if not isinstance(module, nn.Module) or module is model:
            continue
        params = list(module.parameters())
        if not params or any(id(p) in inside for p in params):
            continue  # a head tied to the embedding stays with it
        units.append(module)
        inside.update(id(p) for p in params)
    return units


def wrap_model(
    model: nn.Module,
    mode: str,
    *,
    units: Sequence[nn.Module] | None = None,
    reshard_after_forward: bool = True,
    mesh: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Make ``model`` data-parallel over the default process group.

    Args:
        model: the model, already on this rank's device, with identical weights on every rank
            (seed before building it, or load one checkpoint).
        mode: ``"none"`` (unchanged), ``"ddp"`` (``DistributedDataParallel``: every rank holds everything, gradients are
            averaged) or ``"fsdp2"`` (``fully_shard``: parameters, gradients and optimizer state
            are sharded on dim 0).
        units: for FSDP2, the modules sharded (and all-gathered) separately before the root;
            default :func:`default_fsdp_units`.
        reshard_after_forward: FSDP2's option (free the gathered weights after forward).
        mesh: an FSDP2 ``DeviceMesh`` (default: 1-D over all ranks; a 2-D one gives HSDP).
        **kwargs: passed on to ``DistributedDataParallel`` or ``fully_shard``.

    Without a process group (one process, no ``torchrun``) the model is returned unchanged, so one
    script serves both.

    Build the optimizer after wrapping (FSDP2 replaces every parameter by a DTensor), from
    ``unwrap(model)``: a DDP wrapper hides the model's ``get_output_embeddings`` from the role
    finder and adds ``module.`` to every name.

    Example (under ``torchrun``)::

        info = setup_distributed()
        torch.manual_seed(0)
        model = wrap_model(build_model().to(info.device), "fsdp2")
        opt = slimopt.create_optimizer("sage-hybrid", unwrap(model))
    """
    if mode not in ("none", "ddp", "fsdp2"):
        raise ValueError(f"unknown data-parallel mode {mode!r}; expected 'none', 'ddp' or 'fsdp2'")
    if mode == "none" or not (dist.is_available() and dist.is_initialized()):
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = None
        param = next(model.parameters(), None)
        if param is not None and param.device.type == "cuda":
            device_ids = [param.device.index]
        return DistributedDataParallel(model, device_ids=device_ids, **kwargs)
    from torch.distributed.fsdp import fully_shard

    options = {"reshard_after_forward": reshard_after_forward, "mesh": mesh, **kwargs}
    for unit in default_fsdp_units(model) if units is None else units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (FSDP2 models are not wrapped)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def shard_batch(batch: Tensor, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """This rank's equal slice of a global batch (dim 0).

    Equal slices make the average of the ranks' mean losses the mean over the global batch, which
    is what keeps a distributed run equal to one device. A batch that does not divide is an error.

    Example:
        >>> import torch
        >>> from slimopt.train.parallel import shard_batch
        >>> shard_batch(torch.arange(8).view(4, 2), rank=1, world_size=2)
        tensor([[4, 5],
                [6, 7]])
    """
    if rank is None or world_size is None:
        rank, world_size = world()
    if batch.shape[0] % world_size:
        raise ValueError(
            f"a global batch of {batch.shape[0]} sequences does not split evenly over "
            f"{world_size} ranks; use a multiple of {world_size}"
        )
    size = batch.shape[0] // world_size
    return batch[rank * size : (rank + 1) * size]


def reduce_mean(value: Tensor | float) -> float:
    """The mean of a scalar over all ranks (the value itself without a process group), e.g. the
    loss rank 0 logs."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(())
    if not (dist.is_available() and dist.is_initialized()):
        return float(t)
    device = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    t = t.to(device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def is_initialized() -> bool:
    """Whether a default process group exists (under ``torchrun``)."""
    return dist.is_available() and dist.is_initialized()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a world of one)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _reduce_device() -> str:
    return "cuda" if "nccl" in str(dist.get_backend()) else "cpu"


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a signal received by one process stops all)."""
    if not is_initialized():
        return flag
    t = torch.tensor(float(flag), device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a world of one)."""
    if is_initialized():
        dist.barrier()


def grad_norm(params: Sequence[nn.Parameter], clip: float | None) -> float:
    """The global gradient norm of ``params`` (plain, DDP or FSDP2), clipped to ``clip`` when given.

    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
    >>> grad_norm([p], None), grad_norm([p], 1.0), [round(g, 4) for g in p.grad.tolist()]
    (5.0, 5.0, [0.6, 0.8])
    """
    from slimopt.sharding import is_dtensor

    if clip:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.get_total_norm(grads)
    if is_dtensor(norm):  # FSDP2: a replicated DTensor computed from every rank's shards
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
) -> tuple[float, int]:
    """(mean next-token loss, number of predicted tokens) over the ``(x, y)`` pairs ``batches()``
    yields, dealt round-robin over the ranks, token losses and counts summed over all of them.

    Every rank makes the same number of forward passes (FSDP2 all-gathers weights in each): a rank
    short of a batch repeats its first one and discards it. In a world of one this is the plain
    mean over all batches.

    >>> class Uniform(torch.nn.Module):
    ...     def forward(self, input_ids):
    ...         return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 4)})()
    >>> x = torch.zeros(2, 3, dtype=torch.long)
    >>> loss, n = evaluate(Uniform(), lambda: [(x, x)])
    >>> round(loss, 4), n
    (1.3863, 6)
    """
    import contextlib

    rank, world_size = world()
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    first, passes, n_batches = None, 0, 0
    for i, (x, y) in enumerate(batches()):
        n_batches += 1
        if i % world_size != rank:
            continue
        first = x if first is None else first
        with autocast():
            logits = model(input_ids=x.to(device)).logits
        y = y.to(device)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums[0] += loss.item()
        sums[1] += y.numel()
        passes += 1
    spare = first if first is not None else torch.zeros(1, 1, dtype=torch.long)
    for _ in range(passes, -(-n_batches // world_size)):
        with autocast():
            model(input_ids=spare.to(device))
    model.train(was_training)
    if is_initialized():
        sums = sums.to(_reduce_device())
        dist.all_reduce(sums)
    total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1), count


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state on the CPU on rank 0 (FSDP2 shards gathered; empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_initialized():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


__all__ = [
    "DistInfo",
    "any_rank",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "default_fsdp_units",
    "evaluate",
    "full_state_dict",
    "grad_norm",
    "is_initialized",
    "reduce_mean",
    "setup_distributed",
    "shard_batch",
    "unwrap",
    "world",
    "wrap_model",
]
