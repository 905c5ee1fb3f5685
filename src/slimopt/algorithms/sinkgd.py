"""SinkGD: stateless Sinkhorn-normalized gradient descent.

Spec (algorithms.md, "SinkGD"), for a matrix X = g of shape [m, n] (ndim > 2 viewed as [size(0), -1])::

    repeat iters times:
        X <- sqrt(n) * X / ||row||_2        (every row to norm sqrt(n))
        X <- sqrt(m) * X / ||column||_2     (every column to norm sqrt(m))
    decoupled weight decay;  p = p - lr * X

and for a vector X = sqrt(n) * g / ||g||_2. Each division is guarded as ``/ (norm + eps)``, so a zero
row or column stays zero. No state.

The fast path never rewrites the matrix inside the loop: X is always ``diag(r) @ G @ diag(c)``, so the
row norms are ``r * sqrt((G*G) @ c**2)`` and the column norms ``c * sqrt(r**2 @ (G*G))``; the
iterations update the two scaling vectors only, and X is formed once at the end.
Non-finite gradients: a NaN or Inf makes its row's and column's norms non-finite; the update and the
parameter become NaN there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from slimopt.algorithms._common import as_matrix, check_nonneg, lr_of, sub_scaled_, take
from slimopt.algorithms.base import (
    NATIVE_DTYPES,
    TRITON_DTYPES,
    RowBlocks,
    Rule,
    kernel_rounding,
    native_cpu,
    triton_cuda,
)
from slimopt.sharding import (
    Reduction,
    RowShard,
    acc_dtype,
    column_norm,
    global_numel,
    global_shape,
    norms,
)

NAME = "sinkgd"
DEFAULTS: dict[str, Any] = {"lr": 1e-3, "iters": 5, "eps": 1e-8, "weight_decay": 0.0}


def validate(group: dict[str, Any]) -> None:
    check_nonneg(group, "lr")
    check_nonneg(group, "eps")
    check_nonneg(group, "weight_decay")
    iters = group["iters"]
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"sinkgd: 'iters' must be an integer >= 1, got {iters!r}")


def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    return {}


def sinkhorn(g: Tensor, iters: int, eps: float, shard: RowShard | None = None) -> Tensor:
    """The spec's alternating row/column normalization, written out as it reads.

    ``shard``: ``g`` holds some rows of a tensor sharded on dim 0; rows are whole, so the row norms
    stay local, and the column norms (and a vector's norm) are global."""
    if g.ndim <= 1:
        (norm,) = norms([g], shard)
        return g * (math.sqrt(global_numel(g, shard)) / (norm + eps))
    X = as_matrix(g)
    shape = global_shape(g, shard)
    m, n = shape[0], math.prod(shape[1:])
    for _ in range(iters):
        X = X * (math.sqrt(n) / (torch.linalg.vector_norm(X, dim=1, keepdim=True) + eps))
        X = X * (math.sqrt(m) / (column_norm(X, shard, keepdim=True) + eps))
    return X.view_as(g)


def sinkhorn_scaling(g: Tensor, iters: int, eps: float) -> Tensor:
    """The same result through the row and column scaling vectors (two mat-vecs per iteration)."""
    if g.ndim <= 1:
        return sinkhorn(g, iters, eps)
    G = as_matrix(g)
    m, n = G.shape
    G2 = G * G
    r = torch.ones(m, dtype=g.dtype, device=g.device)
    c = torch.ones(n, dtype=g.dtype, device=g.device)
    for _ in range(iters):
        # A zero row (column) of G stays zero whatever its scale, as in the reference; its scale
        # is left alone instead of growing by sqrt(n)/eps each pass until it overflows.
        q = torch.sqrt(G2 @ (c * c))
        r = torch.where(q > 0, r * (math.sqrt(n) / (r * q + eps)), r)
        q = torch.sqrt((r * r) @ G2)
        c = torch.where(q > 0, c * (math.sqrt(m) / (c * q + eps)), c)
    return (G * r[:, None] * c[None, :]).view_as(g)


def reference(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    shard: RowShard | None = None,
) -> None:
    """One SinkGD step on one tensor, line by line as in the spec.

    ``shard``: ``p`` and ``g`` are the local rows of a parameter sharded on dim 0."""
    if global_numel(p, shard) == 0:
        return
    lr, wd = lr_of(group), group["weight_decay"]
    X = sinkhorn(g, group["iters"], group["eps"], shard)
    p.mul_(1.0 - lr * wd)
    sub_scaled_(p, X, lr)


# The fast path keeps G*G of the matrices one pass works on in a workspace of about this many
# bytes, so that its iterations re-read it from the cache (the last-level cache of a CPU)
# rather than from memory: several small matrices of one shape share a block (batched
# mat-vecs), a large matrix is swept in blocks of rows. Larger on GPUs, where a block is one launch.
BLOCK_BYTES = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}


def _rescale_(s: Tensor, q: Tensor, target: float, eps: float) -> None:
    """s <- s * target / (s * sqrt(q) + eps), in place, where q > 0. A zero row (column) of G stays
    zero whatever its scale, so its scale is left alone instead of growing by target/eps each
    pass until it overflows."""
    q = q.sqrt_()
    new = torch.div(s, torch.mul(s, q).add_(eps)).mul_(target)
    s.copy_(torch.where(q > 0, new, s))


def _scalings_batched(
    mats: list[Tensor], iters: int, eps: float, G2: Tensor
) -> tuple[Tensor, Tensor]:
    """Row and column scalings of k same-shaped matrices at once; ``G2`` [k, m, n] is workspace."""
    k, m, n = G2.shape
    for j, g in enumerate(mats):
        torch.mul(g, g, out=G2[j])
    r = torch.ones(k, m, dtype=G2.dtype, device=G2.device)
    c = torch.ones(k, n, dtype=G2.dtype, device=G2.device)
    for _ in range(iters):
        # (c*c) @ G2^T rather than G2 @ (c*c): torch's bmm is several times faster this way
        _rescale_(
            r, torch.bmm((c * c).unsqueeze(1), G2.transpose(1, 2)).squeeze(1), math.sqrt(n), eps
        )
        _rescale_(c, torch.bmm((r * r).unsqueeze(1), G2).squeeze(1), math.sqrt(m), eps)
    return r, c


def _scalings_row_blocks(G: Tensor, iters: int, eps: float, work: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column scalings of one large matrix, swept in blocks of rows: each iteration
    squares a block into ``work`` once and takes both of its mat-vecs from there, so G is read
    from memory once per iteration."""
    m, n = G.shape
    rows = max(1, work.numel() // n)

    def squares() -> Iterator[tuple[slice, Tensor]]:
        for i in range(0, m, rows):
            block = G[i : i + rows]
            yield (
                slice(i, i + rows),
                torch.mul(block, block, out=work[: block.numel()].view(block.shape)),
            )

    return _sweep_scalings(squares, m, n, iters, eps, G.dtype, G.device)


def _sweep_scalings(
    squares: Callable[[], Iterable[tuple[slice, Tensor]]],
    m: int,
    n: int,
    iters: int,
    eps: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """The scalings from ``iters`` sweeps of ``squares()``: (rows, G*G of those rows) blocks."""
    r = torch.ones(m, dtype=dtype, device=device)
    c = torch.ones(n, dtype=dtype, device=device)
    for _ in range(iters):
        c2 = c * c
        col = torch.zeros(n, dtype=dtype, device=device)
        for sl, G2 in squares():
            r_block = r[sl]
            _rescale_(r_block, torch.mv(G2, c2), math.sqrt(n), eps)
            col.addmv_(G2.t(), r_block * r_block)
        _rescale_(c, col, math.sqrt(m), eps)
    return r, c


def _rows_finish(
    total: Tensor | None, n_rows: int, state: dict[str, Any], group: dict[str, Any], blocks: Any
) -> tuple[Tensor, Tensor]:
    """The scalings of a matrix whose rows arrive in blocks (``blocks()``, once per sweep)."""
    first = next(iter(blocks()))[1]
    n = math.prod(first.shape[1:])

    def squares() -> Iterator[tuple[slice, Tensor]]:
        for sl, g in blocks():
            G = as_matrix(g)
            yield sl, G * G

    return _sweep_scalings(
        squares, n_rows, n, group["iters"], group["eps"], first.dtype, first.device
    )


def _rows_update(
    p: Tensor,
    g: Tensor,
    state_rows: dict[str, Any],
    group: dict[str, Any],
    scalings: tuple[Tensor, Tensor],
    rows: slice,
) -> None:
    lr, wd = lr_of(group), group["weight_decay"]
    r, c = scalings
    p.mul_(1.0 - lr * wd)
    sub_scaled_(p, (as_matrix(g) * r[rows, None] * c[None, :]).view_as(p), lr)


def _apply(p: Tensor, G: Tensor, r: Tensor, c: Tensor, lr: float, work: Tensor) -> None:
    """p <- p - lr * G * r[:, None] * c[None, :], in blocks of rows through ``work``."""
    m, n = G.shape
    P = as_matrix(p) if p.is_contiguous() and not isinstance(lr, Tensor) else None
    rows = max(1, work.numel() // n)
    for i in range(0, m, rows):
        k = min(rows, m - i)
        X = torch.mul(G[i : i + k], r[i : i + k, None], out=work[: k * n].view(k, n))
        if P is not None:
            P[i : i + rows].addcmul_(X, c, value=-lr)
        else:
            sub_scaled_(p[i : i + rows], (X * c).view_as(p[i : i + rows]), lr)


def foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """The fast step: Sinkhorn on the scaling vectors (X = diag(r) G diag(c) is never formed
    inside the loop), its mat-vecs batched over same-shaped matrices and blocked so that G*G is
    re-read from the cache; X formed once, block by block, straight into ``p``."""
    lr, wd, iters, eps = lr_of(group), group["weight_decay"], group["iters"], group["eps"]
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    params, grads = take(live, params, grads)
    if not params:
        return
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    classes: dict[tuple[Any, ...], list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.ndim <= 1:
            norm = torch.linalg.vector_norm(g)
            sub_scaled_(p, g * (math.sqrt(g.numel()) / (norm + eps)), lr)
        else:
            G = as_matrix(g)
            classes.setdefault((*G.shape, g.dtype, g.device), []).append(i)
    for (m, n, dtype, device), members in classes.items():
        budget = BLOCK_BYTES.get(device.type, BLOCK_BYTES["cpu"]) // dtype.itemsize
        if m * n > budget:  # one large matrix at a time, in blocks of rows
            work = torch.empty(max(n, budget - budget % n), dtype=dtype, device=device)
            for i in members:
                G = as_matrix(grads[i])
                r, c = _scalings_row_blocks(G, iters, eps, work)
                _apply(params[i], G, r, c, lr, work)
            continue
        per_block = max(1, budget // (m * n))
        work = torch.empty(min(per_block, len(members)) * m * n, dtype=dtype, device=device)
        for start in range(0, len(members), per_block):
            block = members[start : start + per_block]
            mats = [as_matrix(grads[i]) for i in block]
            G2 = work[: len(block) * m * n].view(len(block), m, n)
            r, c = _scalings_batched(mats, iters, eps, G2)
            for j, i in enumerate(block):
                _apply(params[i], mats[j], r[j], c[j], lr, G2[j].view(-1))


def fused_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool = True,
) -> None:
    """The fused CPU tier: each matrix in native passes, one per Sinkhorn iteration plus one for
    the decay and the update (:mod:`slimopt.kernels.cpu`; bf16 read there and rounded once)."""
    from slimopt.kernels import cpu

    lr, wd, iters, eps = lr_of(group), group["weight_decay"], group["iters"], group["eps"]
    roundings = [kernel_rounding(p, s, stochastic) for p, s in zip(params, states)]
    cpu.sinkgd_step(params, grads, iters, eps, lr, wd, roundings)


def _native_takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    from slimopt.kernels import cpu

    return cpu.supports(p, g)


def sharded_step(views: list[Any], group: dict[str, Any]) -> None:
    """The step on the local rows of Shard(0) DTensor parameters (``slimopt.sharding.LocalView``),
    equal to :func:`reference` with ``shard=``, but with one all-reduce per Sinkhorn iteration
    for the column norms of all matrices (the vectors' norms ride along with the first)."""
    lr, wd, iters, eps = lr_of(group), group["weight_decay"], group["iters"], group["eps"]
    live = [v for v in views if global_numel(v.param, v.shard) > 0]
    mats = [v for v in live if v.grad.ndim >= 2]
    vecs = [v for v in live if v.grad.ndim <= 1]
    X = [as_matrix(v.grad) for v in mats]
    shapes = []
    for v in mats:
        shape = global_shape(v.grad, v.shard)
        shapes.append((shape[0], math.prod(shape[1:])))
    vec_norms: list[Any] = []
    red = Reduction()
    for v in vecs:
        g = v.grad
        if v.shard is None:
            vec_norms.append(norms([g], None)[0])
        else:
            vec_norms.append(red.add(g.to(acc_dtype(g)).pow(2).sum().reshape(1), v.shard))
    for it in range(iters):
        cols = []
        for j, (v, (_, n)) in enumerate(zip(mats, shapes)):
            X[j] = X[j] * (
                math.sqrt(n) / (torch.linalg.vector_norm(X[j], dim=1, keepdim=True) + eps)
            )
            if v.shard is None:
                cols.append(column_norm(X[j], None, keepdim=True))
            else:
                cols.append(red.add(X[j].mul(X[j]).sum(dim=0, dtype=acc_dtype(X[j])), v.shard))
        if it == 0 or len(red):
            sums = red.run()
        if it == 0:
            vec_norms = [
                k if isinstance(k, Tensor) else sums[k].sqrt()[0].to(v.grad.dtype)
                for v, k in zip(vecs, vec_norms)
            ]
        for j, (m, _) in enumerate(shapes):
            col = cols[j]
            if not isinstance(col, Tensor):
                col = sums[col].to(X[j].dtype).sqrt().unsqueeze(0)
            X[j] = X[j] * (math.sqrt(m) / (col + eps))
    if vecs and not mats:
        sums = red.run()
        vec_norms = [
            n if isinstance(n, Tensor) else sums[n].sqrt()[0].to(v.grad.dtype)
            for v, n in zip(vecs, vec_norms)
        ]
    updates = [x.view_as(v.grad) for v, x in zip(mats, X)]
    for v, norm in zip(vecs, vec_norms):
        g = v.grad
        updates.append(g * (math.sqrt(global_numel(g, v.shard)) / (norm + eps)))
    for v, u in zip(mats + vecs, updates):
        v.param.mul_(1.0 - lr * wd)
        sub_scaled_(v.param, u, lr)


def _triton_takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    """The Triton kernels take contiguous dense CUDA tensors of one dtype (pure bf16 included:
    rounded in the kernel)."""
    from slimopt.kernels import triton_ops

    return triton_ops.kernel_ok(p, g)


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
    fused_takes={"cpu": _native_takes, "cuda": _triton_takes},
    rounds_bf16=("cpu", "cuda"),
    sharded_step=sharded_step,
    momentum_key=None,
    row_blocks=RowBlocks(finish=_rows_finish, update=_rows_update),
    temporaries=1,  # G*G workspace and the update, block by block: at most one matrix
)
