"""Small helpers shared by the update rules: hyperparameter checks and shape views."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def as_matrix(t: Tensor) -> Tensor:
    """View a tensor with ndim >= 2 as ``[size(0), -1]`` (the spec's rule for ndim > 2).

    The column count is spelled out so that an empty local shard ``[0, ...]`` keeps its columns."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def rms(x: Tensor) -> Tensor:
    """sqrt(mean(x**2)) over all entries, as a 0-dim tensor."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def nan_if_nonfinite(sign: Tensor, x: Tensor) -> Tensor:
    """``sign(x)`` is finite even where ``x`` is +-inf; add ``0 * x`` so that an Inf becomes NaN
    instead of being hidden (0 * inf = nan, 0 * finite = 0, so finite entries are unchanged)."""
    return sign.add_(x.mul(0))


def _fmt(group: dict[str, Any]) -> str:
    names = group.get("param_names")
    algorithm = group.get("algorithm", "?")
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"{algorithm} (params: {shown})"
    return algorithm


def _value(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def check_nonneg(group: dict[str, Any], key: str) -> None:
    """A finite number >= 0 (ValueError naming ``key`` otherwise). A tensor (a learning rate
    that a schedule fills in place) must hold one floating value; it is read once, here."""
    v = group[key]
    if not isinstance(v, (int, float, Tensor)) or isinstance(v, bool):
        raise ValueError(f"{_fmt(group)}: '{key}' must be a number, got {v!r}")
    if isinstance(v, Tensor) and (v.numel() != 1 or not v.is_floating_point()):
        raise ValueError(
            f"{_fmt(group)}: a tensor '{key}' must hold one floating value, got shape "
            f"{tuple(v.shape)} and dtype {v.dtype}"
        )
    if isinstance(v, Tensor) and v.device.type == "meta":
        return  # no value to check (sizing on the meta device)
    if not _value(v) >= 0.0:  # also catches NaN
        raise ValueError(f"{_fmt(group)}: '{key}' must be >= 0, got {_value(v)}")
    if _value(v) == float("inf"):
        raise ValueError(f"{_fmt(group)}: '{key}' must be finite, got inf")


def check_lr_device(group: dict[str, Any], params: list[Tensor]) -> None:
    """A tensor lr lives on the CPU or on the parameters' device (where the update reads it
    without a host synchronisation); ValueError naming lr otherwise."""
    lr = group.get("lr")
    if not isinstance(lr, Tensor) or lr.device.type == "cpu":
        return
    devices = {p.device for p in params}
    if devices and devices != {lr.device}:
        shown = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(
            f"{_fmt(group)}: the tensor 'lr' is on {lr.device}, the parameters on {shown}; "
            "put it on the CPU or on the parameters' device"
        )


def check_unit_interval(group: dict[str, Any], key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{_fmt(group)}: '{key}' must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{_fmt(group)}: '{key}' must be in [0, 1), got {value}")


def check_betas(group: dict[str, Any]) -> None:
    """A pair (beta1, beta2) in [0, 1): two numbers, or, as torch's Adam allows, two tensors of
    one floating value each (a schedule may fill them in place; read once, here)."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{_fmt(group)}: 'betas' must be a pair (beta1, beta2), got {betas!r}")
    tensors = [isinstance(b, Tensor) for b in betas]
    if any(tensors) and not all(tensors):
        raise ValueError(
            f"{_fmt(group)}: 'betas' must be both numbers or both tensors (as torch's Adam), "
            f"got {betas!r}"
        )
    for i, b in enumerate(betas):
        if isinstance(b, Tensor):
            if b.numel() != 1 or not b.is_floating_point():
                raise ValueError(
                    f"{_fmt(group)}: a tensor 'betas[{i}]' must hold one floating value, got "
                    f"shape {tuple(b.shape)} and dtype {b.dtype}"
                )
            b = _value(b)
        check_unit_interval(group, f"betas[{i}]", b)


def betas_of(group: dict[str, Any]) -> tuple[float | Tensor, float | Tensor]:
    """The group's (beta1, beta2) for the update's arithmetic: a tensor stays a (0-dim) tensor,
    never read on the host (see :func:`lr_of`); a number stays a number."""
    return tuple(b.reshape(()) if isinstance(b, Tensor) else b for b in group["betas"])  # type: ignore[return-value]


def betas_value(group: dict[str, Any]) -> tuple[float, float]:
    """The group's (beta1, beta2) as Python floats (a tensor read on the host)."""
    b1, b2 = group["betas"]
    return _value(b1), _value(b2)


def has_tensor_betas(group: dict[str, Any]) -> bool:
    """Whether any of the group's betas is a tensor."""
    return any(isinstance(b, Tensor) for b in group.get("betas", ()))


def betas_on_device(group: dict[str, Any]) -> bool:
    """Whether any of the group's betas is a tensor outside the CPU (reading it would sync)."""
    return any(isinstance(b, Tensor) and b.device.type != "cpu" for b in group.get("betas", ()))


def add_scaled_(target: Tensor, x: Tensor, a: float | Tensor) -> Tensor:
    """``target += a * x`` in place (and returned), for a float or a tensor ``a``."""
    if isinstance(a, Tensor):
        return target.add_(x * a)
    return target.add_(x, alpha=a)


def foreach_add_scaled_(targets: list[Tensor], xs: list[Tensor], a: float | Tensor) -> None:
    """``t += a * x`` for each pair, with multi-tensor kernels, for a float or tensor ``a``."""
    if isinstance(a, Tensor):
        torch._foreach_add_(targets, torch._foreach_mul(xs, a))
    else:
        torch._foreach_add_(targets, xs, alpha=a)


def check_choice(group: dict[str, Any], key: str, choices: tuple[Any, ...]) -> None:
    if group[key] not in choices:
        raise ValueError(f"{_fmt(group)}: '{key}' must be one of {choices}, got {group[key]!r}")


def take(indices: list[int], *lists: list[Any]) -> tuple[list[Any], ...]:
    """The entries at ``indices`` of each of ``lists`` (parallel lists of params, grads, states).

    >>> take([0, 2], ["a", "b", "c"], [1, 2, 3])
    (['a', 'c'], [1, 3])
    """
    return tuple([xs[i] for i in indices] for xs in lists)


def others(done: set[int] | list[int], n: int) -> list[int]:
    """The indices below ``n`` that are not in ``done``, in order."""
    skip = set(done)
    return [i for i in range(n) if i not in skip]


def lr_of(group: dict[str, Any]) -> float | Tensor:
    """The group's learning rate for the update's arithmetic, never read from a tensor: a tensor
    lr stays a tensor (no host synchronisation on an accelerator), a float stays a float in eager
    mode. Inside torch.compile a float lr becomes a float64 0-dim tensor, so that once a schedule
    changes it torch.compile passes it to the graph as an input instead of recompiling the step
    for each value (as torch's own optimizers; see ``torch._dynamo.config.specialize_float``)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        return lr.reshape(()) if lr.ndim else lr
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=torch.float64) * lr
    return lr


def lr_value(group: dict[str, Any]) -> float:
    """The group's learning rate as a Python float (a tensor lr is read on the host): for the
    native CPU kernels and the single-tensor references that take a number."""
    return _value(group["lr"])


def sub_scaled_(target: Tensor, x: Tensor, lr: float | Tensor) -> None:
    """``target -= lr * x`` in place, for a float or a (traced) tensor ``lr``."""
    if isinstance(lr, Tensor):
        target.sub_(x * lr)
    else:
        target.add_(x, alpha=-lr)


def foreach_sub_scaled_(targets: list[Tensor], xs: list[Tensor], lr: float | Tensor) -> None:
    """``t -= lr * x`` for each pair, with multi-tensor kernels, for a float or tensor ``lr``."""
    if isinstance(lr, Tensor):
        torch._foreach_sub_(targets, torch._foreach_mul(xs, lr))
    else:
        torch._foreach_add_(targets, xs, alpha=-lr)


# Column reductions sweep blocks of rows of about this many bytes (they stay in the cache).
COLUMN_BLOCK_BYTES = 4 * 2**20


def column_sums(G: Tensor, *, square: bool) -> Tensor:
    """``sum(G**2, dim=0)`` (``square``) or ``sum(|G|, dim=0)`` of a matrix, in blocks of rows.

    torch's own reductions over dim 0 of a tall matrix stride through memory and run an order of
    magnitude below bandwidth on CPUs; a block of rows is transformed into a cache-sized buffer
    and summed there instead.

    >>> G = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    >>> column_sums(G, square=True), column_sums(G, square=False)
    (tensor([10., 20.]), tensor([4., 6.]))
    """
    m, n = G.shape
    rows = max(1, COLUMN_BLOCK_BYTES // max(1, n * G.element_size()))
    if G.device.type != "cpu" or rows >= m:
        return (G * G).sum(0) if square else G.abs().sum(0)
    # bf16/fp16 sums accumulate in float32 (as torch's reductions do), rounded once at the end
    acc = torch.zeros(n, dtype=torch.promote_types(G.dtype, torch.float32), device=G.device)
    buf = torch.empty(rows * n, dtype=G.dtype, device=G.device)
    for i in range(0, m, rows):
        block = G[i : i + rows]
        out = buf[: block.numel()].view(block.shape)
        if square:
            torch.mul(block, block, out=out)
        else:
            torch.abs(block, out=out)
        acc.add_(out.sum(0, dtype=acc.dtype))
    return acc.to(G.dtype)
