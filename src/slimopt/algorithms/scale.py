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
    column_sums,
    lr_of,
    sub_scaled_,
    take,
)
from slimopt.algorithms.base import (
    NATIVE_DTYPES,
    TRITON_DTYPES,
    RowBlocks,
    Rule,
    kernel_rounding,
    native_cpu,
    native_takes,
    triton_cuda,
)
from slimopt.sharding import Reduction, RowShard, acc_dtype, column_mean, global_numel, norms

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
    sub_scaled_(p, U, lr)


def _denominator(u: Tensor, norm_dim: int, eps: float, native: bool = False) -> Tensor:
    """max(rms of u over ``norm_dim``, eps), broadcastable against ``as_matrix(u)`` (a 0-dim
    tensor for a vector), from one reduction pass and without a temporary the size of u."""
    if u.ndim <= 1:
        return (torch.linalg.vector_norm(u) / math.sqrt(max(u.numel(), 1))).clamp_(min=eps)
    U = as_matrix(u)
    if norm_dim == 0:  # over the rows of a tall matrix: a blocked column sum is far faster
        sums = None
        if native:
            from slimopt.kernels import cpu

            if U.shape[0] > 1 and cpu.supports_all(U):
                sums = cpu.column_sums(U, square=True)
        if sums is None:
            sums = column_sums(U, square=True)
        return sums.div_(U.shape[0]).unsqueeze(0).sqrt_().clamp_(min=eps)
    norm = torch.linalg.vector_norm(U, dim=1, keepdim=True)
    return norm.div_(math.sqrt(U.shape[1])).clamp_(min=eps)


def foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """The same step with multi-tensor momentum and weight decay, then per tensor one reduction
    pass for the RMS and one ``addcdiv_`` pass for the update (no temporary the size of the
    parameter)."""
    lr, wd, beta = lr_of(group), group["weight_decay"], group["momentum"]
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    params, grads, states = take(live, params, grads, states)
    if beta > 0:
        us = [s["momentum_buffer"] for s in states]
        torch._foreach_mul_(us, beta)
        torch._foreach_add_(us, grads, alpha=1.0 - beta)
    else:
        us = grads
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    for p, u in zip(params, us):
        _divide_update(p, u, _denominator(u, group["norm_dim"], group["eps"]), lr)


def _divide_update(p: Tensor, u: Tensor, denom: Tensor, lr: float | Tensor) -> None:
    """p -= lr * u / denom (denom broadcast against ``as_matrix(u)``), in one pass where it can."""
    if p.ndim >= 2 and p.is_contiguous() and u.is_contiguous() and not isinstance(lr, Tensor):
        as_matrix(p).addcdiv_(as_matrix(u), denom, value=-lr)
    else:
        sub_scaled_(p, (as_matrix(u) / denom).view_as(p) if p.ndim >= 2 else u / denom, lr)


def fused_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool = True,
) -> None:
    """The fused CPU tier for matrices: row-normalized (norm_dim=1), momentum, RMS and update in
    one native pass per row; column-normalized (norm_dim=0), one native reduction pass, then one
    update pass (bf16 read in the loops and rounded there)."""
    from slimopt.kernels import cpu

    lr, wd, beta, eps = lr_of(group), group["weight_decay"], group["momentum"], group["eps"]
    rows = group["norm_dim"] == 1
    items: list[tuple[Any, ...]] = []
    for p, g, s in zip(params, grads, states):
        m = s.get("momentum_buffer")
        rounding = kernel_rounding(p, s, stochastic)
        if rows:  # momentum, RMS and update in one pass per row
            items.append((p, g, m, None, rounding))
            continue
        u = g
        if m is not None:
            m.lerp_(g, 1.0 - beta)  # b*m + (1-b)*g in one pass
            u = m
        step = _denominator(u, 0, eps, native=True).reciprocal_().mul_(lr).view(-1)
        items.append((p, u, None, step, rounding))
    if items:
        cpu.scale_step(items, lr, wd, eps, beta)


def _native_takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    """The native loops take matrices (with their momentum buffer, if any)."""
    keys = ("momentum_buffer",) if "momentum_buffer" in state else ()
    return native_takes(*keys, matrix=True)(p, g, state, group)


def sharded_step(views: list[Any], group: dict[str, Any]) -> None:
    """The step on the local rows of Shard(0) DTensor parameters (``slimopt.sharding.LocalView``),
    equal to :func:`reference` with ``shard=``, with one all-reduce for all of them (the column
    means of norm_dim=0 matrices and the vectors' norms; row RMS is local)."""
    lr, wd, beta, eps = lr_of(group), group["weight_decay"], group["momentum"], group["eps"]
    live = [v for v in views if global_numel(v.param, v.shard) > 0]
    us, pending = [], []
    red = Reduction()
    for v in live:
        u = v.grad
        if beta > 0:
            m = v.state["momentum_buffer"]
            m.mul_(beta).add_(u, alpha=1.0 - beta)
            u = m
        us.append(u)
        if u.ndim >= 2 and group["norm_dim"] == 0 and v.shard is not None:
            U = as_matrix(u)
            pending.append(red.add((U * U).sum(dim=0, dtype=acc_dtype(U)), v.shard))
        elif u.ndim <= 1 and v.shard is not None:
            pending.append(red.add(u.to(acc_dtype(u)).pow(2).sum().reshape(1), v.shard))
        else:
            pending.append(None)
    sums = red.run()
    for v, u, item in zip(live, us, pending):
        if item is None:
            U = normalize(u, group["norm_dim"], eps, None)
        elif u.ndim >= 2:
            mean_sq = (sums[item].to(u.dtype) / v.shard.shape[0]).unsqueeze(0)
            U = (as_matrix(u) / torch.sqrt(mean_sq).clamp(min=eps)).view_as(u)
        else:
            norm = sums[item].sqrt()[0].to(u.dtype)
            U = u / (norm / math.sqrt(max(global_numel(u, v.shard), 1))).clamp(min=eps)
        v.param.mul_(1.0 - lr * wd)
        sub_scaled_(v.param, U, lr)


def _rows_gather(g: Tensor, state_rows: dict[str, Any], group: dict[str, Any]) -> Tensor | None:
    """Step the momentum of a block of rows; for norm_dim=0, its column sums of u**2 (fp32)."""
    beta = group["momentum"]
    u = g
    if beta > 0:
        u = state_rows["momentum_buffer"]
        torch._foreach_mul_([u], beta)
        torch._foreach_add_([u], [g], alpha=1.0 - beta)
    if group["norm_dim"] == 0:
        U = as_matrix(u)  # bf16 momentum rows are summed in fp32
        return column_sums(U.to(torch.promote_types(U.dtype, torch.float32)), square=True)
    return None  # each row's RMS is its own: nothing to gather


def _rows_finish(
    total: Tensor | None, n_rows: int, state: dict[str, Any], group: dict[str, Any], blocks: Any
) -> Tensor | None:
    """The column RMS denominator (norm_dim=0), or None (the rows find their own)."""
    if total is None:
        return None
    return total.div_(n_rows).unsqueeze(0).sqrt_().clamp_(min=group["eps"])


def _rows_update(
    p: Tensor,
    g: Tensor,
    state_rows: dict[str, Any],
    group: dict[str, Any],
    denom: Tensor | None,
    rows: slice,
) -> None:
    lr, wd, eps = lr_of(group), group["weight_decay"], group["eps"]
    u = state_rows["momentum_buffer"] if group["momentum"] > 0 else g
    if denom is None:
        denom = _denominator(u, 1, eps)
    if wd != 0:
        p.mul_(1.0 - lr * wd)
    _divide_update(p, u, denom, lr)


def _layout_options(role: str, norm_dim: int) -> dict[str, Any]:
    # the embedding [V, d] normalizes each hidden column over the vocabulary
    return {"norm_dim": 0 if role == "embedding" else norm_dim}


def _triton_takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    """The Triton kernels take contiguous dense CUDA tensors of one dtype with their state
    (pure bf16 included: rounded in the kernel)."""
    from slimopt.kernels import triton_ops

    return triton_ops.kernel_ok(p, g, *(state[k] for k in ("momentum_buffer",) if k in state))


RULE = Rule(
    name=NAME,
    defaults=DEFAULTS,
    validate=validate,
    init_state=init_state,
    reference=reference,
    foreach=foreach,
    fused={"cpu": native_cpu(fused_cpu), "cuda": triton_cuda(NAME)},
    fused_dtypes={"cpu": NATIVE_DTYPES, "cuda": TRITON_DTYPES},
    sharded="reducing",
    sharded_step=sharded_step,
    momentum_key="momentum",
    layout_options=_layout_options,
    fused_takes={"cpu": _native_takes, "cuda": _triton_takes},
    rounds_bf16=("cpu", "cuda"),
    row_blocks=RowBlocks(gather=_rows_gather, finish=_rows_finish, update=_rows_update),
    temporaries=0,  # one reduction pass and one addcdiv_
)
