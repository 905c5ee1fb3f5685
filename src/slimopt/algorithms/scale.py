"""SCALE: column-normalized SGD, with first-order momentum only where asked (the lm_head).

Spec (algorithms.md, "SCALE")::

    matrix, embedding:  U = g / max(sqrt(mean(g**2, dim=c)), eps)            no momentum
    lm_head:            m = b*m + (1-b)*g  (zero init, no bias correction);  U = m / max(rms over dim c, eps)
    decoupled weight decay;  p = p - lr * U

``norm_dim`` is c: 1 for an nn.Linear weight [out, in] (each output row to RMS 1), 0 for the
embedding [V, d] (each hidden column to RMS 1 over the vocabulary). ndim > 2 is viewed as
[size(0), -1]. A vector given to SCALE directly (the presets send vectors to AdamW) is divided by
its RMS as a whole. Non-finite gradients make their row/column RMS non-finite, so the update and the
parameter become NaN there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from slimopt.algorithms._common import (
    as_matrix,
    check_choice,
    check_nonneg,
    check_unit_interval,
    lr_of,
)
from slimopt.distributed import RowShard, column_mean, global_numel, norms

NAME = "scale"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "momentum": 0.0,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "norm_dim": 1,
}


def validate(group: dict[str, Any]) -> None:
    check_nonneg(group, "lr")
    check_nonneg(group, "eps")
    check_nonneg(group, "weight_decay")
    check_unit_interval(group, "momentum", group["momentum"])
    check_choice(group, "norm_dim", (0, 1))


def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    if group["momentum"] > 0:
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}
    return {}


def normalize(u: Tensor, norm_dim: int, eps: float, shard: RowShard | None = None) -> Tensor:
    """u / max(sqrt(mean(u**2, dim=norm_dim)), eps), the whole-vector RMS for ndim <= 1.

    ``shard``: ``u`` holds some rows of a tensor sharded on dim 0; a row's mean (norm_dim=1) stays
    local, a column's mean (norm_dim=0) and a vector's RMS are global."""
    if u.ndim <= 1:
        (norm,) = norms([u], shard)
        denom = (norm / math.sqrt(max(global_numel(u, shard), 1))).clamp(min=eps)
        return u / denom
    U = as_matrix(u)
    if norm_dim == 0:
        mean_sq = column_mean(U * U, shard, keepdim=True)
    else:
        mean_sq = torch.mean(U * U, dim=norm_dim, keepdim=True)
    denom = torch.sqrt(mean_sq).clamp(min=eps)
    return (U / denom).view_as(u)


def reference(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    shard: RowShard | None = None,
) -> None:
    """One SCALE step on one tensor, line by line as in the spec.

    ``shard``: ``p`` and ``g`` are the local rows of a parameter sharded on dim 0."""
    if global_numel(p, shard) == 0:
        return
    lr, wd, beta = lr_of(group), group["weight_decay"], group["momentum"]
    u = g
    if beta > 0:
        m = state["momentum_buffer"]
        m.mul_(beta).add_(g, alpha=1.0 - beta)
        u = m
    U = normalize(u, group["norm_dim"], group["eps"], shard)
    p.mul_(1.0 - lr * wd)
    p.add_(U, alpha=-lr)


def foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """The same step with multi-tensor momentum, weight decay and update."""
    lr, wd, beta = lr_of(group), group["weight_decay"], group["momentum"]
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    params = [params[i] for i in live]
    grads = [grads[i] for i in live]
    if beta > 0:
        us = [states[i]["momentum_buffer"] for i in live]
        torch._foreach_mul_(us, beta)
        torch._foreach_add_(us, grads, alpha=1.0 - beta)
    else:
        us = grads
    updates = [normalize(u, group["norm_dim"], group["eps"]) for u in us]
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_add_(params, updates, alpha=-lr)
