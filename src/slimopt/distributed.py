"""Distributed training with slimopt: exact updates on FSDP2 shards, DDP/FSDP2 set-up, DCP checkpoints.

**Why so little communication.** FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every
parameter on dim 0 (DTensor placement ``Shard(0)``): each rank holds whole rows. A statistic over a
row (SinkGD's row norms, SCALE's per-output-row RMS) is therefore local; a statistic over dim 0
(a column sum: SAGE's column means, SinkGD's column norms, SCALE's column RMS for the embedding)
needs one all-reduce of a length-``n`` vector; a statistic over all entries (a vector's norm,
SGD-SaI's norm and standard deviation) needs one all-reduce of one or two numbers. Every other
operation of every rule is element-wise and runs on the local shard unchanged.

**How the rules use it.** The reductions a rule needs are the functions below (``column_mean``,
``column_norm``, ``norms``, ``norm_and_std``, ``global_numel``). Each takes a :class:`RowShard`
describing the parameter's global shape and the ranks that hold its other rows, or ``None`` for a
whole tensor, in which case it is exactly the plain torch reduction the rule used before. The
optimizer (:class:`slimopt.SlimOptimizer`) hands a DTensor parameter to its rule as local tensors plus
its :class:`RowShard`; see :func:`local_view`. Decisions (ndim, numel, ``sqrt(n)``, ``sqrt(m)``)
use the global shape, so every rank takes the same branch and makes the same collectives, also
when its shard is empty (a ``[1, d]`` parameter on two ranks).

Supported placements: ``Shard(0)`` (FSDP2, also on the shard dimension of an HSDP mesh) and
``Replicate()``. Anything else (``Shard(1)``, ``Partial``, a tensor-parallel strided shard) raises
:class:`PlacementError` naming the parameter and its placement.

**Around the optimizer.** :func:`setup_distributed` (torchrun environment to process group),
:func:`wrap_model` (``"ddp"`` or ``"fsdp2"``), :func:`shard_batch`, :func:`reduce_mean`, and
:func:`save_checkpoint_dcp` / :func:`load_checkpoint_dcp`, which write a
``torch.distributed.checkpoint`` directory atomically and resume it on any world size.

Example (a whole tensor: the reductions are the plain torch ones):
    >>> import torch
    >>> from slimopt.distributed import column_mean, norms
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> column_mean(x, None)
    tensor([2., 3.])
    >>> norms([x], None)[0].item()
    5.4772257804870605
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# --------------------------------------------------------------------------- placements


class PlacementError(ValueError):
    """A DTensor parameter (or gradient) whose placement slimopt's rules cannot update exactly."""


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (without importing DTensor when nothing has created one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def to_local(t: Tensor) -> Tensor:
    """A DTensor's local shard (which shares its storage); any other tensor unchanged."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class RowShard:
    """The rows of a parameter sharded on dim 0 that this rank holds.

    Attributes:
        shape: the parameter's global shape (the local rows are a contiguous slice of dim 0,
            possibly empty).
        group: the process group of the ranks that hold the other rows.
    """

    shape: torch.Size
    group: Any  # a torch.distributed.ProcessGroup

    @property
    def numel(self) -> int:
        """The global number of entries."""
        return math.prod(self.shape)


def _placement_text(placements: Sequence[Any], mesh: Any) -> str:
    shown = ", ".join(repr(p) for p in placements)
    return f"placements ({shown}) on a device mesh of shape {tuple(mesh.shape)}"


def row_shard(p: Tensor, name: str) -> RowShard | None:
    """The :class:`RowShard` of a DTensor parameter, or ``None`` when it is whole on every rank.

    Raises :class:`PlacementError` (naming ``name`` and the placement) for anything other than
    ``Replicate()`` on every mesh dimension except at most one ``Shard(0)``.
    """
    from torch.distributed.tensor import Shard

    placements, mesh = tuple(p.placements), p.device_mesh
    sharded = [i for i, pl in enumerate(placements) if not pl.is_replicate()]
    ok = len(sharded) <= 1 and all(
        type(placements[i]) is Shard and placements[i].dim == 0 for i in sharded
    )
    if not ok:
        raise PlacementError(
            f"parameter {name!r} has {_placement_text(placements, mesh)}; slimopt's rules update "
            "exactly only parameters sharded on dim 0 (Shard(0), as FSDP2 does) or replicated "
            "(Replicate()); tensor-parallel and partial placements are not supported"
        )
    if not sharded:
        return None
    return RowShard(shape=p.shape, group=mesh.get_group(sharded[0]))


@dataclass
class LocalView:
    """One DTensor parameter as its rule sees it: local tensors plus its :class:`RowShard`.

    ``state`` holds the local shards of DTensor state (updated in place, so the DTensors see the
    change) and the parameter's other state values; :meth:`write_back` returns the latter (step
    counters) to the optimizer's state.
    """

    param: Tensor
    grad: Tensor
    state: dict[str, Any]
    shard: RowShard | None
    owner: dict[str, Any]

    def write_back(self) -> None:
        """Return the rule's changes to the optimizer's state (call after the rule's step)."""
        for key, value in self.state.items():
            held = self.owner.get(key)
            if is_dtensor(held):
                local = held.to_local()
                if value is not local:  # a rule that replaced a state tensor instead of updating it
                    local.copy_(value)
            else:
                self.owner[key] = value


def check_param(p: Tensor, name: str) -> None:
    """Raise :class:`PlacementError` for a DTensor parameter or gradient the rules cannot update."""
    if not is_dtensor(p):
        if p.grad is not None and is_dtensor(p.grad):
            raise PlacementError(f"parameter {name!r} is a plain tensor but its gradient a DTensor")
        return
    row_shard(p, name)
    g = p.grad
    if g is None:
        return
    if not is_dtensor(g):
        raise PlacementError(f"parameter {name!r} is a DTensor but its gradient a plain tensor")
    if tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
        raise PlacementError(
            f"the gradient of parameter {name!r} has {_placement_text(g.placements, g.device_mesh)}"
            f" but the parameter {_placement_text(p.placements, p.device_mesh)}; "
            "reduce the gradient to the parameter's placement before the optimizer step"
        )


def local_view(p: Tensor, state: dict[str, Any], name: str) -> LocalView:
    """The local tensors of a DTensor parameter, its gradient and its state (see :class:`LocalView`)."""
    check_param(p, name)
    local_state = {k: to_local(v) for k, v in state.items()}
    return LocalView(p.to_local(), p.grad.to_local(), local_state, row_shard(p, name), state)


# How each rule runs on a shard. A reducing rule's ``reference`` takes ``shard=`` and makes its
# reductions over dim 0 or over all entries through the functions below; an element-wise rule's
# update (after SGD-SaI's ``prepare``, which takes ``shard=``) is the same on any slice of rows, so
# its ordinary path (``foreach`` or ``reference``) runs on the local tensors unchanged.
REDUCING_RULES = frozenset({"sage", "sinkgd", "scale"})
ELEMENTWISE_RULES = frozenset({"lion", "adamw", "sgd_sai"})


def step_local_views(
    rule: Any, group: dict[str, Any], views: list[LocalView], **extra: Any
) -> None:
    """One step of ``rule`` (a module of ``slimopt.algorithms``) on the local views of a group's
    DTensor parameters."""
    name = rule.NAME
    if name in REDUCING_RULES:
        for v in views:
            rule.reference(v.param, v.grad, v.state, group, shard=v.shard, **extra)
    elif name in ELEMENTWISE_RULES:
        params, grads = [v.param for v in views], [v.grad for v in views]
        states = [v.state for v in views]
        if group["foreach"]:
            rule.foreach(params, grads, states, group, **extra)
        else:
            for p, g, s in zip(params, grads, states):
                rule.reference(p, g, s, group, **extra)
    else:
        raise NotImplementedError(
            f"rule {name!r} has no sharded update; list it in slimopt.distributed.REDUCING_RULES "
            "(its reference takes shard=) or ELEMENTWISE_RULES"
        )
    for v in views:
        v.write_back()


# --------------------------------------------------------------------------- reductions
# With shard=None each function below is exactly the plain torch reduction over the whole tensor.
# With a RowShard, partial sums over the local rows are all-reduced (in float32 or wider, so that a
# bf16 parameter's statistic is not rounded once per rank) and divided by global sizes.


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _all_reduce_sum(t: Tensor, shard: RowShard) -> Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t


def global_shape(x: Tensor, shard: RowShard | None) -> torch.Size:
    """The global shape of a (possibly sharded) tensor."""
    return x.shape if shard is None else shard.shape


def global_numel(x: Tensor, shard: RowShard | None) -> int:
    """The global number of entries of a (possibly sharded) tensor."""
    return x.numel() if shard is None else shard.numel


def column_sum(X: Tensor, shard: RowShard | None) -> Tensor:
    """Sum over dim 0 of a matrix ``X`` (local rows ``[m_local, n]``): one all-reduce of n values."""
    if shard is None:
        return X.sum(dim=0)
    total = X.sum(dim=0, dtype=_acc_dtype(X))
    return _all_reduce_sum(total, shard).to(X.dtype)


def column_mean(X: Tensor, shard: RowShard | None, keepdim: bool = False) -> Tensor:
    """Mean over dim 0 of a matrix ``X`` (all ``m`` global rows)."""
    if shard is None:
        return X.mean(dim=0, keepdim=keepdim)
    mean = column_sum(X, shard) / shard.shape[0]
    return mean.unsqueeze(0) if keepdim else mean


def column_norm(X: Tensor, shard: RowShard | None, keepdim: bool = False) -> Tensor:
    """The 2-norm of each column of a matrix ``X`` (over all ``m`` global rows)."""
    if shard is None:
        return torch.linalg.vector_norm(X, dim=0, keepdim=keepdim)
    norm = column_sum(X * X, shard).sqrt()
    return norm.unsqueeze(0) if keepdim else norm


def norms(xs: Sequence[Tensor], shard: RowShard | None) -> list[Tensor]:
    """The 2-norm of each tensor over all its global entries (tensors sharded alike): one
    all-reduce of ``len(xs)`` numbers."""
    if shard is None:
        return [torch.linalg.vector_norm(x) for x in xs]
    acc = torch.promote_types(xs[0].dtype, torch.float32)
    sq = torch.stack([x.to(acc).pow(2).sum() for x in xs])
    sq = _all_reduce_sum(sq, shard).sqrt()
    return [sq[i].to(x.dtype) for i, x in enumerate(xs)]


def norm_and_std(x: Tensor, shard: RowShard | None) -> tuple[Tensor, Tensor]:
    """``(||x||_2, std(x))`` over all global entries, std unbiased (N - 1): one all-reduce of two
    float64 numbers (sum and sum of squares; float64 keeps ``sum(x**2) - sum(x)**2 / N`` exact
    enough for any float32 data)."""
    if shard is None:
        return torch.linalg.vector_norm(x), torch.std(x)
    n = shard.numel
    x64 = x.to(torch.float64)
    sums = _all_reduce_sum(torch.stack([x64.sum(), x64.pow(2).sum()]), shard)
    total, sq = sums[0], sums[1]
    var = ((sq - total * total / n) / (n - 1)).clamp(min=0.0)
    return sq.sqrt().to(x.dtype), var.sqrt().to(x.dtype)


# --------------------------------------------------------------------------- counting collectives


def _payload_bytes(arg: Any) -> int:
    if isinstance(arg, Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_payload_bytes(a) for a in arg)
    return 0


class _CollectiveCounter:
    """Created by :func:`count_collectives`; ``counts`` and ``bytes`` are keyed by collective name."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@contextmanager
def count_collectives() -> Iterator[_CollectiveCounter]:
    """Count the collectives run inside the block with ``torch.distributed``'s ``CommDebugMode``,
    and the bytes of the buffer each contributes on this rank.

    Example (no process group: nothing is communicated):
        >>> import torch
        >>> from slimopt.distributed import count_collectives
        >>> with count_collectives() as comm:
        ...     _ = torch.ones(3).sum()
        >>> comm.total, comm.total_bytes
        (0, 0)
    """
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops

    counter = _CollectiveCounter()

    class _Mode(CommDebugMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = super().__torch_dispatch__(func, types, args, kwargs)
            packet = getattr(func, "_overloadpacket", None)
            if out is not NotImplemented and (
                packet in self.comm_registry or packet in c10d_collective_ops
            ):
                name = str(packet).rsplit(".", 1)[-1]
                counter.counts[name] += 1
                counter.bytes[name] += _payload_bytes(args[0] if args else None)
            return out

    with _Mode():
        yield counter


# --------------------------------------------------------------------------- process group, models


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
        >>> from slimopt.distributed import setup_distributed
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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`wrap_model` shards separately before the root: every element of every
    ``nn.ModuleList`` that holds no other ``nn.ModuleList`` (the transformer blocks)."""
    units: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and not any(
            isinstance(m, nn.ModuleList) for child in module for m in child.modules()
        ):
            units.extend(module)
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
        mode: ``"ddp"`` (``DistributedDataParallel``: every rank holds everything, gradients are
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
    if mode not in ("ddp", "fsdp2"):
        raise ValueError(f"unknown data-parallel mode {mode!r}; expected 'ddp' or 'fsdp2'")
    if not (dist.is_available() and dist.is_initialized()):
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
        >>> from slimopt.distributed import shard_batch
        >>> shard_batch(torch.arange(8).view(4, 2), rank=1, world_size=2)
        tensor([[4, 5],
                [6, 7]])
    """
    if rank is None or world_size is None:
        rank, world_size = _world()
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


# --------------------------------------------------------------------------- DCP checkpoints

_LATEST = "latest"
_EXTRA = "extra.pt"
_META = "slimopt.json"
_FORMAT = "slimopt-dcp-checkpoint"


class CheckpointError(RuntimeError):
    """A distributed checkpoint that is missing, incomplete or unreadable."""


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    # DCP warns on every single-process save and load that it "assumes" that intent; it is ours.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _broadcast_object(obj: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    init = getattr(optimizer, "init_state", None)
    if callable(init):
        # allocate state without a step; torch's fallback would run step() with zero gradients
        init()
    return get_state_dict(model, optimizer)


def latest_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``path`` (the directory ``latest`` names), or None."""
    root = Path(path)
    try:
        name = (root / _LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    ckpt = root / name
    if not (ckpt / ".metadata").is_file() or not (ckpt / _META).is_file():
        raise CheckpointError(
            f"{root / _LATEST} names {name!r}, which is not a complete checkpoint"
        )
    return ckpt


def save_checkpoint_dcp(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
    *,
    step: int,
    keep: int = 2,
) -> Path:
    """Write model and optimizer state with ``torch.distributed.checkpoint`` (every rank writes its
    shards), atomically. Call on every rank.

    Layout: ``path/step-00000010/`` (the DCP files, ``extra.pt`` and ``slimopt.json``; a step saved
    again gets ``-1``, ``-2`` ...) and ``path/latest`` (the name of the newest complete one). The
    shards go to a temporary directory, which rank 0 renames once every rank has finished; only
    then is ``latest`` replaced (itself by a rename). A rank that dies or fails mid-write leaves
    ``latest`` naming the previous complete checkpoint; a failure on one rank raises
    :class:`CheckpointError` on every rank rather than hanging. Older checkpoints beyond ``keep``
    are removed.

    ``extra`` (rank 0's copy; tensors, numbers, strings, lists, dicts) is saved with ``torch.save``
    and returned by :func:`load_checkpoint_dcp`: the training step, the data position, the
    scheduler's ``state_dict()``.

    Works for a DDP, FSDP2 or plain model; the checkpoint loads into any of them, on any world
    size. ``path`` must be on a file system every rank sees.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    rank, world = _world()
    root = Path(path)
    # rank 0 picks a fresh directory name (a step saved twice gets a suffix, so that the complete
    # checkpoint ``latest`` names is never removed before its replacement is in place)
    plan: tuple[str, str | None] = ("", None)
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            name, suffix = f"step-{step:08d}", 0
            while (root / name).exists():
                suffix += 1
                name = f"step-{step:08d}-{suffix}"
            for stale in root.glob(".tmp-step-*"):  # left by a save that failed or was killed
                shutil.rmtree(stale, ignore_errors=True)
            (root / f".tmp-{name}").mkdir()
            plan = (name, None)
        except OSError as exc:
            plan = ("", f"cannot prepare checkpoint directory under {root}: {exc}")
    name, error = _broadcast_object(plan)
    if error:
        raise CheckpointError(error)
    tmp = root / f".tmp-{name}"

    model_sd, optim_sd = _state_dicts(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    except CheckpointException as exc:  # a BaseException: raised on every rank when one fails
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"writing checkpoint {name} under {root} failed on rank(s) "
            f"{sorted(exc.failures)}; {root / _LATEST} still names the previous checkpoint"
        ) from exc

    # dcp.save returns on every rank only after rank 0 has written .metadata for all shards
    error = None
    if rank == 0:
        try:
            _publish(root, tmp, name, extra, {"format": _FORMAT, "step": step, "world_size": world})
            _prune(root, keep, name)
        except OSError as exc:
            error = f"cannot publish checkpoint {name} under {root}: {exc}"
    error = _broadcast_object(error)
    if error:
        raise CheckpointError(error)
    return root / name


def _checkpoint_order(d: Path) -> tuple[int, int]:
    parts = d.name.split("-")  # step-00000010 or step-00000010-2
    return int(parts[1]), int(parts[2]) if len(parts) > 2 else 0


def _publish(root: Path, tmp: Path, name: str, extra: dict | None, meta: dict) -> None:
    """Complete ``tmp``, rename it to ``name``, then point ``latest`` at it (renames both)."""
    torch.save(dict(extra or {}), tmp / _EXTRA)
    (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    os.replace(tmp, root / name)
    _fsync(root)
    pointer = root / f".{_LATEST}.tmp"
    pointer.write_text(name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / _LATEST)
    _fsync(root)


def _prune(root: Path, keep: int, newest: str) -> None:
    """Remove all but the ``keep`` newest checkpoints (``newest`` is always kept)."""
    others = [d for d in root.glob("step-*") if d.is_dir() and d.name != newest]
    others.sort(key=_checkpoint_order)
    for old in others[: max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint_dcp(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load the checkpoint ``latest`` names under ``path`` (or ``path`` itself, when it is one
    checkpoint directory) into ``model`` and ``optimizer``, resharding to this run's world size and
    wrapping (DDP, FSDP2 or none). Call on every rank, after :func:`wrap_model` and after building
    the optimizer. Returns the ``extra`` dict it was saved with.

    Optimizer state is matched by parameter name; a parameter that had no state when saved (no
    gradient yet) starts without state, as it would have.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    root = Path(path)
    ckpt = root if (root / ".metadata").is_file() else latest_checkpoint(root)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint under {root} (no {_LATEST} file)")
    if not (ckpt / _META).is_file():
        raise CheckpointError(f"{ckpt} is not a complete slimopt checkpoint (no {_META})")
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_sd = get_model_state_dict(model)
        with _single_process_quiet():
            dcp.load({"model": model_sd}, checkpoint_id=str(ckpt))
        set_model_state_dict(model, model_sd)
    else:
        model_sd, optim_sd = _state_dicts(model, optimizer)
        saved = set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
        missing = _prune_unsaved_state(optim_sd, saved)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(ckpt))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(
            model, optimizer, state["optim"], options=StateDictOptions(strict=False)
        )
        if missing:
            by_name = _params_by_name(model)
            for fqn in missing:
                p = by_name.get(fqn)
                if p is not None:
                    optimizer.state.pop(p, None)
    return torch.load(ckpt / _EXTRA, weights_only=True)


def _prune_unsaved_state(optim_sd: dict, saved: set[str]) -> list[str]:
    """Drop from ``optim_sd`` the parameters whose state the checkpoint does not hold."""
    state = optim_sd.get("state", {})
    missing = [fqn for fqn in state if not any(k.startswith(f"optim.state.{fqn}.") for k in saved)]
    for fqn in missing:
        del state[fqn]
    return missing


def _params_by_name(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in unwrap(model).named_parameters()}


__all__ = [
    "CheckpointError",
    "DistInfo",
    "LocalView",
    "PlacementError",
    "RowShard",
    "check_param",
    "cleanup_distributed",
    "column_mean",
    "column_norm",
    "column_sum",
    "count_collectives",
    "default_fsdp_units",
    "global_numel",
    "global_shape",
    "is_dtensor",
    "latest_checkpoint",
    "load_checkpoint_dcp",
    "local_view",
    "norm_and_std",
    "norms",
    "reduce_mean",
    "row_shard",
    "save_checkpoint_dcp",
    "setup_distributed",
    "shard_batch",
    "to_local",
    "unwrap",
    "wrap_model",
]
