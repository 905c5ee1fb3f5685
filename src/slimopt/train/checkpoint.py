"""Checkpoints that a crash cannot corrupt, and that refuse to load into the wrong run.

Layout inside the run directory::

    checkpoints/step-000200/state.pt   torch.save of the training state (tensors, numbers, strings)
    checkpoints/step-000200/meta.json  step, sha256 of state.pt, the run's fingerprint
    checkpoints/latest                 the name of the newest complete checkpoint

A save writes a temporary directory, fsyncs it, renames it to ``step-N`` (``os.replace``) and only
then replaces ``latest`` (``os.replace`` of a small file), so a process killed at any moment leaves
``latest`` naming a complete checkpoint. Older checkpoints are removed after the switch.

A load checks, in order: ``latest`` names a directory, ``meta.json`` is readable, the sha256 of
``state.pt`` matches, the fingerprint (model, optimizer, data, tokenizer, schedule, seed ...) equals
this run's; each failure is a ``CheckpointError`` naming the file or the differing settings.

>>> import tempfile, torch
>>> run = tempfile.mkdtemp()
>>> save_checkpoint(run, {"step": 3, "w": torch.ones(2)}, step=3, fingerprint={"seed": 0}).name
'step-000003'
>>> load_checkpoint(run, fingerprint={"seed": 0})["step"]
3
>>> load_checkpoint(run, fingerprint={"seed": 1})
Traceback (most recent call last):
...
slimopt.train.checkpoint.CheckpointError: ... seed: checkpoint 0, this run 1
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "slimopt-train-checkpoint"
VERSION = 1
_DIR = "checkpoints"
_LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt or from a different run."""


def _fsync_dir(path: Path) -> None:
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / _DIR


def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    return (checkpoint_dir(run_dir) / _LATEST).is_file()


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    state: dict[str, Any],
    *,
    step: int,
    fingerprint: dict[str, Any],
) -> Path:
    """Write ``state`` as the run's newest checkpoint, atomically; returns its directory."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = _as_json(fingerprint)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        state_path = tmp / "state.pt"
        with open(state_path, "wb") as fh:
            torch.save({"format": FORMAT, "version": VERSION, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "sha256": _sha256(state_path),
            "fingerprint": fingerprint,
        }
        with open(tmp / "meta.json", "w") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # the same step saved again (a resumed run that re-reached it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        latest_tmp = root / f".{_LATEST}.tmp"
        latest_tmp.write_text(name + "\n")
        with open(latest_tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(latest_tmp, root / _LATEST)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # Only now is the previous checkpoint redundant; also sweep what a killed save left behind.
    for entry in root.iterdir():
        if entry.name not in (name, _LATEST) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    return final


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(value, sort_keys=True))


def _describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(current))
    diffs = [
        f"{k}: checkpoint {saved.get(k, '<unset>')!r}, this run {current.get(k, '<unset>')!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    return "; ".join(diffs)


def load_checkpoint(
    run_dir: str | os.PathLike[str], *, fingerprint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The newest checkpoint's state, after checking its integrity and (if given) its fingerprint."""
    root = checkpoint_dir(run_dir)
    latest = root / _LATEST
    if not latest.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir} (missing {latest})")
    name = latest.read_text().strip()
    ckpt = root / name
    if not name or "/" in name or not ckpt.is_dir():
        raise CheckpointError(f"{latest} names {name!r}, which is not a checkpoint directory")
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} has no readable meta.json: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt} is format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this slimopt reads {FORMAT!r} version {VERSION}"
        )
    state_path = ckpt / "state.pt"
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no state.pt")
    if _sha256(state_path) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {state_path} is corrupt (its sha256 does not match)")
    if fingerprint is not None:
        fingerprint = _as_json(fingerprint)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {ckpt} belongs to a different run: "
            + _describe_mismatch(meta.get("fingerprint") or {}, fingerprint)
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises many kinds; all mean the file is unusable
        raise CheckpointError(f"cannot load checkpoint {state_path}: {exc}") from exc
    if state.get("step") != meta.get("step"):
        raise CheckpointError(f"checkpoint {ckpt}: state.pt and meta.json disagree on the step")
    return state
