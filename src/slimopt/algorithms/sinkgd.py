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
from typing import Any

import torch
from torch import Tensor

from slimopt.algorithms._common import as_matrix, check_nonneg, lr_of
from slimopt.distributed import RowShard, column_norm, global_numel, global_shape, norms

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
    p.add_(X, alpha=-lr)


def foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """The fast step: scaling-vector Sinkhorn per matrix, multi-tensor weight decay and update."""
    lr, wd = lr_of(group), group["weight_decay"]
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    params = [params[i] for i in live]
    if not params:
        return
    updates = [sinkhorn_scaling(grads[i], group["iters"], group["eps"]) for i in live]
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_add_(params, updates, alpha=-lr)
