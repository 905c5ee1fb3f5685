"""Distributed training set-up: process groups, model wrapping, batch slicing, DCP checkpoints.

The sharding math the update rules need on FSDP2 shards lives in :mod:`slimopt.sharding`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

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


# The harness imports ``is_dtensor`` from here until it moves to ``slimopt.train``.
from slimopt.sharding import is_dtensor  # noqa: E402

__all__ = [
    "CheckpointError",
    "DistInfo",
    "cleanup_distributed",
    "default_fsdp_units",
    "is_dtensor",
    "latest_checkpoint",
    "load_checkpoint_dcp",
    "reduce_mean",
    "save_checkpoint_dcp",
    "setup_distributed",
    "shard_batch",
    "unwrap",
    "wrap_model",
]
