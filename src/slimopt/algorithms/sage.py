"""SAGE (Sign-Adaptive GradiEnt): Lion's sign direction damped by an O(d) statistic.

Spec (algorithms.md, "SAGE"), with ``t`` the parameter's step count::

    decoupled weight decay
    a   = |g|
    s   = mean(a, dim=0)  if p.ndim >= 2 (one value per column; ndim > 2 viewed as [size(0), -1])
        = a               if p.ndim <= 1
    S   = b2*S + (1-b2)*s
    S^  = S / (1 - b2**t)
    D_ema  = min(rms(S^) / (S^ + eps), 1)
    D_inst = rms(s) / (s + eps)
    H   = min(D_ema, D_inst)
    m   = b2*m + (1-b2)*g                    (official order; ``lion_order=True`` swaps these two)
    C   = sign(b1*m + (1-b1)*g)
    p   = p - lr * C * H                     (H broadcasts over the rows)

State: ``exp_avg`` (shape of p) and ``S`` (d values for a [V, d] table, n for a vector).
Non-finite gradients: a NaN or Inf makes its column's statistic non-finite, so H and the
parameter become NaN there; nothing is hidden.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from slimopt.algorithms._common import (
    add_scaled_,
    as_matrix,
    betas_of,
    betas_value,
    check_betas,
    check_choice,
    check_nonneg,
    column_sums,
    foreach_add_scaled_,
    foreach_sub_scaled_,
    lr_of,
    nan_if_nonfinite,
    others,
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

NAME = "sage"
DEFAULTS: dict[str, Any] = {
    "lr": 2e-3,
    "betas": (0.9, 0.99),
    "eps": 1e-8,
    "weight_decay": 0.01,
    "lion_order": False,
}


def validate(group: dict[str, Any]) -> None:
    check_nonneg(group, "lr")
    check_nonneg(group, "eps")
    check_nonneg(group, "weight_decay")
    check_betas(group)
    check_choice(group, "lion_order", (False, True))


def _stat_shape(p: Tensor) -> tuple[int, ...]:
    return (math.prod(p.shape[1:]),) if p.ndim >= 2 else tuple(p.shape)


def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    # A vector's S is shaped (and, under FSDP2, sharded) like the vector; a matrix's S holds one
    # value per column, whole on every rank.
    if p.ndim >= 2:
        S = torch.zeros(_stat_shape(p), dtype=p.dtype, device=p.device)
    else:
        S = torch.zeros_like(p, memory_format=torch.preserve_format)
    return {
        "step": 0,
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "S": S,
    }


def column_stat(g: Tensor, shard: RowShard | None = None) -> Tensor:
    """s: the mean |g| of each column for ndim >= 2, |g| itself for a vector.

    ``shard``: ``g`` holds some rows of a tensor sharded on dim 0 (see ``slimopt.sharding``)."""
    a = g.abs()
    return column_mean(as_matrix(a), shard) if g.ndim >= 2 else a


def damping(S_hat: Tensor, s: Tensor, eps: float, shard: RowShard | None = None) -> Tensor:
    """H = min(D_ema, D_inst): every entry <= 1, so SAGE is never bolder than Lion.

    ``shard``: ``S_hat`` and ``s`` are entries of a vector sharded on dim 0 (a matrix's statistics
    are whole on every rank and take ``None``)."""
    norm_hat, norm_s = norms([S_hat, s], shard)
    return _damping(S_hat, s, eps, norm_hat, norm_s, global_numel(s, shard))


def _damping(
    S_hat: Tensor, s: Tensor, eps: float, norm_hat: Tensor, norm_s: Tensor, numel: int
) -> Tensor:
    root_n = math.sqrt(max(numel, 1))
    rms_hat, rms_s = norm_hat / root_n, norm_s / root_n  # rms over all entries
    d_ema = (rms_hat / (S_hat + eps)).clamp(max=1.0)
    d_inst = rms_s / (s + eps)
    return torch.minimum(d_ema, d_inst)


def reference(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    shard: RowShard | None = None,
) -> None:
    """One SAGE step on one tensor, line by line as in the spec.

    ``shard``: ``p`` and ``g`` are the local rows of a parameter sharded on dim 0."""
    lr, eps, wd = lr_of(group), group["eps"], group["weight_decay"]
    beta1, beta2 = betas_of(group)
    state["step"] += 1
    t = state["step"]
    if global_numel(p, shard) == 0:
        return
    m, S = state["exp_avg"], state["S"]
    p.mul_(1.0 - lr * wd)
    s = column_stat(g, shard)
    add_scaled_(S.mul_(beta2), s, 1.0 - beta2)
    S_hat = S / (1.0 - beta2**t)
    H = damping(S_hat, s, eps, shard if p.ndim <= 1 else None)
    if group["lion_order"]:
        c = add_scaled_(m.mul(beta1), g, 1.0 - beta1)
        add_scaled_(m.mul_(beta2), g, 1.0 - beta2)
    else:
        add_scaled_(m.mul_(beta2), g, 1.0 - beta2)
        c = add_scaled_(m.mul(beta1), g, 1.0 - beta1)
    C = nan_if_nonfinite(c.sign(), c)
    if p.ndim >= 2:
        update = (as_matrix(C) * H).view_as(p)
    else:
        update = C * H
    sub_scaled_(p, update, lr)


def _fast_column_stat(g: Tensor) -> Tensor:
    """column_stat without a temporary the size of g (a blocked column sum of |g|)."""
    if g.ndim <= 1:
        return g.abs()
    G = as_matrix(g)
    return column_sums(G, square=False).div_(G.shape[0])


def _column_stats(grads: list[Tensor], native: bool) -> list[Tensor]:
    """Every gradient's column statistic (:func:`_fast_column_stat`); with ``native``, the
    matrices the native loop takes in one :func:`slimopt.kernels.cpu.column_means` call."""
    if not native:
        return [_fast_column_stat(g) for g in grads]
    from slimopt.kernels import cpu

    stats: list[Tensor | None] = [None] * len(grads)
    mats, where = [], []
    for i, g in enumerate(grads):
        G = as_matrix(g) if g.ndim >= 2 else None
        if G is not None and G.shape[0] > 1 and cpu.supports_all(G):
            mats.append(G)
            where.append(i)
        else:
            stats[i] = _fast_column_stat(g)
    for i, s in zip(where, cpu.column_means(mats, square=False)):
        stats[i] = s
    return stats  # type: ignore[return-value]


def _damping_foreach(
    Ss: list[Tensor], stats: list[Tensor], steps: list[Any], beta2: float | Tensor, eps: float
) -> list[Tensor]:
    """Update every S and return every H, with multi-tensor kernels on the O(d) statistics (the
    step counters are ints, or tensors under torch.compile; beta2 a float or a tensor)."""
    torch._foreach_mul_(Ss, beta2)
    foreach_add_scaled_(Ss, stats, 1.0 - beta2)
    S_hat = torch._foreach_div(Ss, [1.0 - beta2**t for t in steps])
    sqrt_n = [math.sqrt(x.numel()) for x in stats]
    rms_hat = torch._foreach_div(torch._foreach_norm(S_hat), sqrt_n)
    rms_s = torch._foreach_div(torch._foreach_norm(stats), sqrt_n)
    d_ema = torch._foreach_add(S_hat, eps)
    torch._foreach_reciprocal_(d_ema)
    torch._foreach_mul_(d_ema, rms_hat)
    torch._foreach_clamp_max_(d_ema, 1.0)
    d_inst = torch._foreach_add(stats, eps)
    torch._foreach_reciprocal_(d_inst)
    torch._foreach_mul_(d_inst, rms_s)
    return torch._foreach_minimum(d_ema, d_inst)


def _statistics(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    native: bool,
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]], list[Tensor]]:
    """Count the step, drop empty tensors, and return the live params, grads, states and H."""
    beta2, eps = betas_of(group)[1], group["eps"]
    for s in states:
        s["step"] += 1
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    params, grads, states = take(live, params, grads, states)
    if not params:
        return params, grads, states, []
    stats = _column_stats(grads, native)
    H = _damping_foreach([s["S"] for s in states], stats, [s["step"] for s in states], beta2, eps)
    return params, grads, states, H


def _update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    H: list[Tensor],
    group: dict[str, Any],
) -> None:
    lr, wd = lr_of(group), group["weight_decay"]
    beta1, beta2 = betas_of(group)
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    if group["lion_order"]:
        c = torch._foreach_mul(ms, beta1)
        foreach_add_scaled_(c, grads, 1.0 - beta1)
        torch._foreach_mul_(ms, beta2)
        foreach_add_scaled_(ms, grads, 1.0 - beta2)
    else:
        torch._foreach_mul_(ms, beta2)
        foreach_add_scaled_(ms, grads, 1.0 - beta2)
        c = torch._foreach_mul(ms, beta1)
        foreach_add_scaled_(c, grads, 1.0 - beta1)
    C = torch._foreach_sign(c)
    torch._foreach_mul_(c, 0.0)  # 0 * c: NaN where c is +-inf, so that sign() hides nothing
    torch._foreach_add_(C, c)
    views = [as_matrix(x) if x.ndim >= 2 else x for x in C]
    torch._foreach_mul_(views, H)
    foreach_sub_scaled_(params, C, lr)


def foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """The same step for a list of tensors: one reduction pass over each gradient for the column
    statistics, multi-tensor kernels on the O(d) statistics, then the update with multi-tensor
    kernels."""
    params, grads, states, H = _statistics(params, grads, states, group, native=False)
    if params:
        _update_foreach(params, grads, [s["exp_avg"] for s in states], H, group)


def fused_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool = True,
) -> None:
    """The fused CPU tier for matrices: one native pass over each for its column statistic, the
    O(d) statistics with multi-tensor kernels (on fp32 copies of bf16 ones, rounded back once),
    then one native pass per matrix for the update (read p, g, m; write p, m; bf16 rounded in
    the loop)."""
    from slimopt.kernels import cpu

    low = [s for s in states if s["S"].dtype == torch.bfloat16]
    kept = [s["S"] for s in low]
    for s in low:
        s["S"] = s["S"].float()
    params, grads, states, H = _statistics(params, grads, states, group, native=True)
    for s, S in zip(low, kept):
        S.copy_(s["S"])
        s["S"] = S
    lr, wd = lr_of(group), group["weight_decay"]
    beta1, beta2 = betas_value(group)
    items = [
        (p, g, s["exp_avg"], h, kernel_rounding(p, s, stochastic))
        for p, g, s, h in zip(params, grads, states, H)
    ]
    if items:
        cpu.sage_step(items, lr, wd, beta1, beta2, group["lion_order"])


# the sharded step's native update: fp32 and float64 matrices (a bf16 shard steps on fp32 copies)
_NATIVE_UPDATE = (torch.float32, torch.float64)


def _update_native(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    H: list[Tensor],
    group: dict[str, Any],
) -> None:
    """The update given H: one native pass per CPU float32/float64 matrix, multi-tensor kernels
    for the rest."""
    from slimopt.kernels import cpu

    lr, wd = lr_of(group), group["weight_decay"]
    items, done = [], []
    native = cpu.library() is not None
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        m = s["exp_avg"]
        if (
            native
            and p.ndim >= 2
            and H[i].dtype == p.dtype
            and p.dtype in _NATIVE_UPDATE
            and cpu.supports_all(p, g, m)
        ):
            items.append((p, g, m, H[i], None))
            done.append(i)  # only what the loop takes: the rest (an accelerator's) runs below
    if items:
        beta1, beta2 = betas_value(group)
        cpu.sage_step(items, lr, wd, beta1, beta2, group["lion_order"])
    rest = others(done, len(params))
    if rest:
        p_, g_, s_, h_ = take(rest, params, grads, states, H)
        _update_foreach(p_, g_, [s["exp_avg"] for s in s_], h_, group)


def sharded_step(views: list[Any], group: dict[str, Any]) -> None:
    """The step on the local rows of Shard(0) DTensor parameters (``slimopt.sharding.LocalView``),
    equal to :func:`reference` with ``shard=``, but with one all-reduce for all of them: every
    matrix's column sums of |g| and every vector's two squared norms go in one buffer. The update
    then runs the fast tier on the local rows."""
    eps, beta2 = group["eps"], betas_of(group)[1]
    live = []
    for v in views:
        v.state["step"] += 1
        if global_numel(v.param, v.shard) > 0:
            live.append(v)
    red, pending = Reduction(), []
    for v in live:
        g, S, t = v.grad, v.state["S"], v.state["step"]
        if g.ndim >= 2:
            X = as_matrix(g.abs())
            if v.shard is None:
                pending.append(X.mean(dim=0))
            else:
                pending.append(red.add(X.sum(dim=0, dtype=acc_dtype(X)), v.shard))
        else:
            s = g.abs()
            add_scaled_(S.mul_(beta2), s, 1.0 - beta2)
            S_hat = S / (1.0 - beta2**t)
            if v.shard is None:
                pending.append((s, S_hat, *norms([S_hat, s], None)))
            else:
                acc = acc_dtype(S_hat)
                sq = torch.stack([S_hat.to(acc).pow(2).sum(), s.to(acc).pow(2).sum()])
                pending.append((s, S_hat, red.add(sq, v.shard)))
    sums = red.run()
    H = []
    for v, item in zip(live, pending):
        g, S, t = v.grad, v.state["S"], v.state["step"]
        if g.ndim >= 2:
            s = item if isinstance(item, Tensor) else sums[item].to(g.dtype) / v.shard.shape[0]
            add_scaled_(S.mul_(beta2), s, 1.0 - beta2)
            H.append(damping(S / (1.0 - beta2**t), s, eps, None))
        else:
            s, S_hat, *rest = item
            if len(rest) == 2:
                norm_hat, norm_s = rest
            else:
                sq = sums[rest[0]].sqrt()
                norm_hat, norm_s = sq[0].to(s.dtype), sq[1].to(s.dtype)
            H.append(_damping(S_hat, s, eps, norm_hat, norm_s, global_numel(s, v.shard)))
    if live:
        params, grads = [v.param for v in live], [v.grad for v in live]
        _update_native(params, grads, [v.state for v in live], H, group)


def _rows_gather(g: Tensor, state_rows: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """A block of rows' column sums of |g| (g is an fp32 copy of bf16 rows, or the rows)."""
    return column_sums(as_matrix(g), square=False)


def _rows_finish(
    total: Tensor | None, n_rows: int, state: dict[str, Any], group: dict[str, Any], blocks: Any
) -> Tensor:
    """Count the step, update S from the column means, and return H (as :func:`_statistics`)."""
    state["step"] += 1
    assert total is not None
    s = total.div_(n_rows)
    beta2, eps = betas_of(group)[1], group["eps"]
    return _damping_foreach([state["S"]], [s], [state["step"]], beta2, eps)[0]


def _rows_update(
    p: Tensor, g: Tensor, state_rows: dict[str, Any], group: dict[str, Any], H: Tensor, rows: slice
) -> None:
    _update_foreach([p], [g], [state_rows["exp_avg"]], [H], group)


def _triton_takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    """The Triton kernels take contiguous dense CUDA tensors of one dtype with their state
    (pure bf16 included: rounded in the kernel)."""
    from slimopt.kernels import triton_ops

    return triton_ops.kernel_ok(p, g, *(state[k] for k in ("exp_avg", "S") if k in state))


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
    momentum_key="betas",
    fused_takes={"cpu": native_takes("exp_avg", matrix=True), "cuda": _triton_takes},
    rounds_bf16=("cpu", "cuda"),
    row_blocks=RowBlocks(gather=_rows_gather, finish=_rows_finish, update=_rows_update),
    temporaries=2,  # the interpolated momentum and its sign
)
