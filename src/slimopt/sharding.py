"""The sharding math the update rules need on FSDP2 shards: placements, local views, and the few
global reductions, batched across parameters.

**Why so little communication.** FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every
parameter on dim 0 (DTensor placement ``Shard(0)``): each rank holds whole rows. A statistic over a
row (SinkGD's row norms, SCALE's per-output-row RMS) is therefore local; a statistic over dim 0
(a column sum: SAGE's column means, SinkGD's column norms, SCALE's column RMS for the embedding)
needs an all-reduce of a length-``n`` vector; a statistic over all entries (a vector's norm,
SGD-SaI's norm and standard deviation) needs an all-reduce of one or two numbers. Every other
operation of every rule is element-wise and runs on the local shard unchanged.

**How the rules use it.** The reductions a rule needs are the functions below (``column_mean``,
``column_norm``, ``norms``, ``norm_and_std``, ``global_numel``). Each takes a :class:`RowShard`
describing the parameter's global shape and the ranks that hold its other rows, or ``None`` for a
whole tensor, in which case it is exactly the plain torch reduction. The optimizer
(:class:`slimopt.SlimOptimizer`) hands a DTensor parameter to its rule as local tensors plus its
:class:`RowShard` (see :func:`local_view`), and each rule declares how it runs on shards
(``Rule.sharded``). Decisions (ndim, numel, ``sqrt(n)``, ``sqrt(m)``) use the global shape, so every
rank takes the same branch and makes the same collectives, also when its shard is empty.

Supported placements: ``Shard(0)`` (FSDP2, also on the shard dimension of an HSDP mesh) and
``Replicate()``. Anything else (``Shard(1)``, ``Partial``, a tensor-parallel strided shard) raises
:class:`PlacementError` naming the parameter and its placement.

Example (a whole tensor: the reductions are the plain torch ones):
    >>> import torch
    >>> from slimopt.sharding import column_mean, norms
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> column_mean(x, None)
    tensor([2., 3.])
    >>> norms([x], None)[0].item()
    5.4772257804870605
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

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
    # the global index (row-major, in the whole tensor) of this rank's first local element: where
    # a bf16 shard's stochastic-rounding bits start (slimopt.rounding)
    offset: int = 0

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
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, start = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    offset = int(start[0]) * math.prod(p.shape[1:]) if p.ndim else 0
    return RowShard(shape=p.shape, group=mesh.get_group(sharded[0]), offset=offset)


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
            elif (
                isinstance(held, Tensor)
                and isinstance(value, Tensor)
                and value is not held
                and value.shape == held.shape
            ):  # a replaced or working copy (fp32 for a bf16 state): keep the state's own dtype
                held.copy_(value)
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
        >>> from slimopt.sharding import count_collectives
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


# --------------------------------------------------------------------------- batched reductions
class Reduction:
    """Partial sums of many parameters, all-reduced together: :meth:`run` makes one all-reduce
    per process group and dtype, however many parameters contributed (FSDP2 gives every
    parameter the same group). A rule's batched sharded step adds every parameter's partial sums,
    runs once, and reads each parameter's global sums back by index.

    Example (no shard: nothing to reduce, the partial sums are the global ones):
        >>> import torch
        >>> red = Reduction()
        >>> i = red.add(torch.tensor([1.0, 2.0]), None)
        >>> red.run()[i]
        tensor([1., 2.])
    """

    def __init__(self) -> None:
        self._parts: list[tuple[Tensor, RowShard | None]] = []

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, partial: Tensor, shard: RowShard | None) -> int:
        """Queue ``partial`` (this rank's sums) for the all-reduce of ``shard``'s group."""
        self._parts.append((partial, shard))
        return len(self._parts) - 1

    def run(self) -> list[Tensor]:
        """The global sums, in the order they were added."""
        out = [t for t, _ in self._parts]
        buckets: dict[tuple[int, torch.dtype, torch.device], list[int]] = defaultdict(list)
        for i, (t, shard) in enumerate(self._parts):
            if shard is not None:
                buckets[(id(shard.group), t.dtype, t.device)].append(i)
        for members in buckets.values():
            group = self._parts[members[0]][1].group
            flat = torch.cat([self._parts[i][0].reshape(-1) for i in members])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            for i, part in zip(members, flat.split([self._parts[i][0].numel() for i in members])):
                out[i] = part.view_as(self._parts[i][0])
        self._parts = []
        return out


def acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype a sharded statistic of ``x`` is summed in (float32 or wider)."""
    return _acc_dtype(x)
