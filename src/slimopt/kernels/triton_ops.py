"""Triton kernels: the fused ``"cuda"`` tier of each update rule.

One callable per rule, with the signature of the rule's ``foreach``::

    lion_step, sgd_sai_step, sage_step, scale_step, sinkgd_step
        (params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict) -> None

Each updates ``params`` in place and the ``states`` dicts as the rule's ``reference`` does (state keys,
the ``state["step"]`` counter, decoupled weight decay, NaN/Inf behaviour). Kernels take CUDA tensors,
or CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before this module is
imported; that is how the test suite runs them). The kernels take only what they accept and know
no rule's reference: ``Rule.partition`` (its ``fused_takes``) gives them contiguous dense tensors
of one float32/bfloat16/float16 dtype, and keeps every other tensor on the rule's multi-tensor
path; a tensor they cannot take is a ValueError, never stepped another way here. Their first-use
check against each rule's reference lives with the rules (:mod:`slimopt.algorithms.kernel_check`).

Launch design (``docs/kernels.md`` has the details and the bytes each kernel moves):

* element-wise passes are **multi-tensor**: one launch covers every parameter of a dtype. The host
  builds two small int64 tables, cached by (addresses, sizes), so that a training loop copies them
  to the device once: a per-tensor table (data addresses of p, g, state, numel, columns, workspace
  offsets) and a per-program table (tensor index, block offset). Each program loads its row of the
  tables and casts the addresses to typed pointers. This works the same under the interpreter.
* reductions (SAGE's column mean of ``|g|``, SCALE's row or column RMS, SinkGD's row and column
  norms of ``diag(r) G diag(c)``) accumulate in float32, are multi-tensor too, and never write a
  temporary the size of the gradient; column reductions write a few rows of partial sums that a
  second small kernel folds, so the result does not depend on scheduling.
* hyperparameters are kernel arguments; a tensor ``lr`` on the parameters' device is read by the
  kernels from device memory, and a tensor ``state["step"]`` is incremented on the device and read
  there (SAGE's bias correction, SGD-SaI's first step), so a step with tensor lr and tensor steps
  does no host synchronisation and can be captured in a CUDA graph.

Example (CPU tensors need ``TRITON_INTERPRET=1`` in the environment before the import)::

    >>> import torch
    >>> from slimopt.kernels import triton_ops                     # doctest: +SKIP
    >>> p, g = torch.zeros(3, 4, device="cuda"), torch.ones(3, 4, device="cuda")  # doctest: +SKIP
    >>> group = {"lr": 0.1, "betas": (0.9, 0.99), "weight_decay": 0.0}
    >>> state = {"step": 0, "exp_avg": torch.zeros_like(p)}        # doctest: +SKIP
    >>> triton_ops.lion_step([p], [g], [state], group)             # doctest: +SKIP
    >>> p[0, 0].item(), state["step"]                              # doctest: +SKIP
    (-0.1, 1)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimopt.rounding import kernel_rounding

BLOCK = 1024  # elements per program of an element-wise pass
ROW_BLOCK = 4  # rows per program of a row reduction
COL_BLOCK = 128  # columns per program of a column reduction
TILE_ROWS = 32  # rows per tile of a column reduction
CHUNKS_TARGET = 256  # aim for about this many row chunks x column blocks per column reduction
CHUNK_TILE = 16  # rows of partial sums folded per load
SWEEP_ROWS = 16  # rows per program of a SinkGD sweep

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ----------------------------------------------------------------------------- shared device code
@triton.jit
def _ptr(table, row, field: tl.constexpr, width: tl.constexpr, dtype: tl.constexpr):
    """Field ``field`` of row ``row`` of an int64 table, cast to a pointer to ``dtype``."""
    return tl.load(table + row * width + field).to(tl.pointer_type(dtype))


@triton.jit
def _sign_keep_nan(c):
    """sign(c), NaN where c is NaN or +-inf (sign + 0*c), as ``nan_if_nonfinite`` does."""
    s = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    return s + 0.0 * c


@triton.jit
def _rnd(x, DTYPE: tl.constexpr):
    """x rounded to the parameter dtype and back to float32 (what the reference stores).

    bfloat16 rounds to nearest even with integer arithmetic: the same bits on a GPU and under
    the interpreter (whose own float32 -> bfloat16 cast truncates)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _out(x, DTYPE: tl.constexpr):
    """x rounded to nearest in the parameter dtype, for a store."""
    return _rnd(x, DTYPE).to(DTYPE)


@triton.jit
def _nan_min(a, b):
    """min(a, b), NaN if either is NaN (as torch.minimum and clamp)."""
    return tl.where((a != a) | (a < b), a, b)


@triton.jit
def _nan_max(a, b):
    """max(a, b), NaN if either is NaN (as torch.maximum and clamp)."""
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR: tl.constexpr):
    if LR_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
        decay = 1.0 - lr * wd
    return lr, decay


@triton.jit
def _sr_bits(idx, seed_lo, seed_hi, step):
    """The 16-bit stochastic-rounding integers (uint32) of global element indices ``idx`` (int64):
    Philox4x32-10 keyed by the seed at counter (idx // 8, step, 0), half idx % 2 of word
    (idx % 8) // 2, as ``slimopt.rounding`` (spec: "Lean modes")."""
    j = idx >> 3
    k = idx & 7
    seed = (seed_hi.to(tl.uint64) << 32) | seed_lo.to(tl.uint64)
    c0 = (j & 0xFFFFFFFF).to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + step.to(tl.uint32)
    c3 = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3, 10)
    w = tl.where(k < 2, r0, tl.where(k < 4, r1, tl.where(k < 6, r2, r3)))
    return tl.where((k & 1) == 1, w >> 16, w & 0xFFFF)


@triton.jit
def _sr_round16(x, r):
    """float32 ``x`` rounded stochastically with the integers ``r``: the bf16 bit pattern as
    int16 (infinities kept, a NaN made quiet)."""
    bits = x.to(tl.uint32, bitcast=True)
    finite = (x == x) & (tl.abs(x) != float("inf"))
    high = tl.where(finite, (bits + r) >> 16, (bits >> 16) | tl.where(x != x, 0x40, 0))
    return high.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _sr_round_kernel(src, dst, n, offset, seed_lo, seed_hi, step, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n
    x = tl.load(src + k, mask=mask, other=0.0)
    r = _sr_bits(k + offset, seed_lo, seed_hi, step)
    tl.store(dst + k, _sr_round16(x, r), mask=mask)


# ----------------------------------------------------------------------------- element-wise kernels
# Per-tensor table of the element-wise kernels: [p, g, m, numel, extra (3 fields), first program]


@triton.jit
def _lion_kernel(
    tab, prog, lr_ptr, lr, decay, wd, b1, b2,
    LR_PTR: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(prog + pid)
    offs = (pid - tl.load(tab + t * 8 + 7)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(tab + t * 8 + 3)
    pp = _ptr(tab, t, 0, 8, DTYPE)
    gp = _ptr(tab, t, 1, 8, DTYPE)
    mp = _ptr(tab, t, 2, 8, DTYPE)
    lr, decay = _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR)
    p = tl.load(pp + offs, mask=mask).to(tl.float32)
    g = tl.load(gp + offs, mask=mask).to(tl.float32)
    m = tl.load(mp + offs, mask=mask).to(tl.float32)
    p = _rnd(p * decay, DTYPE)
    c = _rnd(_rnd(m * b1, DTYPE) + g * (1.0 - b1), DTYPE)
    p = p - lr * _sign_keep_nan(c)
    m = _rnd(m * b2, DTYPE) + g * (1.0 - b2)
    tl.store(pp + offs, _out(p, DTYPE), mask=mask)
    tl.store(mp + offs, _out(m, DTYPE), mask=mask)


@triton.jit(do_not_specialize=["sr_base"])
def _lion_bf16_kernel(
    tab, prog, srt, sr_base, lr_ptr, lr, decay, wd, b1, b2, a1, a2,
    LR_PTR: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Pure bf16: [p, g, m, numel, -, -, -, first program] and the rounding table srt (see
    # _store_bf16_param); fp32 registers with torch's fused multiply-adds (add(x, alpha=a) =
    # fma(x, a, self)), m rounded to nearest, p stochastically with the counter-based bits.
    pid = tl.program_id(0)
    t = tl.load(prog + pid)
    offs = (pid - tl.load(tab + t * 8 + 7)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(tab + t * 8 + 3)
    pp = _ptr(tab, t, 0, 8, tl.bfloat16)
    gp = _ptr(tab, t, 1, 8, tl.bfloat16)
    mp = _ptr(tab, t, 2, 8, tl.bfloat16)
    lr, decay = _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR)
    p = tl.load(pp + offs, mask=mask).to(tl.float32)
    g = tl.load(gp + offs, mask=mask).to(tl.float32)
    m = tl.load(mp + offs, mask=mask).to(tl.float32)
    c = tl.fma(g, a1, m * b1)
    p = tl.fma(_sign_keep_nan(c), -lr, p * decay)
    tl.store(mp + offs, _out(tl.fma(g, a2, m * b2), tl.bfloat16), mask=mask)
    _store_bf16_param(pp, offs, mask, p, srt, t, sr_base, STOCHASTIC)


@triton.jit(do_not_specialize=["sr_base"])
def _sgd_sai_bf16_kernel(
    tab, prog, srt, sr_base, steps, decay, mu, a, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Pure bf16, the tables of _lion_bf16_kernel; steps[t]: the tensor's float32 lr * gsnr.
    # m = fma(g, 1 - mu, m*mu) (mu = 0 at a first step: m = g); p = p*decay - m*step.
    pid = tl.program_id(0)
    t = tl.load(prog + pid)
    offs = (pid - tl.load(tab + t * 8 + 7)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(tab + t * 8 + 3)
    pp = _ptr(tab, t, 0, 8, tl.bfloat16)
    gp = _ptr(tab, t, 1, 8, tl.bfloat16)
    mp = _ptr(tab, t, 2, 8, tl.bfloat16)
    step = tl.load(steps + t)
    g = tl.load(gp + offs, mask=mask).to(tl.float32)
    m = tl.fma(g, a, tl.load(mp + offs, mask=mask).to(tl.float32) * mu)
    tl.store(mp + offs, _out(m, tl.bfloat16), mask=mask)
    p = tl.load(pp + offs, mask=mask).to(tl.float32) * decay - m * step
    _store_bf16_param(pp, offs, mask, p, srt, t, sr_base, STOCHASTIC)


@triton.jit
def _store_bf16_param(pp, idx, mask, p, srt, t, sr_base, STOCHASTIC: tl.constexpr):
    """Store a pure-bf16 parameter's new fp32 values ``p`` at element indices ``idx`` of tensor
    ``t``: stochastically with the counter-based bits, or to nearest. The rounding table ``srt``
    (int64 [tensors, 3], cached like the launch tables) holds per tensor its seed, its write count
    minus ``sr_base`` (a kernel scalar, the launch's smallest write count, so the table stays the
    same from step to step) and the global index of its first element."""
    if STOCHASTIC:
        seed = tl.load(srt + t * 3)
        step = (sr_base.to(tl.int64) + tl.load(srt + t * 3 + 1)) & 0xFFFFFFFF
        r = _sr_bits(
            idx.to(tl.int64) + tl.load(srt + t * 3 + 2),
            seed & 0xFFFFFFFF,
            (seed >> 32) & 0xFFFFFFFF,
            step,
        )
        tl.store(pp.to(tl.pointer_type(tl.int16)) + idx, _sr_round16(p, r), mask=mask)
    else:
        tl.store(pp + idx, _out(p, tl.bfloat16), mask=mask)


@triton.jit
def _sgd_sai_kernel(
    tab, prog, lr_ptr, gmax_ptr, lr, decay, wd, mu,
    LR_PTR: tl.constexpr, NORM: tl.constexpr, MOM: tl.constexpr, STEP_PTR: tl.constexpr,
    FIRST: tl.constexpr, DTYPE: tl.constexpr, STEP_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # extra0: address of gsnr (float32), extra1: address of the step counter (STEP_PTR only)
    pid = tl.program_id(0)
    t = tl.load(prog + pid)
    offs = (pid - tl.load(tab + t * 8 + 7)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(tab + t * 8 + 3)
    pp = _ptr(tab, t, 0, 8, DTYPE)
    gp = _ptr(tab, t, 1, 8, DTYPE)
    lr, decay = _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR)
    scale = tl.load(_ptr(tab, t, 4, 8, tl.float32))
    if NORM:
        scale = scale / tl.load(gmax_ptr)
    step = _rnd(lr * scale, DTYPE)
    g = tl.load(gp + offs, mask=mask).to(tl.float32)
    if MOM:
        mp = _ptr(tab, t, 2, 8, DTYPE)
        m = tl.load(mp + offs, mask=mask).to(tl.float32)
        later = _rnd(_rnd(m * mu, DTYPE) + g * (1.0 - mu), DTYPE)
        if STEP_PTR:
            # the counter was already advanced on the device: the first step reads 1
            first = tl.load(_ptr(tab, t, 5, 8, STEP_DTYPE)) == 1
            m = tl.where(first, g, later)
        elif FIRST:
            m = g
        else:
            m = later
        tl.store(mp + offs, _out(m, DTYPE), mask=mask)
    else:
        m = g
    p = tl.load(pp + offs, mask=mask).to(tl.float32)
    p = _rnd(p * decay, DTYPE)
    p = p - _rnd(m * step, DTYPE)
    tl.store(pp + offs, _out(p, DTYPE), mask=mask)


@triton.jit
def _sage_update_kernel(
    tab, prog, hws, lr_ptr, lr, decay, wd, b1, b2,
    LR_PTR: tl.constexpr, LION_ORDER: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # extra0: columns n (H broadcasts over rows), extra1: offset of H in the float32 workspace
    pid = tl.program_id(0)
    t = tl.load(prog + pid)
    offs = (pid - tl.load(tab + t * 8 + 7)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    col = offs.to(tl.int32) % n.to(tl.int32)  # int32: 64-bit division is slow on GPUs
    h = tl.load(hws + tl.load(tab + t * 8 + 5) + col, mask=mask)
    pp = _ptr(tab, t, 0, 8, DTYPE)
    gp = _ptr(tab, t, 1, 8, DTYPE)
    mp = _ptr(tab, t, 2, 8, DTYPE)
    lr, decay = _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR)
    p = tl.load(pp + offs, mask=mask).to(tl.float32)
    g = tl.load(gp + offs, mask=mask).to(tl.float32)
    m = tl.load(mp + offs, mask=mask).to(tl.float32)
    p = _rnd(p * decay, DTYPE)
    if LION_ORDER:
        c = _rnd(_rnd(m * b1, DTYPE) + g * (1.0 - b1), DTYPE)
        m = _rnd(_rnd(m * b2, DTYPE) + g * (1.0 - b2), DTYPE)
    else:
        m = _rnd(_rnd(m * b2, DTYPE) + g * (1.0 - b2), DTYPE)
        c = _rnd(_rnd(m * b1, DTYPE) + g * (1.0 - b1), DTYPE)
    u = _rnd(_sign_keep_nan(c) * h, DTYPE)
    p = p - lr * u
    tl.store(pp + offs, _out(p, DTYPE), mask=mask)
    tl.store(mp + offs, _out(m, DTYPE), mask=mask)


@triton.jit
def _scale_by_columns_kernel(
    tab, prog, ws, lr_ptr, lr, decay, wd,
    LR_PTR: tl.constexpr, SINKHORN: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """p <- p*decay - lr * u * w: SCALE (u = g or m, w = 1/denominator of the column) or SinkGD
    (SINKHORN: u = g * r[row] * c[col], the Sinkhorn scalings)."""
    # extra0: columns n, extra1: offset of the column vector in ws, extra2: offset of r in ws
    pid = tl.program_id(0)
    t = tl.load(prog + pid)
    offs = (pid - tl.load(tab + t * 8 + 7)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    o32 = offs.to(tl.int32)  # int32: 64-bit division is slow on GPUs
    n32 = n.to(tl.int32)
    w = tl.load(ws + tl.load(tab + t * 8 + 5) + o32 % n32, mask=mask, other=1.0)
    pp = _ptr(tab, t, 0, 8, DTYPE)
    up = _ptr(tab, t, 1, 8, DTYPE)
    lr, decay = _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR)
    p = tl.load(pp + offs, mask=mask).to(tl.float32)
    u = tl.load(up + offs, mask=mask).to(tl.float32)
    if SINKHORN:
        r = tl.load(ws + tl.load(tab + t * 8 + 6) + o32 // n32, mask=mask)
        x = u * r * w
        p = _rnd(p * decay, DTYPE) - lr * x
    else:
        p = _rnd(p * decay, DTYPE) - lr * _rnd(u / w, DTYPE)
    tl.store(pp + offs, _out(p, DTYPE), mask=mask)


@triton.jit(do_not_specialize=["sr_base"])
def _sage_update_bf16_kernel(
    tab, prog, hws, srt, sr_base, lr_ptr, lr, decay, wd, b1, b2, a1, a2,
    LR_PTR: tl.constexpr, LION_ORDER: tl.constexpr, STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """SAGE's update in pure bf16 (the table of _sage_update_kernel, the rounding table of
    _store_bf16_param): m' = fma(g, 1-b2, m*b2), c = fma(g, 1-b1, (m or m')*b1),
    p = fma(sign(c)*H, -lr, p*decay) in fp32 registers; m' rounded to nearest, p stochastically."""
    pid = tl.program_id(0)
    t = tl.load(prog + pid)
    offs = (pid - tl.load(tab + t * 8 + 7)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    col = offs.to(tl.int32) % n.to(tl.int32)
    h = tl.load(hws + tl.load(tab + t * 8 + 5) + col, mask=mask)
    pp = _ptr(tab, t, 0, 8, tl.bfloat16)
    gp = _ptr(tab, t, 1, 8, tl.bfloat16)
    mp = _ptr(tab, t, 2, 8, tl.bfloat16)
    lr, decay = _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR)
    p = tl.load(pp + offs, mask=mask).to(tl.float32)
    g = tl.load(gp + offs, mask=mask).to(tl.float32)
    m = tl.load(mp + offs, mask=mask).to(tl.float32)
    m_new = tl.fma(g, a2, m * b2)
    if LION_ORDER:
        c = tl.fma(g, a1, m * b1)
    else:
        c = tl.fma(g, a1, m_new * b1)
    p = tl.fma(_sign_keep_nan(c) * h, -lr, p * decay)
    tl.store(mp + offs, _out(m_new, tl.bfloat16), mask=mask)
    _store_bf16_param(pp, offs, mask, p, srt, t, sr_base, STOCHASTIC)


@triton.jit(do_not_specialize=["sr_base"])
def _scale_by_columns_bf16_kernel(
    tab, prog, ws, srt, sr_base, lr_ptr, lr, decay, wd, b, a,
    LR_PTR: tl.constexpr, SINKHORN: tl.constexpr, MOM: tl.constexpr, STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """_scale_by_columns_kernel in pure bf16, p = fma(x, -lr, p*decay) in fp32 registers: SCALE
    (x = u / w, u = g, or with MOM u = fma(g, 1-b, m*b), m written here rounded to nearest) or
    SinkGD (x = g * r[row] * c[col]). Table: [p, g, m, numel, columns, offset of the column
    vector in ws, offset of r in ws, first program]; the rounding table of _store_bf16_param."""
    pid = tl.program_id(0)
    t = tl.load(prog + pid)
    offs = (pid - tl.load(tab + t * 8 + 7)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    o32 = offs.to(tl.int32)
    n32 = n.to(tl.int32)
    w = tl.load(ws + tl.load(tab + t * 8 + 5) + o32 % n32, mask=mask, other=1.0)
    pp = _ptr(tab, t, 0, 8, tl.bfloat16)
    gp = _ptr(tab, t, 1, 8, tl.bfloat16)
    lr, decay = _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR)
    p = tl.load(pp + offs, mask=mask).to(tl.float32)
    u = tl.load(gp + offs, mask=mask).to(tl.float32)
    if SINKHORN:
        r = tl.load(ws + tl.load(tab + t * 8 + 6) + o32 // n32, mask=mask)
        x = u * r * w
    else:
        if MOM:
            mp = _ptr(tab, t, 2, 8, tl.bfloat16)
            u = tl.fma(u, a, tl.load(mp + offs, mask=mask).to(tl.float32) * b)
            tl.store(mp + offs, _out(u, tl.bfloat16), mask=mask)
        x = u / w
    p = tl.fma(x, -lr, p * decay)
    _store_bf16_param(pp, offs, mask, p, srt, t, sr_base, STOCHASTIC)


# ----------------------------------------------------------------------------- reductions
# Per-tensor tables of the reductions: as each kernel's docstring says


@triton.jit
def _col_partials_kernel(
    tab, prog, part, b, a,
    MODE: tl.constexpr, DTYPE: tl.constexpr, TILE_ROWS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """Partial column sums over a chunk of rows, into ``part`` (float32):
    MODE 0: |x| (SAGE);  1: x**2 (SCALE);  2: x**2 after m <- b*m + (1-b)*x, stored (SCALE with
    momentum); 4: u**2 for u = fma(x, a, m*b) (a = 1-b; pure-bf16 SCALE with momentum, m
    written later by the update). Table: [x, m, -, rows, cols, -, offset of the partials, rows
    per chunk]."""
    pid = tl.program_id(0)
    t = tl.load(prog + 3 * pid)
    chunk = tl.load(prog + 3 * pid + 1)
    cols = tl.load(prog + 3 * pid + 2) + tl.arange(0, COLS)
    rows = tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    chunk_rows = tl.load(tab + t * 8 + 7)
    xp = _ptr(tab, t, 0, 8, DTYPE)
    cmask = cols < n
    acc = tl.zeros([COLS], dtype=tl.float32)
    start = chunk * chunk_rows
    stop = tl.minimum(start + chunk_rows, rows)
    for i0 in range(start, stop, TILE_ROWS):
        r_idx = i0 + tl.arange(0, TILE_ROWS)
        rmask = r_idx < stop
        mask = rmask[:, None] & cmask[None, :]
        idx = r_idx[:, None].to(tl.int64) * n + cols[None, :]
        x = tl.load(xp + idx, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            v = tl.abs(x)
        elif MODE == 1:
            v = x * x
        elif MODE == 4:
            mp = _ptr(tab, t, 1, 8, DTYPE)
            u = tl.fma(x, a, tl.load(mp + idx, mask=mask, other=0.0).to(tl.float32) * b)
            v = u * u
        else:
            mp = _ptr(tab, t, 1, 8, DTYPE)
            m = tl.load(mp + idx, mask=mask, other=0.0).to(tl.float32)
            m = _rnd(_rnd(m * b, DTYPE) + x * (1.0 - b), DTYPE)
            tl.store(mp + idx, _out(m, DTYPE), mask=mask)
            v = m * m
        acc += tl.sum(v, axis=0)
    # partial sums of this tensor live in part[ws1 + chunk * n + col]
    tl.store(part + tl.load(tab + t * 8 + 6) + chunk * n + cols, acc, mask=cmask)


@triton.jit
def _fold_partials(
    part, poff, chunks, n, cols, cmask, CHUNK_TILE: tl.constexpr, COLS: tl.constexpr
):
    """sum over k < chunks of part[poff + k*n + cols], CHUNK_TILE rows of partials per load (a
    long loop of one row at a time would wait on memory at every step)."""
    acc = tl.zeros([CHUNK_TILE, COLS], dtype=tl.float32)
    for k0 in range(0, chunks, CHUNK_TILE):
        k = k0 + tl.arange(0, CHUNK_TILE)
        mask = (k < chunks)[:, None] & cmask[None, :]
        acc += tl.load(
            part + poff + k[:, None].to(tl.int64) * n + cols[None, :], mask=mask, other=0.0
        )
    return tl.sum(acc, axis=0)


@triton.jit
def _sage_damping_kernel(
    tab, part, ws, steps_ptr, b2, a2, bc_host, eps, s32_off,
    STEP_PTR: tl.constexpr, STEP_DTYPE: tl.constexpr, DTYPE: tl.constexpr, PURE: tl.constexpr,
    R: tl.constexpr, COLS: tl.constexpr, CHUNK_TILE: tl.constexpr,
):  # fmt: skip
    """One program per tensor: s = column mean of |g| (folding the partial sums), S <- b2*S +
    (1-b2)*s, S^ = S / (1 - b2**t), H = min(min(rms(S^)/(S^+eps), 1), rms(s)/(s+eps)) into ws.
    Table: [g, S, -, rows, cols, offset of H/s in ws, offset of partials, chunks];
    bc_host[t] (float32) holds 1 - b2**t when the step counts live on the host.
    PURE (bf16 S of a pure-bf16 parameter): every intermediate in fp32, S = fma(s, a2, S*b2)
    (a2 = 1-b2) stored rounded to nearest and kept in fp32 at ws[s32_off + offset] for S^;
    otherwise intermediates rounded to DTYPE where the reference in DTYPE stores them. R: the
    dtype intermediates round to (float32 with PURE, else DTYPE)."""
    t = tl.program_id(0)
    rows = tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    hoff = tl.load(tab + t * 8 + 5)
    poff = tl.load(tab + t * 8 + 6)
    chunks = tl.load(tab + t * 8 + 7)
    sp = _ptr(tab, t, 1, 8, DTYPE)
    if STEP_PTR:
        step = tl.load(_ptr(tab, t, 2, 8, STEP_DTYPE)).to(tl.float32)
        bc = 1.0 - tl.exp2(step * tl.log2(b2))
    else:
        bc = tl.load(bc_host + t)
    sq_hat = tl.zeros([COLS], dtype=tl.float32)
    sq_s = tl.zeros([COLS], dtype=tl.float32)
    for j0 in range(0, n, COLS):
        cols = j0 + tl.arange(0, COLS)
        cmask = cols < n
        acc = _fold_partials(part, poff, chunks, n, cols, cmask, CHUNK_TILE, COLS)
        s = _rnd(acc / rows.to(tl.float32), R)
        S = tl.load(sp + cols, mask=cmask, other=0.0).to(tl.float32)
        if PURE:
            S = tl.fma(s, a2, S * b2)
            tl.store(ws + s32_off + hoff + cols, S, mask=cmask)
        else:
            S = _rnd(_rnd(S * b2, DTYPE) + s * (1.0 - b2), DTYPE)
        tl.store(sp + cols, _out(S, DTYPE), mask=cmask)
        S_hat = _rnd(S / bc, R)
        sq_hat += S_hat * S_hat
        sq_s += s * s
        tl.store(ws + hoff + cols, s, mask=cmask)
    tl.debug_barrier()  # the second sweep re-reads the S and s this program wrote
    root_n = tl.sqrt(n.to(tl.float32))
    rms_hat = tl.sqrt(tl.sum(sq_hat, axis=0)) / root_n
    rms_s = tl.sqrt(tl.sum(sq_s, axis=0)) / root_n
    for j0 in range(0, n, COLS):
        cols = j0 + tl.arange(0, COLS)
        cmask = cols < n
        s = tl.load(ws + hoff + cols, mask=cmask, other=1.0)
        if PURE:
            S = tl.load(ws + s32_off + hoff + cols, mask=cmask, other=1.0)
        else:
            S = tl.load(sp + cols, mask=cmask, other=1.0).to(tl.float32)
        S_hat = _rnd(S / bc, R)
        d_ema = _nan_min(_rnd(rms_hat / _rnd(S_hat + eps, R), R), 1.0)
        d_inst = _rnd(rms_s / _rnd(s + eps, R), R)
        h = _nan_min(d_ema, d_inst)
        tl.store(ws + hoff + cols, h, mask=cmask)


@triton.jit
def _col_finish_kernel(
    tab, part, ws, eps, MODE: tl.constexpr, COLS: tl.constexpr, CHUNK_TILE: tl.constexpr,
):  # fmt: skip
    """Folds the partial column sums of each tensor (one program per tensor x column block):
    MODE 1 (SCALE): ws[c] = max(sqrt(sum / rows), eps), the column denominator;
    MODE 3 (SinkGD): c <- c * sqrt(rows) / (c * sqrt(q) + eps) where q > 0 (c lives in ws).
    Table: [-, -, -, rows, cols, offset of the column vector, offset of the partials, chunks]."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    rows = tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    coff = tl.load(tab + t * 8 + 5)
    poff = tl.load(tab + t * 8 + 6)
    chunks = tl.load(tab + t * 8 + 7)
    cmask = cols < n
    acc = _fold_partials(part, poff, chunks, n, cols, cmask, CHUNK_TILE, COLS)
    if MODE == 1:
        denom = _nan_max(tl.sqrt(acc / rows.to(tl.float32)), eps)
        tl.store(ws + coff + cols, denom, mask=cmask)
    else:
        c = tl.load(ws + coff + cols, mask=cmask, other=1.0)
        q = tl.sqrt(acc)
        new = c * (tl.sqrt(rows.to(tl.float32)) / (c * q + eps))
        tl.store(ws + coff + cols, tl.where(acc == 0.0, c, new), mask=cmask)


@triton.jit
def _scale_rows_kernel(
    tab, prog, lr_ptr, lr, decay, wd, b, eps,
    LR_PTR: tl.constexpr, MOM: tl.constexpr, DTYPE: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """SCALE on rows (norm_dim=1, and vectors as one row): per row u = g (or m <- b*m + (1-b)*g),
    denom = max(rms(u), eps), p <- p*decay - lr * u / denom. Two sweeps of the row: the first
    reduces (and writes m), the second updates p. Table: [p, g, m, rows, cols, -, -, -]."""
    pid = tl.program_id(0)
    t = tl.load(prog + 2 * pid)
    r_idx = tl.load(prog + 2 * pid + 1) + tl.arange(0, ROWS)
    rows = tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    rmask = r_idx < rows
    pp = _ptr(tab, t, 0, 8, DTYPE)
    gp = _ptr(tab, t, 1, 8, DTYPE)
    up = gp
    if MOM:
        up = _ptr(tab, t, 2, 8, DTYPE)
    lr, decay = _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR)
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    base = r_idx[:, None].to(tl.int64) * n
    for j0 in range(0, n, COLS):
        cols = j0 + tl.arange(0, COLS)
        mask = rmask[:, None] & (cols < n)[None, :]
        idx = base + cols[None, :]
        u = tl.load(gp + idx, mask=mask, other=0.0).to(tl.float32)
        if MOM:
            m = tl.load(up + idx, mask=mask, other=0.0).to(tl.float32)
            u = _rnd(_rnd(m * b, DTYPE) + u * (1.0 - b), DTYPE)
            tl.store(up + idx, _out(u, DTYPE), mask=mask)
        acc += u * u
    denom = _nan_max(tl.sqrt(tl.sum(acc, axis=1) / n.to(tl.float32)), eps)
    tl.debug_barrier()  # the second sweep re-reads the m this program wrote
    for j0 in range(0, n, COLS):
        cols = j0 + tl.arange(0, COLS)
        mask = rmask[:, None] & (cols < n)[None, :]
        idx = base + cols[None, :]
        u = tl.load(up + idx, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(pp + idx, mask=mask, other=0.0).to(tl.float32)
        p = _rnd(p * decay, DTYPE) - lr * _rnd(u / denom[:, None], DTYPE)
        tl.store(pp + idx, _out(p, DTYPE), mask=mask)


@triton.jit(do_not_specialize=["sr_base"])
def _scale_rows_bf16_kernel(
    tab, prog, srt, sr_base, lr_ptr, lr, decay, wd, b, a, eps,
    LR_PTR: tl.constexpr, MOM: tl.constexpr, STOCHASTIC: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """_scale_rows_kernel in pure bf16: u = g, or with MOM u = fma(g, 1-b, m*b) in fp32; the
    first sweep reduces u, the second computes u again from the same bf16 g and m (so the update
    reads the fp32 u, not its rounded store), writes m rounded to nearest and
    p = fma(u / denom, -lr, p*decay) rounded as _store_bf16_param says."""
    pid = tl.program_id(0)
    t = tl.load(prog + 2 * pid)
    r_idx = tl.load(prog + 2 * pid + 1) + tl.arange(0, ROWS)
    rows = tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    rmask = r_idx < rows
    pp = _ptr(tab, t, 0, 8, tl.bfloat16)
    gp = _ptr(tab, t, 1, 8, tl.bfloat16)
    mp = _ptr(tab, t, 2, 8, tl.bfloat16)
    lr, decay = _lr_and_decay(lr, decay, wd, lr_ptr, LR_PTR)
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    base = r_idx[:, None].to(tl.int64) * n
    for j0 in range(0, n, COLS):
        cols = j0 + tl.arange(0, COLS)
        mask = rmask[:, None] & (cols < n)[None, :]
        idx = base + cols[None, :]
        u = tl.load(gp + idx, mask=mask, other=0.0).to(tl.float32)
        if MOM:
            u = tl.fma(u, a, tl.load(mp + idx, mask=mask, other=0.0).to(tl.float32) * b)
        acc += u * u
    denom = _nan_max(tl.sqrt(tl.sum(acc, axis=1) / n.to(tl.float32)), eps)
    for j0 in range(0, n, COLS):
        cols = j0 + tl.arange(0, COLS)
        mask = rmask[:, None] & (cols < n)[None, :]
        idx = base + cols[None, :]
        u = tl.load(gp + idx, mask=mask, other=0.0).to(tl.float32)
        if MOM:
            u = tl.fma(u, a, tl.load(mp + idx, mask=mask, other=0.0).to(tl.float32) * b)
            tl.store(mp + idx, _out(u, tl.bfloat16), mask=mask)
        p = tl.load(pp + idx, mask=mask, other=0.0).to(tl.float32)
        p = tl.fma(u / denom[:, None], -lr, p * decay)
        _store_bf16_param(pp, idx, mask, p, srt, t, sr_base, STOCHASTIC)


@triton.jit
def _sinkgd_sweep_kernel(
    tab, prog, ws, part, eps, INIT: tl.constexpr, DTYPE: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """One Sinkhorn iteration's sweep over a block of ROWS rows, G read-only:
    the row half-step  q_i = sum_j G_ij**2 c_j**2,  r_i <- r_i sqrt(n) / (r_i sqrt(q_i) + eps)
    (where q_i > 0), then this block's partial column sums of G**2 r**2 for the column half-step
    (the second sweep of the block re-reads it from the cache). INIT: r = c = 1 before the first
    iteration (the program of row 0 writes c). Table: [g, -, -, rows, cols, offset of r,
    offset of c, offset of the partials or -1 for a vector (its column scalings stay 1)]."""
    pid = tl.program_id(0)
    t = tl.load(prog + 2 * pid)
    r0 = tl.load(prog + 2 * pid + 1)
    r_idx = r0 + tl.arange(0, ROWS)
    rows = tl.load(tab + t * 8 + 3)
    n = tl.load(tab + t * 8 + 4)
    roff = tl.load(tab + t * 8 + 5)
    coff = tl.load(tab + t * 8 + 6)
    poff = tl.load(tab + t * 8 + 7)
    rmask = r_idx < rows
    gp = _ptr(tab, t, 0, 8, DTYPE)
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    base = r_idx[:, None].to(tl.int64) * n
    for j0 in range(0, n, COLS):
        cols = j0 + tl.arange(0, COLS)
        cmask = cols < n
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(gp + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if INIT:
            c2 = tl.full([COLS], 1.0, tl.float32)
            if r0 == 0:
                tl.store(ws + coff + cols, c2, mask=cmask)
        else:
            c = tl.load(ws + coff + cols, mask=cmask, other=0.0)
            c2 = c * c
        acc += x * x * c2[None, :]
    q = tl.sum(acc, axis=1)
    if INIT:
        r = tl.full([ROWS], 1.0, tl.float32)
    else:
        r = tl.load(ws + roff + r_idx, mask=rmask, other=1.0)
    r = tl.where(q == 0.0, r, r * (tl.sqrt(n.to(tl.float32)) / (r * tl.sqrt(q) + eps)))
    tl.store(ws + roff + r_idx, r, mask=rmask)
    if poff >= 0:
        r2 = tl.where(rmask, r * r, 0.0)
        row_block = r0 // ROWS
        for j0 in range(0, n, COLS):
            cols = j0 + tl.arange(0, COLS)
            cmask = cols < n
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(gp + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            colsum = tl.sum(x * x * r2[:, None], axis=0)
            tl.store(part + poff + row_block * n + cols, colsum, mask=cmask)


# ----------------------------------------------------------------------------- host side
_is_interpreted = type(_lion_kernel).__name__ == "InterpretedFunction"
_tables: OrderedDict[tuple[Any, ...], tuple[Tensor, Tensor]] = OrderedDict()
_TABLE_CACHE = 256


def sr_round_bf16(dst: Tensor, src: Tensor, seed: int, step: int, offset: int = 0) -> None:
    """Round contiguous float32 ``src`` into contiguous bf16 ``dst`` stochastically with the
    counter-based bits of ``(seed, step)`` for global element indices ``offset + k``: the same bits
    as ``slimopt.rounding`` and the native CPU loop."""
    n = src.numel()
    if n == 0:
        return
    seed &= 2**64 - 1
    grid = (triton.cdiv(n, BLOCK),)
    _sr_round_kernel[grid](
        src, dst.view(torch.int16), n, offset, seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF,
        BLOCK=BLOCK,
    )  # fmt: skip


def interpreted() -> bool:
    """Whether these kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _is_interpreted


def _launch_tables(
    kind: str,
    rows: Sequence[tuple[int, ...]],
    programs: Callable[[], Tensor],
    device: torch.device,
    width: int = 8,
) -> tuple[Tensor, Tensor]:
    """The per-tensor table (int64 [len(rows), width]) and per-program table on ``device``, cached
    on their contents (addresses and sizes), so a training loop builds and copies them once."""
    key = (kind, device, tuple(rows))
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    tab = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width)
    prog = programs()
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "slimopt triton kernels: a new launch table was needed during CUDA graph capture; "
            "run one eager step with the same parameters before capturing"
        )
    out = (tab.to(device), prog.reshape(-1).contiguous().to(device))
    _tables[key] = out
    if len(_tables) > _TABLE_CACHE:
        _tables.popitem(last=False)
    return out


def _block_programs(counts: Sequence[int], step: int) -> Callable[[], Tensor]:
    """(tensor index, first element) of each block of ``step`` elements of each tensor."""

    def build() -> Tensor:
        c = torch.tensor([-(-n // step) for n in counts], dtype=torch.int64)
        t = torch.repeat_interleave(torch.arange(len(counts)), c)
        first = torch.cumsum(c, 0) - c
        return torch.stack([t, (torch.arange(len(t)) - first[t]) * step], 1)

    return build


def _chunk_programs(chunks: Sequence[int], col_blocks: Sequence[int]) -> Callable[[], Tensor]:
    """(tensor index, row chunk, first column) for each row chunk x column block of each tensor."""

    def build() -> Tensor:
        out = [
            (t, k, j * COL_BLOCK)
            for t, (nk, nj) in enumerate(zip(chunks, col_blocks))
            for k in range(nk)
            for j in range(nj)
        ]
        return torch.tensor(out, dtype=torch.int64).reshape(-1, 3)

    return build


def _elementwise_tables(
    rows: Sequence[tuple[int, ...]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Tables of an element-wise launch: field 7 of each tensor's row becomes the index of its
    first program (blocks of BLOCK elements, field 3 the element count), and the per-program
    table is one int32 tensor index a program (4 bytes per BLOCK elements of parameters)."""
    counts = [-(-r[3] // BLOCK) for r in rows]
    firsts, _ = _offsets(counts)
    full = [(*r[:7], first) for r, first in zip(rows, firsts)]

    def build() -> Tensor:
        c = torch.tensor(counts, dtype=torch.int64)
        return torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), c)

    return _launch_tables("ew", full, build, device)


def _chunking(rows: int, cols: int) -> tuple[int, int]:
    """(rows per chunk, chunks) for a column reduction of a [rows, cols] matrix: enough chunks
    x column blocks to fill a device, each chunk a multiple of TILE_ROWS rows."""
    col_blocks = -(-cols // COL_BLOCK)
    want = max(1, min(-(-rows // TILE_ROWS), CHUNKS_TARGET // col_blocks))
    chunk_rows = -(-rows // want)
    chunk_rows = -(-chunk_rows // TILE_ROWS) * TILE_ROWS
    return chunk_rows, -(-rows // chunk_rows)


def _matrix_shape(p: Tensor) -> tuple[int, int]:
    """[size(0), rest] for ndim >= 2 (the spec's view), one row for a vector or a scalar."""
    if p.ndim >= 2:
        return p.shape[0], p.numel() // max(p.shape[0], 1)
    return 1, p.numel()


def kernel_ok(*tensors: Tensor) -> bool:
    """Whether the kernels take these tensors: same dtype (fp32/bf16/fp16), contiguous, dense,
    on one CUDA device (or the CPU under the interpreter)."""
    first = tensors[0]
    dev = first.device
    if dev.type != "cuda" and not (dev.type == "cpu" and _is_interpreted):
        return False
    return all(
        type(t) in (Tensor, torch.nn.Parameter)
        and t.dtype == first.dtype
        and t.dtype in SUPPORTED_DTYPES
        and t.device == dev
        and t.layout == torch.strided
        and t.is_contiguous()
        and t.numel() < 2**31 - BLOCK  # element offsets and columns in int32
        for t in tensors
    )


def _lr(group: dict[str, Any], device: torch.device) -> tuple[float, Tensor | None]:
    """(lr as a float, the lr tensor when it lives on ``device``). A tensor lr on the parameters'
    device is read by the kernels, so no host synchronisation happens."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.device == device and lr.numel() == 1:
            return 0.0, lr.reshape(())
        return float(lr.item()), None
    return float(lr), None


def _bump(states: list[dict[str, Any]]) -> None:
    for s in states:
        s["step"] += 1  # in place on a tensor counter, no synchronisation


def _step_dtype(states: list[dict[str, Any]], device: torch.device) -> Any:
    """The Triton dtype of the step counters when they are tensors on ``device`` (read by the
    kernels, no synchronisation), or None when they are Python ints or CPU tensors beside CUDA
    parameters (read on the host, as the rules' own paths do)."""
    steps = [s["step"] for s in states]
    on_device = [isinstance(x, Tensor) and x.device == device for x in steps]
    if not any(on_device):
        return None
    kinds = {x.dtype for x, here in zip(steps, on_device) if here}
    if not all(on_device) or len(kinds) != 1 or not kinds <= _STEP_DTYPES.keys():
        seen = sorted(
            {
                f"{x.dtype} on {x.device}" if isinstance(x, Tensor) else type(x).__name__
                for x in steps
            }
        )
        raise ValueError(
            "slimopt triton kernels: state['step'] must be Python ints or tensors of one dtype "
            f"(int64, int32 or float32) on the parameters' device {device}, got {seen}"
        )
    return _STEP_DTYPES[kinds.pop()]


_STEP_DTYPES = {torch.int64: tl.int64, torch.int32: tl.int32, torch.float32: tl.float32}


_STATE_KEYS = ("exp_avg", "momentum_buffer", "S")


def gsnr_ok(p: Tensor, gsnr: Tensor) -> bool:
    """Whether the SGD-SaI kernels take this gsnr: one float32 value on ``p``'s device."""
    return gsnr.dtype == torch.float32 and gsnr.device == p.device and gsnr.numel() == 1


def _by_dtype(
    rule: str,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
) -> dict[torch.dtype, list[int]]:
    """The tensors' indices by dtype, one launch each. Every tensor with its gradient and state
    tensors must pass :func:`kernel_ok` (``Rule.partition`` gives the kernels only those: the
    kernels never step a tensor another way); anything else is a ValueError."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        tensors = [p, g] + [s[k] for k in _STATE_KEYS if k in s]
        if not kernel_ok(*tensors):
            raise ValueError(
                f"{rule}: tensor {i} ({p.dtype}, shape {tuple(p.shape)}, {p.device}) is not one "
                "the Triton kernels take (one dtype, contiguous, dense, on a CUDA device or the "
                "CPU under the interpreter); Rule.partition keeps such tensors on the "
                "multi-tensor path"
            )
        by_dtype.setdefault(p.dtype, []).append(i)
    return by_dtype


def _addr(t: Tensor) -> int:
    return t.data_ptr()


# ----------------------------------------------------------------------------- the rules' steps
def lion_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool = True,
) -> None:
    """Lion (``slimopt.algorithms.lion.reference``) for many tensors: one launch per dtype, each
    program one block of one tensor (reads p, g, m; writes p, m: 20 bytes per fp32 element).
    Pure-bf16 parameters (bf16 with ``sr_seed`` in their state) take their own launch: bf16 read
    and computed in fp32, the state rounded to nearest and the parameter rounded stochastically
    in the kernel (``stochastic=False``: to nearest), 10 bytes per element."""
    wd = group["weight_decay"]
    beta1, beta2 = group["betas"]
    pure = [i for i, (p, s) in enumerate(zip(params, states)) if _pure_bf16(p, s)]
    if pure:
        _lion_bf16([params[i] for i in pure], [grads[i] for i in pure],
                   [states[i] for i in pure], group, stochastic)  # fmt: skip
        skip = set(pure)
        keep = [i for i in range(len(params)) if i not in skip]
        params, grads, states = (
            [params[i] for i in keep],
            [grads[i] for i in keep],
            [states[i] for i in keep],
        )
    for dtype, idx in _by_dtype("lion", params, grads, states).items():
        ps, gs, ss = [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx]
        _bump(ss)
        live = [j for j, p in enumerate(ps) if p.numel() > 0]
        if not live:
            continue
        dev = ps[0].device
        lr, lr_t = _lr(group, dev)
        rows = [
            (_addr(ps[j]), _addr(gs[j]), _addr(ss[j]["exp_avg"]), ps[j].numel(), 0, 0, 0, 0)
            for j in live
        ]
        tab, prog = _elementwise_tables(rows, dev)
        _lion_kernel[(prog.numel(),)](
            tab, prog, tab if lr_t is None else lr_t, lr, 1.0 - lr * wd, wd, beta1, beta2,
            LR_PTR=lr_t is not None, DTYPE=_TL_DTYPE[dtype], BLOCK=BLOCK,
        )  # fmt: skip


def _pure_bf16(p: Tensor, state: dict[str, Any]) -> bool:
    """A pure-bf16 parameter (``slimopt.lean``): bf16 with its rounding state."""
    return p.dtype == torch.bfloat16 and "sr_seed" in state


def _sgd_sai_bf16(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    gsnr_max: Tensor | None,
    stochastic: bool,
) -> None:
    """SGD-SaI on pure-bf16 tensors: one launch for first steps (momentum 0: m = g), one for the
    others; each tensor's lr * gsnr is computed on the device as the reference computes it."""
    mu, wd = group["momentum"], group["weight_decay"]
    if isinstance(group["lr"], Tensor):  # sgd_sai's fused_takes keeps these off this kernel
        raise ValueError("sgd_sai: the pure-bf16 kernel takes a float lr")
    lr = float(group["lr"])
    firsts = [int(s["step"]) == 0 for s in states]  # before any counter moves
    for first in (True, False):
        idx = [i for i, f in enumerate(firsts) if f == first]
        if not idx:
            continue
        ps, gs, ss = ([x[i] for i in idx] for x in (params, grads, states))
        scales = [s["gsnr"] / gsnr_max if gsnr_max is not None else s["gsnr"] for s in ss]
        for s in ss:
            s["step"] += 1
        roundings = _roundings("sgd_sai", ps, gs, ss, ("momentum_buffer",), stochastic)
        live = [j for j, p in enumerate(ps) if p.numel() > 0]
        if not live:
            continue
        dev = ps[0].device
        steps = torch.stack([(lr * scales[j]).to(torch.float32).reshape(()) for j in live])
        tab, prog = _elementwise_tables(_bf16_rows(ps, gs, ss, "momentum_buffer", live), dev)
        srt, base = _rounding_table([roundings[j] for j in live], tab)
        m = 0.0 if first else mu
        _sgd_sai_bf16_kernel[(prog.numel(),)](
            tab, prog, srt, base, steps.to(dev), 1.0 - wd * lr, m, 1.0 - m,
            STOCHASTIC=bool(stochastic), BLOCK=BLOCK, enable_fp_fusion=False,
        )  # fmt: skip


def _roundings(
    rule: str,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    keys: Sequence[str],
    stochastic: bool,
) -> list[Any]:
    """Count one rounded write of each pure-bf16 tensor (empty shards too, as every rank must)
    and return how each rounds (:func:`slimopt.rounding.kernel_rounding`: its seed, the
    new count, its shard's global offset); each tensor and its state tensors under ``keys`` must
    pass :func:`kernel_ok` (``Rule.partition`` keeps the others off the kernels)."""
    out = []
    for p, g, s in zip(params, grads, states):
        if not kernel_ok(p, g, *(s[k] for k in keys)):
            raise ValueError(
                f"{rule}: a pure-bf16 tensor the Triton kernel cannot take (not contiguous, or "
                "on another device) reached it; Rule.partition should have kept it out"
            )
        out.append(kernel_rounding(p, s, stochastic))
    return out


def _rounding_table(roundings: list[Any], fallback: Tensor) -> tuple[Tensor, int]:
    """The rounding table of a pure-bf16 launch (int64 [tensors, 3]: seed, write count minus the
    launch's smallest count, global index of the first element) and that smallest count
    (``sr_base``, a kernel scalar). The table's contents stay the same from step to step while
    the tensors step together, so it is built and copied to the device once, like the launch
    tables. To nearest (``stochastic=False``) it is not read: ``fallback`` stands in."""
    if not roundings or not roundings[0].stochastic:
        return fallback, 0
    base = min(r.step for r in roundings)
    rows = []
    for r in roundings:
        seed = r.seed & (2**64 - 1)
        seed -= 2**64 if seed >= 2**63 else 0  # its 64 bits as an int64 of the table
        rows.append((seed, r.step - base, r.offset))
    srt, _ = _launch_tables("sr", rows, _no_programs, fallback.device, width=3)
    return srt, base & 0xFFFFFFFF


def _bf16_rows(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    key: str | None,
    live: list[int],
    extra: tuple[int, int, int] = (0, 0, 0),
) -> list[tuple[int, ...]]:
    """Element-wise launch-table rows of the tensors ``live``: [p, g, state[key], numel, *extra]."""
    return [
        (
            _addr(params[j]),
            _addr(grads[j]),
            _addr(states[j][key]) if key is not None else 0,
            params[j].numel(),
            *extra,
        )
        for j in live
    ]


def _lion_bf16(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool,
) -> None:
    """Lion on pure-bf16 tensors (each must pass :func:`kernel_ok`): one launch."""
    wd = group["weight_decay"]
    beta1, beta2 = group["betas"]
    for s in states:
        s["step"] += 1
    roundings = _roundings("lion", params, grads, states, ("exp_avg",), stochastic)
    live = [j for j, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    dev = params[0].device
    lr, lr_t = _lr(group, dev)
    tab, prog = _elementwise_tables(_bf16_rows(params, grads, states, "exp_avg", live), dev)
    srt, base = _rounding_table([roundings[j] for j in live], tab)
    _lion_bf16_kernel[(prog.numel(),)](
        tab, prog, srt, base, tab if lr_t is None else lr_t, lr, 1.0 - lr * wd, wd, beta1, beta2,
        1.0 - beta1, 1.0 - beta2, LR_PTR=lr_t is not None, STOCHASTIC=bool(stochastic),
        BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip


def sgd_sai_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    gsnr_max: Tensor | None = None,
    stochastic: bool = True,
) -> None:
    """SGD-SaI (``slimopt.algorithms.sgd_sai.reference``, after ``prepare`` fixed gsnr) for many
    tensors: one launch per dtype (and per first/later step when the counters are ints); reads
    p, g, m and the tensor's gsnr, writes p, m (20 bytes per fp32 element, 12 without momentum).
    ``gsnr_max``: the optimizer-wide largest gsnr, for ``snr_normalize="max"``. Pure-bf16
    tensors (measured gsnr, momentum, Python-int counters) take their own launch, rounded in the
    kernel (``stochastic=False``: to nearest)."""
    mu, wd = group["momentum"], group["weight_decay"]
    norm = group["snr_normalize"] == "max"
    if norm and gsnr_max is None:
        raise ValueError("sgd_sai: snr_normalize='max' needs gsnr_max")
    pure = [i for i, (p, s) in enumerate(zip(params, states)) if _pure_bf16(p, s)]
    if pure:
        _sgd_sai_bf16(*([x[i] for i in pure] for x in (params, grads, states)), group,
                      gsnr_max, stochastic)  # fmt: skip
        keep = [i for i in range(len(params)) if i not in set(pure)]
        params, grads, states = ([x[i] for i in keep] for x in (params, grads, states))
    for i, (p, s) in enumerate(zip(params, states)):
        gsnr = s["gsnr"]
        if not gsnr_ok(p, gsnr):
            raise ValueError(
                f"sgd_sai: tensor {i}'s gsnr must be one float32 value on {p.device}, not "
                f"{gsnr.dtype} of {gsnr.numel()} on {gsnr.device}"
            )
    for dtype, idx in _by_dtype("sgd_sai", params, grads, states).items():
        ps, gs, ss = [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx]
        step_dtype = _step_dtype(ss, ps[0].device)
        firsts = None if step_dtype is not None else [int(s["step"]) == 0 for s in ss]
        _bump(ss)
        dev = ps[0].device
        lr, lr_t = _lr(group, dev)
        gmax = gsnr_max.to(device=dev, dtype=torch.float32).reshape(()) if norm else None
        passes = [(None, list(range(len(ps))))]
        if firsts is not None and mu > 0:
            passes = [(f, [j for j in range(len(ps)) if firsts[j] == f]) for f in (True, False)]
        for first, members in passes:
            live = [j for j in members if ps[j].numel() > 0]
            if not live:
                continue
            rows = [
                (
                    _addr(ps[j]),
                    _addr(gs[j]),
                    _addr(ss[j]["momentum_buffer"]) if mu > 0 else 0,
                    ps[j].numel(),
                    _addr(ss[j]["gsnr"]),
                    _addr(ss[j]["step"]) if step_dtype is not None else 0,
                    0,
                    0,
                )
                for j in live
            ]
            tab, prog = _elementwise_tables(rows, dev)
            _sgd_sai_kernel[(prog.numel(),)](
                tab, prog, tab if lr_t is None else lr_t, tab if gmax is None else gmax,
                lr, 1.0 - wd * lr, wd, mu,
                LR_PTR=lr_t is not None, NORM=norm, MOM=mu > 0, STEP_PTR=step_dtype is not None,
                FIRST=bool(first), DTYPE=_TL_DTYPE[dtype],
                STEP_DTYPE=step_dtype if step_dtype is not None else tl.int64, BLOCK=BLOCK,
            )  # fmt: skip


def _column_reduction(
    kind: str,
    mats: list[tuple[Tensor, Tensor | None, int, int]],
    dtype: torch.dtype,
    mode: int,
    b: float = 0.0,
    **launch: Any,
) -> tuple[Tensor, list[int], list[int]]:
    """Partial column sums (float32) of each ``(x, m, rows, cols)`` over chunks of rows, in one
    launch for all the matrices (``_col_partials_kernel``, ``mode`` as there). Returns the
    partials and, per matrix, their offset and the number of chunks."""
    dev = mats[0][0].device
    part_off, chunks, chunk_rows, total = [], [], [], 0
    for _x, _m, rows, cols in mats:
        cr, nk = _chunking(rows, cols)
        part_off.append(total)
        chunks.append(nk)
        chunk_rows.append(cr)
        total += nk * cols
    part = torch.empty(max(total, 1), dtype=torch.float32, device=dev)
    rows_tab = [
        (
            _addr(x),
            _addr(m) if m is not None else 0,
            0,
            rows,
            cols,
            0,
            part_off[i],
            chunk_rows[i],
        )
        for i, (x, m, rows, cols) in enumerate(mats)
    ]
    col_blocks = [-(-cols // COL_BLOCK) for *_, cols in mats]
    tab, prog = _launch_tables(kind, rows_tab, _chunk_programs(chunks, col_blocks), dev)
    _col_partials_kernel[(prog.numel() // 3,)](
        tab, prog, part, b, 1.0 - b,
        MODE=mode, DTYPE=_TL_DTYPE[dtype], TILE_ROWS=TILE_ROWS, COLS=COL_BLOCK, **launch,
    )  # fmt: skip
    return part, part_off, chunks


def _fold_columns(
    kind: str,
    part: Tensor,
    ws: Tensor,
    shapes: Sequence[tuple[int, int]],
    col_offsets: Sequence[int],
    part_off: Sequence[int],
    chunks: Sequence[int],
    eps: float,
    mode: int,
) -> None:
    """Fold the partial column sums into ``ws`` (``_col_finish_kernel``), one launch."""
    rows = [
        (0, 0, 0, r, c, col_offsets[k], part_off[k], chunks[k]) for k, (r, c) in enumerate(shapes)
    ]
    tab, _ = _launch_tables(kind, rows, _no_programs, part.device)
    grid = (len(shapes), -(-max(c for _, c in shapes) // COL_BLOCK))
    _col_finish_kernel[grid](tab, part, ws, eps, MODE=mode, COLS=COL_BLOCK, CHUNK_TILE=CHUNK_TILE)


def _no_programs() -> Tensor:
    return torch.zeros(1, 2, dtype=torch.int64)


def _offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Start of each of ``sizes`` in one flat buffer, and its total size."""
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out, total


def _split_pure(
    step: Callable[..., None],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool,
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
    """Run ``step(params, grads, states, group, torch.bfloat16, stochastic)`` on the pure-bf16
    tensors and return the others."""
    pure = [i for i, (p, s) in enumerate(zip(params, states)) if _pure_bf16(p, s)]
    if not pure:
        return params, grads, states
    step(*([x[i] for i in pure] for x in (params, grads, states)), group, torch.bfloat16,
         stochastic)  # fmt: skip
    skip = set(pure)
    keep = [i for i in range(len(params)) if i not in skip]
    return [params[i] for i in keep], [grads[i] for i in keep], [states[i] for i in keep]


def sage_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool = True,
) -> None:
    """SAGE (``slimopt.algorithms.sage.reference``) for many tensors, three launches per dtype:
    the column sums of ``|g|`` (partials over row chunks, float32), the O(d) damping H per tensor
    (folds the partials, updates S), then the element-wise update (reads p, g, m and H[col];
    writes p, m). A vector is one row: its statistic is ``|g|`` itself. Pure-bf16 parameters
    take their own launches: every intermediate in fp32, S and m rounded to nearest, the
    parameter stochastically in the kernel (``stochastic=False``: to nearest)."""
    params, grads, states = _split_pure(_sage_tensors, params, grads, states, group, stochastic)
    for dtype, idx in _by_dtype("sage", params, grads, states).items():
        _sage_tensors(*([x[i] for i in idx] for x in (params, grads, states)), group, dtype)


def _sage_tensors(
    ps: list[Tensor],
    gs: list[Tensor],
    ss: list[dict[str, Any]],
    group: dict[str, Any],
    dtype: torch.dtype,
    stochastic: bool | None = None,
) -> None:
    """SAGE's launches for tensors of one dtype (pure bf16 when ``stochastic`` is not None)."""
    eps, wd = group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    pure = stochastic is not None
    step_dtype = _step_dtype(ss, ps[0].device)
    _bump(ss)
    if pure:
        roundings = _roundings("sage", ps, gs, ss, ("exp_avg", "S"), bool(stochastic))
    live = [j for j, p in enumerate(ps) if p.numel() > 0]
    if not live:
        return
    dev = ps[0].device
    lr, lr_t = _lr(group, dev)
    shapes = [_matrix_shape(ps[j]) for j in live]
    mats = [(gs[j], None, r, c) for j, (r, c) in zip(live, shapes)]
    part, part_off, chunks = _column_reduction("sage-col", mats, dtype, mode=0)
    h_off, total = _offsets([c for _, c in shapes])
    # pure bf16: S in fp32 after H's, for S^ (the stored S is rounded)
    ws = torch.empty(2 * total if pure else total, dtype=torch.float32, device=dev)
    if step_dtype is None:
        bc = torch.tensor(
            [1.0 - beta2 ** int(ss[j]["step"]) for j in live], dtype=torch.float32
        ).to(dev, non_blocking=True)
    else:
        bc = ws
    rows_d = [
        (
            _addr(gs[j]),
            _addr(ss[j]["S"]),
            _addr(ss[j]["step"]) if step_dtype is not None else 0,
            r,
            c,
            h_off[k],
            part_off[k],
            chunks[k],
        )
        for k, (j, (r, c)) in enumerate(zip(live, shapes))
    ]
    tab_d, _ = _launch_tables("sage-damp", rows_d, _no_programs, dev)
    fusion = {"enable_fp_fusion": False} if pure else {}
    _sage_damping_kernel[(len(live),)](
        tab_d, part, ws, tab_d, beta2, 1.0 - beta2, bc, eps, total,
        STEP_PTR=step_dtype is not None,
        STEP_DTYPE=step_dtype if step_dtype is not None else tl.int64,
        DTYPE=_TL_DTYPE[dtype], PURE=pure, R=tl.float32 if pure else _TL_DTYPE[dtype],
        COLS=COL_BLOCK, CHUNK_TILE=CHUNK_TILE, **fusion,
    )  # fmt: skip
    extra = [(c, h_off[k], 0) for k, (_r, c) in enumerate(shapes)]
    rows_u = [
        row for k, j in enumerate(live) for row in _bf16_rows(ps, gs, ss, "exp_avg", [j], extra[k])
    ]
    tab, prog = _elementwise_tables(rows_u, dev)
    lr_arg = tab if lr_t is None else lr_t
    if pure:
        srt, base = _rounding_table([roundings[j] for j in live], tab)
        _sage_update_bf16_kernel[(prog.numel(),)](
            tab, prog, ws, srt, base, lr_arg, lr, 1.0 - lr * wd, wd, beta1, beta2,
            1.0 - beta1, 1.0 - beta2, LR_PTR=lr_t is not None,
            LION_ORDER=bool(group["lion_order"]), STOCHASTIC=bool(stochastic), BLOCK=BLOCK,
            enable_fp_fusion=False,
        )  # fmt: skip
        return
    _sage_update_kernel[(prog.numel(),)](
        tab, prog, ws, lr_arg, lr, 1.0 - lr * wd, wd, beta1, beta2,
        LR_PTR=lr_t is not None, LION_ORDER=bool(group["lion_order"]),
        DTYPE=_TL_DTYPE[dtype], BLOCK=BLOCK,
    )  # fmt: skip


def scale_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool = True,
) -> None:
    """SCALE (``slimopt.algorithms.scale.reference``) for many tensors. Rows (``norm_dim=1``, and
    vectors as one row): one launch, each program a few rows swept twice (reduce, then update;
    the second sweep hits the cache). Columns (``norm_dim=0``): partial column sums of ``u**2``
    (with momentum, m is updated in the same pass), one fold into the denominators, then one
    element-wise update. Reads p, g (and m), writes p (and m): 12 bytes per fp32 element.
    Pure-bf16 parameters take their own launches: u (the momentum) kept in fp32 registers for
    the update (the second sweep of a row, or the update pass of a column-normalized matrix,
    computes it again from the bf16 g and m and writes m rounded to nearest), the parameter
    rounded stochastically in the kernel (``stochastic=False``: to nearest)."""
    params, grads, states = _split_pure(_scale_tensors, params, grads, states, group, stochastic)
    for dtype, idx in _by_dtype("scale", params, grads, states).items():
        _scale_tensors(*([x[i] for i in idx] for x in (params, grads, states)), group, dtype)


def _scale_tensors(
    ps: list[Tensor],
    gs: list[Tensor],
    ss: list[dict[str, Any]],
    group: dict[str, Any],
    dtype: torch.dtype,
    stochastic: bool | None = None,
) -> None:
    """SCALE's launches for tensors of one dtype (pure bf16 when ``stochastic`` is not None)."""
    eps, wd, beta = group["eps"], group["weight_decay"], group["momentum"]
    pure = stochastic is not None
    mom = beta > 0
    if pure:
        keys = ("momentum_buffer",) if mom else ()
        roundings = _roundings("scale", ps, gs, ss, keys, bool(stochastic))
    live = [j for j, p in enumerate(ps) if p.numel() > 0]
    if not live:
        return
    dev = ps[0].device
    lr, lr_t = _lr(group, dev)
    by_rows = [j for j in live if ps[j].ndim <= 1 or group["norm_dim"] == 1]
    by_cols = [j for j in live if ps[j].ndim >= 2 and group["norm_dim"] == 0]
    common = dict(LR_PTR=lr_t is not None, DTYPE=_TL_DTYPE[dtype])
    lr_arg = lr_t
    if by_rows:
        shapes = [_matrix_shape(ps[j]) for j in by_rows]
        rows = [
            (
                _addr(ps[j]),
                _addr(gs[j]),
                _addr(ss[j]["momentum_buffer"]) if mom else 0,
                r,
                c,
                0,
                0,
                0,
            )
            for j, (r, c) in zip(by_rows, shapes)
        ]
        tab, prog = _launch_tables(
            "scale-rows", rows, _block_programs([r for r, _ in shapes], ROW_BLOCK), dev
        )
        if pure:
            srt, base = _rounding_table([roundings[j] for j in by_rows], tab)
            _scale_rows_bf16_kernel[(prog.numel() // 2,)](
                tab, prog, srt, base, tab if lr_arg is None else lr_arg, lr, 1.0 - lr * wd, wd,
                beta, 1.0 - beta, eps, LR_PTR=lr_t is not None, MOM=mom,
                STOCHASTIC=bool(stochastic), ROWS=ROW_BLOCK, COLS=COL_BLOCK,
                enable_fp_fusion=False,
            )  # fmt: skip
        else:
            _scale_rows_kernel[(prog.numel() // 2,)](
                tab, prog, tab if lr_arg is None else lr_arg, lr, 1.0 - lr * wd, wd, beta, eps,
                MOM=mom, ROWS=ROW_BLOCK, COLS=COL_BLOCK, **common,
            )  # fmt: skip
    if by_cols:
        shapes = [_matrix_shape(ps[j]) for j in by_cols]
        us = [ss[j]["momentum_buffer"] if mom else gs[j] for j in by_cols]
        mats = [
            (gs[j], ss[j]["momentum_buffer"] if mom else None, r, c)
            for j, (r, c) in zip(by_cols, shapes)
        ]
        # pure bf16 with momentum: the partial sums of fp32 u, m written by the update pass
        mode = (4 if pure else 2) if mom else 1
        part, part_off, chunks = _column_reduction(
            "scale-col",
            mats,
            dtype,
            mode=mode,
            b=beta,
            **({"enable_fp_fusion": False} if pure else {}),
        )
        d_off, total = _offsets([c for _, c in shapes])
        ws = torch.empty(total, dtype=torch.float32, device=dev)
        _fold_columns("scale-fold", part, ws, shapes, d_off, part_off, chunks, eps, mode=1)
        if pure:
            key = "momentum_buffer" if mom else None
            rows_u = [
                row
                for k, (j, (_r, c)) in enumerate(zip(by_cols, shapes))
                for row in _bf16_rows(ps, gs, ss, key, [j], (c, d_off[k], 0))
            ]
            tab, prog = _elementwise_tables(rows_u, dev)
            srt, base = _rounding_table([roundings[j] for j in by_cols], tab)
            _scale_by_columns_bf16_kernel[(prog.numel(),)](
                tab, prog, ws, srt, base, tab if lr_arg is None else lr_arg, lr,
                1.0 - lr * wd, wd, beta, 1.0 - beta, LR_PTR=lr_t is not None, SINKHORN=False,
                MOM=mom, STOCHASTIC=bool(stochastic), BLOCK=BLOCK, enable_fp_fusion=False,
            )  # fmt: skip
            return
        rows_u = [
            (_addr(ps[j]), _addr(u), 0, ps[j].numel(), c, d_off[k], 0, 0)
            for k, (j, u, (_r, c)) in enumerate(zip(by_cols, us, shapes))
        ]
        tab, prog = _elementwise_tables(rows_u, dev)
        _scale_by_columns_kernel[(prog.numel(),)](
            tab, prog, ws, tab if lr_arg is None else lr_arg, lr, 1.0 - lr * wd, wd,
            SINKHORN=False, BLOCK=BLOCK, **common,
        )  # fmt: skip


def sinkgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool = True,
) -> None:
    """SinkGD (``slimopt.algorithms.sinkgd.reference``) for many tensors. The gradient is
    read-only: X = diag(r) G diag(c) is never formed, nor G**2. Per iteration two launches: a
    sweep over blocks of rows (the row half-step on r, then the block's partial column sums of
    G**2 r**2, re-reading the block from the cache) and a fold of the partials into c; then one
    element-wise pass p <- p*decay - lr * G r c. A vector is one row with c = 1 and takes the
    first row half-step only (the spec normalises a vector once). Pure-bf16 parameters take
    their own launches (the sweeps read the bf16 gradient; the update rounds the parameter
    stochastically in the kernel, ``stochastic=False``: to nearest)."""
    params, grads, states = _split_pure(_sinkgd_tensors, params, grads, states, group, stochastic)
    for dtype, idx in _by_dtype("sinkgd", params, grads, states).items():
        _sinkgd_tensors(*([x[i] for i in idx] for x in (params, grads, states)), group, dtype)


def _sinkgd_tensors(
    ps: list[Tensor],
    gs: list[Tensor],
    ss: list[dict[str, Any]],
    group: dict[str, Any],
    dtype: torch.dtype,
    stochastic: bool | None = None,
) -> None:
    """SinkGD's launches for tensors of one dtype (pure bf16 when ``stochastic`` is not None)."""
    iters, eps, wd = group["iters"], group["eps"], group["weight_decay"]
    pure = stochastic is not None
    if pure:
        roundings = _roundings("sinkgd", ps, gs, ss, (), bool(stochastic))
    live = [j for j, p in enumerate(ps) if p.numel() > 0]
    if not live:
        return
    dev = ps[0].device
    lr, lr_t = _lr(group, dev)
    shapes = [_matrix_shape(ps[j]) for j in live]
    offs, total = _offsets([r + c for r, c in shapes])
    r_off = offs
    c_off = [o + r for o, (r, _) in zip(offs, shapes)]
    ws = torch.empty(total, dtype=torch.float32, device=dev)
    mats = [k for k, j in enumerate(live) if ps[j].ndim >= 2]
    blocks = [-(-r // SWEEP_ROWS) for r, _ in shapes]
    p_off, p_total = _offsets([blocks[k] * shapes[k][1] for k in mats])
    part_of = dict(zip(mats, p_off))
    part = torch.empty(max(p_total, 1), dtype=torch.float32, device=dev)
    rows_s = [
        (_addr(gs[j]), 0, 0, r, c, r_off[k], c_off[k], part_of.get(k, -1))
        for k, (j, (r, c)) in enumerate(zip(live, shapes))
    ]
    sweeps = [
        _launch_tables(
            "sink-sweep",
            [rows_s[k] for k in members],
            _block_programs([shapes[k][0] for k in members], SWEEP_ROWS),
            dev,
        )
        if members
        else None
        for members in (list(range(len(live))), mats)  # first iteration, later ones
    ]
    for it in range(iters):
        if it > 0 and not mats:
            break
        tab_s, prog_s = sweeps[0] if it == 0 else sweeps[1]
        _sinkgd_sweep_kernel[(prog_s.numel() // 2,)](
            tab_s, prog_s, ws, part, eps,
            INIT=it == 0, DTYPE=_TL_DTYPE[dtype], ROWS=SWEEP_ROWS, COLS=COL_BLOCK,
        )  # fmt: skip
        if mats:
            _fold_columns(
                "sink-fold", part, ws, [shapes[k] for k in mats], [c_off[k] for k in mats],
                p_off, [blocks[k] for k in mats], eps, mode=3,
            )  # fmt: skip
    rows_u = [
        (_addr(ps[j]), _addr(gs[j]), 0, ps[j].numel(), c, c_off[k], r_off[k], 0)
        for k, (j, (_r, c)) in enumerate(zip(live, shapes))
    ]
    tab, prog = _elementwise_tables(rows_u, dev)
    lr_arg = tab if lr_t is None else lr_t
    if pure:
        srt, base = _rounding_table([roundings[j] for j in live], tab)
        _scale_by_columns_bf16_kernel[(prog.numel(),)](
            tab, prog, ws, srt, base, lr_arg, lr, 1.0 - lr * wd, wd, 0.0, 1.0,
            LR_PTR=lr_t is not None, SINKHORN=True, MOM=False, STOCHASTIC=bool(stochastic),
            BLOCK=BLOCK, enable_fp_fusion=False,
        )  # fmt: skip
        return
    _scale_by_columns_kernel[(prog.numel(),)](
        tab, prog, ws, lr_arg, lr, 1.0 - lr * wd, wd,
        LR_PTR=lr_t is not None, SINKHORN=True, DTYPE=_TL_DTYPE[dtype], BLOCK=BLOCK,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the steps by rule
STEPS: dict[str, Callable[..., None]] = {
    "lion": lion_step,
    "sgd_sai": sgd_sai_step,
    "sage": sage_step,
    "scale": scale_step,
    "sinkgd": sinkgd_step,
}
# the options of each rule whose kernels take other paths: the self-check
# (slimopt.algorithms.kernel_check) runs each
CHECK_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "lion": [{}],
    "sgd_sai": [{}, {"momentum": 0.0}, {"snr_normalize": "max"}],
    "sage": [{}, {"lion_order": True}],
    "scale": [{}, {"norm_dim": 0, "momentum": 0.9}, {"momentum": 0.9}],
    "sinkgd": [{}],
}
__all__ = [
    "CHECK_OPTIONS",
    "STEPS",
    "gsnr_ok",
    "interpreted",
    "kernel_ok",
    "lion_step",
    "sage_step",
    "scale_step",
    "sgd_sai_step",
    "sinkgd_step",
]
