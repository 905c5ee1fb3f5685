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

from slimopt.algorithms import fused, native
from slimopt.algorithms._common import (
    as_matrix,
    check_choice,
    check_nonneg,
    check_unit_interval,
    lr_of,
    others,
    take,
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


def _denominator(u: Tensor, norm_dim: int, eps: float) -> Tensor:
    """max(rms of u over ``norm_dim``, eps), broadcastable against ``as_matrix(u)`` (a 0-dim
    tensor for a vector), from one reduction pass and without a temporary the size of u."""
    if u.ndim <= 1:
        return (torch.linalg.vector_norm(u) / math.sqrt(max(u.numel(), 1))).clamp_(min=eps)
    U = as_matrix(u)
    if norm_dim == 0:  # over the rows of a tall matrix: a blocked column sum is far faster
        mean_sq = fused.column_sums(U, square=True).div_(U.shape[0]).unsqueeze(0)
        return mean_sq.sqrt_().clamp_(min=eps)
    norm = torch.linalg.vector_norm(U, dim=1, keepdim=True)
    return norm.div_(math.sqrt(U.shape[1])).clamp_(min=eps)


def _fused_matrices(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> set[int]:
    """The fused update of every matrix it can take; returns their indices. Rows (norm_dim=1):
    the row RMS and the update in one pass per row (on CPU with the momentum too, for the
    lm_head, in a native loop); columns (norm_dim=0): one reduction pass, then one update pass."""
    lr, wd, beta, eps = lr_of(group), group["weight_decay"], group["momentum"], group["eps"]
    rows = group["norm_dim"] == 1
    hp_rows = fused.Hyper((lr, wd, eps))
    hp_by = fused.Hyper((lr, wd))
    on_cpu: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]] = []
    done = set()
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        m = s.get("momentum_buffer")
        tensors = (p, g) if m is None else (p, g, m)
        if p.ndim < 2 or p.numel() <= 1 or not fused.usable(tensors):
            continue
        done.add(i)
        cpu = native.supports(p, g) and (m is None or native.supports(m, g))
        if cpu and native.library() is not None:
            if rows:  # momentum, RMS and update in one pass per row
                on_cpu.append((p, g, m, None))
                continue
            u = g
            if m is not None:
                m.lerp_(g, 1.0 - beta)  # b*m + (1-b)*g in one pass
                u = m
            step = _denominator(as_matrix(u), 0, eps).reciprocal_().mul_(lr).view(-1)
            on_cpu.append((p, u, None, step))
            continue
        if m is not None:
            m.lerp_(g, 1.0 - beta)
            g = m
        P, U = as_matrix(p), as_matrix(g)
        if rows:
            fused.call("scale_rows", fused.scale_rows_kernel, P, U, hp_rows.on(p.device))
        else:
            step = _denominator(U, 0, eps).reciprocal_().mul_(lr)
            fused.call("scale_by", fused.scale_by_kernel, P, U, step, hp_by.on(p.device))
    if on_cpu:
        native.scale_step(on_cpu, lr, wd, eps, beta)
    return done


def foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """The same step with multi-tensor momentum and weight decay, then per tensor one reduction
    pass for the RMS and one ``addcdiv_`` pass for the update (no temporary the size of the
    parameter); with the fused kernels on, one pass per row for row-normalized matrices."""
    lr, wd, beta = lr_of(group), group["weight_decay"], group["momentum"]
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    params, grads, states = take(live, params, grads, states)
    if fused.fused_enabled():
        done = _fused_matrices(params, grads, states, group)
        params, grads, states = take(others(done, len(params)), params, grads, states)
        if not params:
            return
    if beta > 0:
        us = [s["momentum_buffer"] for s in states]
        torch._foreach_mul_(us, beta)
        torch._foreach_add_(us, grads, alpha=1.0 - beta)
    else:
        us = grads
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    for p, u in zip(params, us):
        denom = _denominator(u, group["norm_dim"], group["eps"])
        if p.ndim >= 2 and p.is_contiguous() and u.is_contiguous():
            as_matrix(p).addcdiv_(as_matrix(u), denom, value=-lr)
        else:
            p.add_((as_matrix(u) / denom).view_as(p) if p.ndim >= 2 else u / denom, alpha=-lr)
