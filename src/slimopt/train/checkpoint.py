"""Checkpoints of a run: ``torch.distributed.checkpoint`` directories, atomic, verified, kept K deep.

One format for every world size, one process included. Layout inside the run directory::

    checkpoints/step-00000200/   the DCP files (``.metadata``, one ``.distcp`` per rank),
                                 ``extra.pt`` (step, schedule, data position, RNG states) and
                                 ``slimopt.json`` (step, world size, the run's fingerprint and the
                                 sha256 of every file)
    checkpoints/latest           the name of the newest complete checkpoint

A save writes a temporary directory (every rank its shards), which rank 0 completes, fsyncs and
renames (``os.replace``) before it replaces ``latest`` (itself by a rename), so a process killed at
any moment leaves ``latest`` naming a complete checkpoint. The ``keep`` newest are kept.

A load verifies the newest checkpoint (``slimopt.json`` readable, every file's sha256) and, when it
is damaged, warns and falls back to the one before it. A checkpoint of a different run (its
fingerprint differs: model, optimizer, data, tokenizer, schedule, seed ...) is refused with a
``CheckpointError`` naming the differing settings; it is never skipped silently. Any world size
loads any checkpoint (DCP reshards).

>>> import tempfile, torch
>>> run = tempfile.mkdtemp()
>>> model = torch.nn.Linear(2, 2)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> save_checkpoint(run, model, opt, {"step": 3}, step=3, fingerprint={"seed": 0}).name
'step-00000003'
>>> load_checkpoint(run, model, opt, fingerprint={"seed": 0})["step"]
3
>>> load_checkpoint(run, model, opt, fingerprint={"seed": 1})
Traceback (most recent call last):
...
slimopt.train.checkpoint.CheckpointError: ... seed: checkpoint 0, this run 1
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimopt.train.parallel import broadcast_object, unwrap, world

FORMAT = "slimopt-dcp-checkpoint"
VERSION = 2
_DIR = "checkpoints"
_LATEST = "latest"
_EXTRA = "extra.pt"
_META = "slimopt.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt, from a different run, or not writable."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (disk full, read-only, a rank failed); the previous
    one is intact."""


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / _DIR


def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """Whether the run directory holds at least one complete checkpoint."""
    return bool(_complete(checkpoint_dir(run_dir)))


# ----------------------------------------------------------------------------- small helpers


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    # DCP warns on every single-process save and load that it "assumes" that intent; it is ours.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 4 MB blocks (checkpoints, the token cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(value, sort_keys=True))


def _describe_mismatch(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> str:
    """The settings that differ, nested ones by their dotted path (``model.dtype``), each once."""
    parts = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<unset>"), current.get(k, "<unset>")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(_describe_mismatch(a, b, f"{prefix}{k}."))
        else:
            parts.append(f"{prefix}{k}: checkpoint {a!r}, this run {b!r}")
    return "; ".join(parts)


def _order(d: Path) -> tuple[int, int]:
    parts = d.name.split("-")  # step-00000010 or step-00000010-2 (the same step saved again)
    try:
        return int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        return -1, -1


def _complete(root: Path) -> list[Path]:
    """The checkpoints under ``root`` that finished writing, newest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step-*") if (d / _META).is_file() and _order(d)[0] >= 0]
    return sorted(found, key=_order, reverse=True)


def _failure_reason(exc: BaseException) -> str:
    """The first OSError inside DCP's per-rank failures, as ``reason (path)``; else the text."""
    failures = getattr(exc, "failures", None) or {}
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        while inner is not None and not isinstance(inner, OSError):
            inner = inner.__cause__ or inner.__context__
        if isinstance(inner, OSError):
            return _os_reason(inner)
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{reason} ({exc.filename})" if exc.filename else reason


# ----------------------------------------------------------------------------- DCP directories


def latest_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``path/latest`` names, or None when there is no ``latest``."""
    root = Path(path)
    try:
        name = (root / _LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    ckpt = root / name
    if (
        not name
        or "/" in name
        or not (ckpt / ".metadata").is_file()
        or not (ckpt / _META).is_file()
    ):
        raise CheckpointError(
            f"{root / _LATEST} names {name!r}, which is not a complete checkpoint"
        )
    return ckpt


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    init = getattr(optimizer, "init_state", None)
    if callable(init):
        # allocate state without a step; torch's fallback would run step() with zero gradients
        init()
    return get_state_dict(model, optimizer)


def save_checkpoint_dcp(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
    *,
    step: int,
    keep: int = 2,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write model and optimizer state with ``torch.distributed.checkpoint`` (every rank writes its
    shards), atomically, under ``path``; call on every rank (one process is a world of one).

    Layout: ``path/step-00000010/`` (the DCP files, ``extra.pt`` and ``slimopt.json``; a step saved
    again gets ``-1``, ``-2`` ...) and ``path/latest``. The shards go to a temporary directory,
    which rank 0 renames once every rank has finished; only then is ``latest`` replaced. A rank that
    dies or fails mid-write leaves ``latest`` naming the previous complete checkpoint; a failure
    on one rank raises :class:`CheckpointError` on every rank (naming the path and the reason)
    rather than hanging. All but the ``keep`` newest checkpoints are removed.

    ``extra`` (rank 0's copy; tensors, numbers, strings, lists, dicts) is saved with ``torch.save``
    and returned by :func:`load_checkpoint_dcp`; ``meta`` (JSON) goes into ``slimopt.json``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    rank, world_size = world()
    root = Path(path)
    previous = f"{root / _LATEST} still names the previous checkpoint"
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
            plan = ("", f"cannot write a checkpoint under {root}: {_os_reason(exc)}; {previous}")
    name, error = broadcast_object(plan)
    if error:
        raise CheckpointWriteError(error)
    tmp = root / f".tmp-{name}"

    model_sd, optim_sd = _state_dicts(model, optimizer)
    try:
        with _single_process_quiet():
            # each rank fsyncs its own shards; alone, rank 0's fsync of every file in _publish suffices
            writer = dcp.FileSystemWriter(str(tmp), sync_files=world_size > 1)
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
    except CheckpointException as exc:  # a BaseException: raised on every rank when one fails
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"cannot write checkpoint {root / name} (rank(s) {sorted(exc.failures)}): "
            f"{_failure_reason(exc)}; {previous}"
        ) from exc

    # dcp.save returns on every rank only after rank 0 has written .metadata for all shards
    error = None
    if rank == 0:
        try:
            info = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size}
            _publish(root, tmp, name, extra, {**info, **(meta or {})})
            _prune(root, keep, name)
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as either
            shutil.rmtree(tmp, ignore_errors=True)
            reason = _os_reason(exc) if isinstance(exc, OSError) else _failure_reason(exc)
            error = f"cannot write checkpoint {root / name}: {reason}; {previous}"
    error = broadcast_object(error)
    if error:
        raise CheckpointWriteError(error)
    return root / name


def _publish(root: Path, tmp: Path, name: str, extra: dict | None, meta: dict) -> None:
    """Complete ``tmp``, rename it to ``name``, then point ``latest`` at it (renames both)."""
    with open(tmp / _EXTRA, "wb") as fh:
        torch.save(dict(extra or {}), fh)
    files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / _META).write_text(json.dumps({**meta, "files": files}, indent=1) + "\n")
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
    others.sort(key=_order)
    for old in others[: max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint_dcp(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load the checkpoint ``latest`` names under ``path`` (or ``path`` itself, when it is one
    checkpoint directory) into ``model`` and ``optimizer``, resharding to this run's world size and
    wrapping (DDP, FSDP2 or none). Call on every rank, after wrapping the model and building the
    optimizer. Returns the ``extra`` dict it was saved with.

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
        _check_rounding_scheme(ckpt, saved)
        missing = _prune_unsaved_state(optim_sd, saved)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(ckpt))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(
            model, optimizer, state["optim"], options=StateDictOptions(strict=False)
        )
        _load_int8_state(model, optimizer, state["optim"])
        if missing:
            by_name = dict(unwrap(model).named_parameters())
            for fqn in missing:
                p = by_name.get(fqn)
                if p is not None:
                    optimizer.state.pop(p, None)
    return torch.load(ckpt / _EXTRA, weights_only=True)


def _load_int8_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict) -> None:
    """The loaded state of int8 weights (slimopt.quant), which torch's
    ``set_optimizer_state_dict`` passes over (it loads only parameters that require grad)."""
    from slimopt.quant import is_quantized

    loaded = optim_sd.get("state", {})
    for fqn, p in unwrap(model).named_parameters():
        if is_quantized(p) and fqn in loaded:
            optimizer.state[p].clear()
            optimizer.state[p].update(
                {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in loaded[fqn].items()}
            )


def _check_rounding_scheme(ckpt: Path, saved: set[str]) -> None:
    """Refuse a checkpoint whose bf16 parameters were rounded with the generator used before the
    counter-based bits (their states have ``sr_seed`` but no ``sr_scheme``)."""
    seeded = {k.rsplit(".", 1)[0] for k in saved if k.endswith(".sr_seed")}
    schemed = {k.rsplit(".", 1)[0] for k in saved if k.endswith(".sr_scheme")}
    if seeded - schemed:
        raise CheckpointError(
            f"{ckpt} was written by a slimopt before the counter-based stochastic rounding "
            "(its bf16 parameters' states have sr_seed but no sr_scheme): resuming it would "
            "silently change the rounding bits; finish the run with the slimopt version that "
            "wrote it, or start a new run"
        )


def _prune_unsaved_state(optim_sd: dict, saved: set[str]) -> list[str]:
    """Drop from ``optim_sd`` the parameters whose state the checkpoint does not hold."""
    state = optim_sd.get("state", {})
    missing = [fqn for fqn in state if not any(k.startswith(f"optim.state.{fqn}.") for k in saved)]
    for fqn in missing:
        del state[fqn]
    return missing


# ----------------------------------------------------------------------------- a run's checkpoints


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    *,
    step: int,
    fingerprint: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Save the run's state at ``step`` as its newest checkpoint (every rank calls this)."""
    return save_checkpoint_dcp(
        checkpoint_dir(run_dir), model, optimizer, extra, step=step, keep=keep,
        meta={"fingerprint": _as_json(fingerprint)},
    )  # fmt: skip


def _verify(ckpt: Path) -> dict[str, Any]:
    """``slimopt.json`` of ``ckpt`` after checking every file it lists; CheckpointError if not."""
    try:
        meta = json.loads((ckpt / _META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} has no readable {_META}: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt} is format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this slimopt reads {FORMAT!r} version {VERSION}"
        )
    files = meta.get("files") or {}
    if ".metadata" not in files or _EXTRA not in files:
        raise CheckpointError(f"checkpoint {ckpt}: {_META} lists no DCP metadata or {_EXTRA}")
    for fname, digest in files.items():
        f = ckpt / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {fname} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt (its sha256 does not match)")
    return meta


def _choose(
    root: Path, fingerprint: dict[str, Any], warn: Callable[[str], Any]
) -> tuple[Path | None, str | None]:
    """(newest intact checkpoint, None) or (None, error); runs on rank 0."""
    named: Path | None = None
    try:
        named = latest_checkpoint(root)
    except CheckpointError as exc:
        warn(f"warning: {exc}")
    candidates = _complete(root)
    if named is not None and named in candidates:  # the one ``latest`` names goes first
        candidates.remove(named)
        candidates.insert(0, named)
    if not candidates:
        if (root / _LATEST).exists() or any(root.glob("step-*")):  # never start over silently
            return None, (
                f"{root} holds checkpoints but none this slimopt can read (each needs "
                f"{_META}; a run saved by an older slimopt, or damaged); pass --overwrite to "
                "start over"
            )
        return None, None
    current = _as_json(fingerprint)
    problems = []
    for ckpt in candidates:
        try:
            meta = _verify(ckpt)
        except CheckpointError as exc:
            problems.append(str(exc))
            warn(f"warning: {exc}; trying the checkpoint before it")
            continue
        if meta.get("fingerprint") != current:
            return None, (
                f"checkpoint {ckpt} belongs to a different run: "
                + _describe_mismatch(meta.get("fingerprint") or {}, current)
            )
        return ckpt, None
    return None, f"no intact checkpoint in {root}: " + "; ".join(problems)


def load_checkpoint(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    fingerprint: dict[str, Any],
    warn: Callable[[str], Any] = print,
) -> dict[str, Any] | None:
    """Load the newest intact checkpoint of the run into ``model`` and ``optimizer`` (every rank
    calls this) and return its ``extra`` dict; None when the run has no checkpoint.

    A damaged checkpoint is reported through ``warn`` and the one before it tried; a checkpoint of
    a different run raises :class:`CheckpointError` naming the differing settings.
    """
    root = checkpoint_dir(run_dir)
    rank, _ = world()
    chosen: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        found, error = _choose(root, fingerprint, warn)
        chosen = (str(found) if found else None, error)
    found_name, error = broadcast_object(chosen)
    if error:
        raise CheckpointError(error)
    if found_name is None:
        return None
    try:
        extra = load_checkpoint_dcp(Path(found_name), model, optimizer)
    except CheckpointError:
        raise
    except Exception as exc:  # DCP and unpickling raise many kinds; all mean it does not fit
        raise CheckpointError(f"checkpoint {found_name} does not fit this run: {exc}") from exc
    extra["checkpoint"] = found_name
    return extra


def newest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of the run (by step), or None."""
    found = _complete(checkpoint_dir(run_dir))
    return found[0] if found else None
