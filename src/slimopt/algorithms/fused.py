"""Fused update kernels: each rule's per-parameter update as one compiled loop.

Eager PyTorch runs a rule as several passes over memory (momentum, then the direction, then the
weight decay, then the update), each reading and writing whole tensors. The kernels below write a
rule's update for one parameter as a small torch function that ``torch.compile`` turns into a
single vectorized loop on CPU (a Triton kernel on GPU): every tensor is read once and written
once, which is the floor that ``slimopt profile`` measures against.

The fused path is **opt-in**: compiling takes tens of seconds per kernel on a small CPU (once per
kernel, dtype and ndim; later runs hit inductor's on-disk cache). Turn it on with
:func:`set_fused` or the environment variable ``SLIMOPT_FUSED=1``. When on, the ``foreach`` path
of each rule uses it for the tensors it can (plain, contiguous, CPU or CUDA); float32/float64 CPU
tensors take the native loops of :mod:`slimopt.algorithms.native` instead (lower call overhead,
and SinkGD's and the column sums' one-pass sweeps, which inductor cannot express), and the AdamW
rule uses ``torch``'s own fused kernel where its ``fused`` option is left at None. Where
``torch.compile`` is missing or fails (no C++ compiler, an unsupported backend), the rules fall
back to their multi-tensor path with a warning; the results never depend on it beyond rounding.

Hyperparameters reach a kernel as one float64 tensor (``lr`` included), so a learning-rate
schedule, a new weight decay or a bias correction never triggers a recompile; shapes are dynamic,
so one compiled kernel serves every parameter of a given ndim and dtype.

Example:
    >>> import torch, slimopt
    >>> from slimopt.algorithms import fused
    >>> fused.fused_enabled()
    False
    >>> w = torch.zeros(4, 3, requires_grad=True)
    >>> opt = slimopt.Lion([w], lr=0.1)
    >>> w.grad = torch.ones(4, 3)
    >>> with fused.enabled():  # fused kernels for this block only (compiles on first use)
    ...     opt.step()
    >>> w[0]
    tensor([-0.1000, -0.1000, -0.1000], grad_fn=<SelectBackward0>)
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

_TRUE = {"1", "true", "yes", "on"}
_enabled: bool = os.environ.get("SLIMOPT_FUSED", "").strip().lower() in _TRUE
_broken: str | None = None  # why torch.compile cannot be used here, once it has failed
_compiled: dict[str, Callable[..., Any]] = {}
# kernel name -> how many times it ran through torch.compile (for tests and ``slimopt profile``)
calls: dict[str, int] = {}


def set_fused(enabled: bool = True) -> None:
    """Turn the fused (compiled) update kernels on or off for every slimopt optimizer.

    Example:
        >>> from slimopt.algorithms import fused
        >>> fused.set_fused(True); fused.fused_enabled()
        True
        >>> fused.set_fused(False); fused.fused_enabled()
        False
    """
    global _enabled
    _enabled = bool(enabled)


def fused_enabled() -> bool:
    """Whether the fused kernels are on (and ``torch.compile`` has not failed here)."""
    return _enabled and _broken is None


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Turn the fused kernels on (or off) inside a ``with`` block."""
    global _enabled
    saved = _enabled
    _enabled = bool(on)
    try:
        yield
    finally:
        _enabled = saved


def _plain(t: Tensor) -> bool:
    # DTensor, functional and other subclasses, and non-dense layouts go the multi-tensor way.
    return (
        type(t) in (Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and t.device.type in ("cpu", "cuda")
        and t.is_contiguous()
    )


def usable(*tensor_lists: Iterable[Tensor]) -> bool:
    """Whether the fused kernels are on and can take every tensor given."""
    if not fused_enabled() or not hasattr(torch, "compile"):
        return False
    if torch.compiler.is_compiling():  # already inside a compiled step: let it trace the eager path
        return False
    return all(_plain(t) for tensors in tensor_lists for t in tensors)


def hyper(values: Iterable[float], device: torch.device) -> Tensor:
    """Hyperparameters as one float64 tensor on ``device`` (values, not constants, to the kernel)."""
    return torch.tensor(list(values), dtype=torch.float64, device=device)


class Hyper:
    """:func:`hyper` per device, each made on first use (a group may span devices).

    >>> Hyper([1e-3, 0.9]).on(torch.device("cpu"))
    tensor([0.0010, 0.9000], dtype=torch.float64)
    """

    def __init__(self, values: Iterable[float]) -> None:
        self.values = [float(v) for v in values]
        self._by_device: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Tensor:
        t = self._by_device.get(device)
        if t is None:
            t = self._by_device[device] = hyper(self.values, device)
        return t


def call(name: str, kernel: Callable[..., Any], *args: Any) -> Any:
    """Run ``kernel`` compiled (compiling it on first use); on a compiler failure warn once, run
    it eagerly, and leave the fused path off for the rest of the process."""
    global _broken
    if _broken is None:
        fn = _compiled.get(name)
        if fn is None:
            fn = _compiled[name] = torch.compile(kernel, dynamic=True, fullgraph=True)
        try:
            result = fn(*args)
            calls[name] = calls.get(name, 0) + 1
            return result
        except Exception as exc:  # noqa: BLE001 - a compiler failure of any kind falls back
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        # The kernel itself may be at fault (bad input): then eager raises too, and the fused
        # path stays on for the inputs that are fine.
        result = kernel(*args)
        _broken = reason
        warnings.warn(
            f"slimopt: torch.compile failed ({reason}); using the multi-tensor path",
            RuntimeWarning,
            stacklevel=2,
        )
        return result
    return kernel(*args)


# Column reductions sweep blocks of rows of about this many bytes (they stay in the cache).
COLUMN_BLOCK_BYTES = 4 * 2**20


def column_sums(G: Tensor, *, square: bool) -> Tensor:
    """``sum(G**2, dim=0)`` (``square``) or ``sum(|G|, dim=0)`` of a matrix, in blocks of rows.

    torch's own reductions over dim 0 of a tall matrix (``vector_norm(G, dim=0)`` in particular)
    stride through memory and run an order of magnitude below bandwidth on CPUs; a block of rows
    is transformed into a cache-sized buffer and summed there instead. With the fused kernels on,
    a CPU float32/float64 matrix takes one native pass (:func:`slimopt.algorithms.native.column_sums`).

    >>> G = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    >>> column_sums(G, square=True), column_sums(G, square=False)
    (tensor([10., 20.]), tensor([4., 6.]))
    """
    m, n = G.shape
    if fused_enabled() and G.device.type == "cpu" and G.dtype in (torch.float32, torch.float64):
        from slimopt.algorithms import native

        if G.is_contiguous() and m > 1 and native.library() is not None:
            return native.column_sums(G, square=square)
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


def _sign_keeping_inf(c: Tensor) -> Tensor:
    """sign(c), and NaN where c is +-inf or NaN (a compiled sign may map both to finite values)."""
    return torch.where(torch.isfinite(c), torch.sign(c), math.nan)


# --------------------------------------------------------------------------- kernels
# Each kernel updates its tensors in place (``copy_`` into the inputs, which inductor writes
# directly) and mirrors the arithmetic order of the rule's reference function.


def sgd_sai_kernel(p: Tensor, g: Tensor, m: Tensor, hp: Tensor, scale: Tensor) -> None:
    """SGD-SaI after its first step: ``hp = [lr, weight_decay, momentum]``, ``scale`` = gsnr."""
    lr, wd, mu = hp[0], hp[1], hp[2]
    m_new = m * mu + g * (1.0 - mu)
    step = (lr * scale).to(p.dtype)
    p.copy_(p * (1.0 - wd * lr) - m_new * step)
    m.copy_(m_new)


def lion_kernel(p: Tensor, g: Tensor, m: Tensor, hp: Tensor) -> None:
    """Lion: ``hp = [lr, weight_decay, beta1, beta2]``."""
    lr, wd, b1, b2 = hp[0], hp[1], hp[2], hp[3]
    c = m * b1 + g * (1.0 - b1)
    p.copy_(p * (1.0 - lr * wd) - lr * _sign_keeping_inf(c))
    m.copy_(m * b2 + g * (1.0 - b2))


def sage_kernel(p: Tensor, g: Tensor, m: Tensor, H: Tensor, hp: Tensor) -> None:
    """SAGE's update of a [rows, d] matrix given its damping ``H`` [d]:
    ``hp = [lr, weight_decay, beta1, beta2]`` (official order: momentum first)."""
    lr, wd, b1, b2 = hp[0], hp[1], hp[2], hp[3]
    m_new = m * b2 + g * (1.0 - b2)
    c = m_new * b1 + g * (1.0 - b1)
    p.copy_(p * (1.0 - lr * wd) - lr * (_sign_keeping_inf(c) * H))
    m.copy_(m_new)


def sage_lion_order_kernel(p: Tensor, g: Tensor, m: Tensor, H: Tensor, hp: Tensor) -> None:
    """SAGE with ``lion_order=True``: the direction from the old momentum."""
    lr, wd, b1, b2 = hp[0], hp[1], hp[2], hp[3]
    c = m * b1 + g * (1.0 - b1)
    p.copy_(p * (1.0 - lr * wd) - lr * (_sign_keeping_inf(c) * H))
    m.copy_(m * b2 + g * (1.0 - b2))


def scale_rows_kernel(p: Tensor, u: Tensor, hp: Tensor) -> None:
    """SCALE on a [rows, n] matrix, each row to RMS 1: ``hp = [lr, weight_decay, eps]``."""
    lr, wd, eps = hp[0], hp[1], hp[2]
    denom = torch.sqrt(torch.mean(u * u, dim=1, keepdim=True)).clamp(min=eps)
    step = lr / denom  # one division per row, not per entry
    p.copy_(p * (1.0 - lr * wd) - u * step)


def scale_by_kernel(p: Tensor, u: Tensor, step: Tensor, hp: Tensor) -> None:
    """SCALE's update given ``step`` = lr / its denominators (broadcastable, computed outside so
    that the loop multiplies instead of dividing): ``hp = [lr, weight_decay]``."""
    lr, wd = hp[0], hp[1]
    p.copy_(p * (1.0 - lr * wd) - u * step)


__all__ = [
    "Hyper",
    "call",
    "calls",
    "column_sums",
    "enabled",
    "fused_enabled",
    "hyper",
    "lion_kernel",
    "sage_kernel",
    "sage_lion_order_kernel",
    "scale_by_kernel",
    "scale_rows_kernel",
    "set_fused",
    "sgd_sai_kernel",
    "usable",
]
