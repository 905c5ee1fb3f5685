"""Exact optimizer-state memory."""

from __future__ import annotations

import torch
from torch import Tensor


def _local(t: Tensor) -> Tensor:
    # a DTensor's bytes on this rank are those of its local shard
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of all tensors held in ``optimizer.state`` (on this rank, for sharded state).

    Works on optimizers whose state lives on the meta device, which is how a model too large
    for this machine is sized.

    Example:
        >>> import torch, slimopt
        >>> layer = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.AdamW(layer.parameters())
        >>> layer(torch.randn(2, 4)).sum().backward(); opt.step()
        >>> slimopt.state_bytes(opt)  # exp_avg + exp_avg_sq for 15 floats, two float32 steps
        128
    """
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                t = _local(value)
                total += t.numel() * t.element_size()
    return total


__all__ = ["state_bytes"]
