"""SinkGD's Sinkhorn iterations as a small C loop for the CPU, compiled at first use.

``torch.compile`` fuses element-wise updates well, but SinkGD's iterations alternate a reduction
over rows with one over columns, which inductor (and eager torch, through G*G and batched
mat-vecs) turns into two or more passes over the matrix per iteration. The loop below makes one
pass per iteration: for each row it forms ``q_i = sum_j G_ij**2 c_j**2`` (row in L1), rescales
``r_i`` and at once adds ``r_i**2 G_ij**2`` to the column sums; the final pass writes
``p -= lr * G * r * c``. The matrix is read ``iters + 1`` times and never copied, where the
eager path also squares it into a workspace and reads that twice per iteration.

Part of the opt-in fused path (:func:`slimopt.algorithms.fused.set_fused`): float32/float64
CPU tensors only; compiled with the system C compiler (``cc``, or ``$CC``) into
``$XDG_CACHE_HOME/slimopt`` once per source version; ``ctypes`` calls release the GIL, so
matrices (or, for a large one, blocks of its rows) are spread over ``torch.get_num_threads()``
threads. Without a working compiler it reports unavailable and SinkGD keeps its eager path.

The arithmetic is that of ``slimopt.algorithms.sinkgd``'s scaling form, including the rule that
a zero row or column keeps its scale (and a NaN or Inf spreads to its row and column).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define DEFINE(T, SUF, SQRT)                                                                  \
/* One sweep over rows [0, rows): rescale r_i from this row's sum of G^2 c^2, then add       \
   r_i^2 G^2 to col. */                                                                       \
void sinkgd_pass_##SUF(const T* G, int64_t rows, int64_t n, const T* c2, T* r, T* col,        \
                       T target, T eps) {                                                     \
  for (int64_t i = 0; i < rows; ++i) {                                                        \
    const T* g = G + i * n;                                                                   \
    T q = 0;                                                                                  \
    _Pragma("omp simd reduction(+:q)")                                                        \
    for (int64_t j = 0; j < n; ++j) q += g[j] * g[j] * c2[j];                                 \
    if (q > 0) {                                                                              \
      T ri = r[i];                                                                            \
      r[i] = ri / (ri * SQRT(q) + eps) * target;                                              \
    }                                                                                         \
    const T w = r[i] * r[i];                                                                  \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) col[j] += w * (g[j] * g[j]);                              \
  }                                                                                           \
}                                                                                             \
/* c_j from the column sums of r^2 G^2 (kept where the column is zero). */                   \
void sinkgd_columns_##SUF(int64_t n, const T* col, T* c, T target, T eps) {                   \
  for (int64_t j = 0; j < n; ++j)                                                             \
    if (col[j] > 0) c[j] = c[j] / (c[j] * SQRT(col[j]) + eps) * target;                       \
}                                                                                             \
/* p -= lr * G * r[:, None] * c[None, :] over rows [0, rows). */                              \
void sinkgd_apply_##SUF(const T* G, T* P, int64_t rows, int64_t n, const T* r, const T* c,    \
                        T lr) {                                                               \
  for (int64_t i = 0; i < rows; ++i) {                                                        \
    const T* g = G + i * n;                                                                   \
    T* p = P + i * n;                                                                         \
    const T ri = r[i];                                                                        \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) p[j] -= lr * ((g[j] * ri) * c[j]);                        \
  }                                                                                           \
}                                                                                             \
/* The whole step for one [m, n] matrix: iters sweeps, then the update. */                    \
int sinkgd_full_##SUF(const T* G, T* P, int64_t m, int64_t n, int64_t iters, T eps, T lr) {  \
  T* r = (T*)malloc(sizeof(T) * m);                                                           \
  T* buf = (T*)malloc(sizeof(T) * 3 * n);                                                     \
  if (!r || !buf) { free(r); free(buf); return 1; }                                           \
  T* c = buf; T* c2 = buf + n; T* col = buf + 2 * n;                                          \
  const T sn = SQRT((T)n), sm = SQRT((T)m);                                                   \
  for (int64_t i = 0; i < m; ++i) r[i] = 1;                                                   \
  for (int64_t j = 0; j < n; ++j) c[j] = 1;                                                   \
  for (int64_t it = 0; it < iters; ++it) {                                                    \
    for (int64_t j = 0; j < n; ++j) { c2[j] = c[j] * c[j]; col[j] = 0; }                      \
    sinkgd_pass_##SUF(G, m, n, c2, r, col, sn, eps);                                          \
    sinkgd_columns_##SUF(n, col, c, sm, eps);                                                 \
  }                                                                                           \
  sinkgd_apply_##SUF(G, P, m, n, r, c, lr);                                                   \
  free(r); free(buf);                                                                         \
  return 0;                                                                                   \
}

#define DEFINE_COLUMNS(T, SUF, ABS)                                                          \
/* col[j] += sum over rows [0, rows) of G_ij^2 (square) or |G_ij|: one pass; blocks of 256      \
   rows are summed apart first, so that the error grows like that of a two-level sum. */       \
int column_sums_##SUF(const T* G, int64_t rows, int64_t n, T* col, int square) {              \
  T* blk = (T*)malloc(sizeof(T) * n);                                                         \
  if (!blk) return 1;                                                                         \
  for (int64_t i0 = 0; i0 < rows; i0 += 256) {                                                \
    const int64_t i1 = i0 + 256 < rows ? i0 + 256 : rows;                                     \
    for (int64_t j = 0; j < n; ++j) blk[j] = 0;                                               \
    for (int64_t i = i0; i < i1; ++i) {                                                       \
      const T* g = G + i * n;                                                                 \
      if (square) {                                                                           \
        _Pragma("omp simd")                                                                   \
        for (int64_t j = 0; j < n; ++j) blk[j] += g[j] * g[j];                                \
      } else {                                                                                \
        _Pragma("omp simd")                                                                   \
        for (int64_t j = 0; j < n; ++j) blk[j] += ABS(g[j]);                                  \
      }                                                                                       \
    }                                                                                         \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) col[j] += blk[j];                                         \
  }                                                                                           \
  free(blk);                                                                                  \
  return 0;                                                                                   \
}

DEFINE(float, f32, sqrtf)
DEFINE(double, f64, sqrt)
DEFINE_COLUMNS(float, f32, fabsf)
DEFINE_COLUMNS(double, f64, fabs)
"""

# a matrix up to this many bytes is one task (its sweeps stay in the core's L2); a larger one is
# swept by all threads, each over a block of its rows, with the column sums combined per iteration
WHOLE_MATRIX_BYTES = 2 * 2**20

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_pool: ThreadPoolExecutor | None = None
_TYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}
# entry point -> how many times it ran (for tests and ``slimopt profile``)
calls: dict[str, int] = {}


def _count(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slimopt" / "kernels"


def _compile(path: Path) -> None:
    cc = os.environ.get("CC", "cc")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "sinkgd.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / path.name
        base = [cc, "-O3", "-fopenmp-simd", "-fPIC", "-shared", str(src), "-o", str(out), "-lm"]
        errors = []
        for extra in (["-march=native"], []):
            proc = subprocess.run(base[:2] + extra + base[2:], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(out, path)  # atomic: concurrent processes never see half a file
                return
            errors.append(proc.stderr.strip()[-500:])
        raise RuntimeError(f"{cc} failed: {errors[-1]}")


def library() -> ctypes.CDLL | None:
    """The compiled kernels, compiling them on first use; None where that is not possible."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        if sys.platform == "win32":
            _failed = "native kernels are built on Linux and macOS only"
            return None
        digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
        path = _cache_dir() / f"sinkgd-{digest}.so"
        try:
            if not path.exists():
                _compile(path)
            lib = ctypes.CDLL(str(path))
            for suffix, ctype in _TYPES.values():
                ptr, i64 = ctypes.c_void_p, ctypes.c_int64
                full = getattr(lib, f"sinkgd_full_{suffix}")
                full.argtypes = [ptr, ptr, i64, i64, i64, ctype, ctype]
                full.restype = ctypes.c_int
                sweep = getattr(lib, f"sinkgd_pass_{suffix}")
                sweep.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctype, ctype]
                sweep.restype = None
                columns = getattr(lib, f"sinkgd_columns_{suffix}")
                columns.argtypes = [i64, ptr, ptr, ctype, ctype]
                columns.restype = None
                apply = getattr(lib, f"sinkgd_apply_{suffix}")
                apply.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ctype]
                apply.restype = None
                sums = getattr(lib, f"column_sums_{suffix}")
                sums.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
                sums.restype = ctypes.c_int
            _lib = lib
        except (OSError, RuntimeError, AttributeError) as exc:
            _failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            warnings.warn(
                f"slimopt: SinkGD's native kernel is unavailable ({_failed}); "
                "using the multi-tensor path",
                RuntimeWarning,
                stacklevel=3,
            )
    return _lib


def supports(p: Tensor, g: Tensor) -> bool:
    """Whether the native kernel can take this parameter and gradient."""
    return (
        p.device.type == "cpu"
        and p.dtype in _TYPES
        and g.dtype == p.dtype
        and type(p) in (Tensor, torch.nn.Parameter)
        and type(g) in (Tensor, torch.nn.Parameter)
        and p.is_contiguous()
        and g.is_contiguous()
        and p.ndim >= 2
        and p.numel() > 0
    )


def _threads() -> ThreadPoolExecutor:
    global _pool
    workers = max(1, torch.get_num_threads())
    if _pool is None or _pool._max_workers != workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slimopt-sinkgd")
    return _pool


def sinkgd_step(
    params: list[Tensor], grads: list[Tensor], iters: int, eps: float, lr: float
) -> None:
    """``p -= lr * X`` for each matrix, X the Sinkhorn-normalized gradient (see the module
    docstring); the caller applies the weight decay. Every tensor must pass :func:`supports`."""
    lib = library()
    assert lib is not None
    _count("sinkgd")
    pool = _threads()
    workers = pool._max_workers
    small, large = [], []
    for p, g in zip(params, grads):
        whole_matrix = p.numel() * p.element_size() <= WHOLE_MATRIX_BYTES or workers == 1
        (small if whole_matrix else large).append((p, g))

    def whole(p: Tensor, g: Tensor) -> None:
        suffix, ctype = _TYPES[p.dtype]
        m = p.shape[0]
        n = p.numel() // m
        status = getattr(lib, f"sinkgd_full_{suffix}")(
            g.data_ptr(), p.data_ptr(), m, n, iters, ctype(eps), ctype(lr)
        )
        if status != 0:
            raise MemoryError("sinkgd: out of memory for the scaling vectors")

    jobs = [pool.submit(whole, p, g) for p, g in sorted(small, key=lambda t: -t[0].numel())]
    for p, g in large:
        _large(lib, pool, p, g, iters, eps, lr)
    for job in jobs:
        job.result()


def column_sums(G: Tensor, *, square: bool) -> Tensor:
    """``sum(G**2, dim=0)`` or ``sum(|G|, dim=0)`` of a CPU float32/float64 matrix in one pass,
    its rows split over the threads (each accumulates its own row of partial sums in the
    matrix's dtype, as torch's float32 reductions do)."""
    lib = library()
    assert lib is not None and G.is_contiguous() and G.dtype in _TYPES
    suffix, _ = _TYPES[G.dtype]
    _count("column_sums")
    m, n = G.shape
    pool = _threads()
    workers = min(pool._max_workers, max(1, m // 64))
    bounds = [(m * k) // workers for k in range(workers + 1)]
    cols = torch.zeros(workers, n, dtype=G.dtype)
    fn = getattr(lib, f"column_sums_{suffix}")
    size = G.element_size()
    jobs = [
        pool.submit(fn, G.data_ptr() + a * n * size, b - a, n, cols[k].data_ptr(), int(square))
        for k, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]
    if any(job.result() != 0 for job in jobs):
        raise MemoryError("column_sums: out of memory for a row of partial sums")
    return cols.sum(0)


def _large(
    lib: ctypes.CDLL,
    pool: ThreadPoolExecutor,
    p: Tensor,
    g: Tensor,
    iters: int,
    eps: float,
    lr: float,
) -> None:
    """One large matrix, its rows split over the threads; column sums combined per sweep."""
    suffix, ctype = _TYPES[p.dtype]
    m = p.shape[0]
    n = p.numel() // m
    workers = pool._max_workers
    bounds = [(m * k) // workers for k in range(workers + 1)]
    blocks = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    r = torch.ones(m, dtype=p.dtype)
    c = torch.ones(n, dtype=p.dtype)
    cols = torch.zeros(len(blocks), n, dtype=p.dtype)
    sweep = getattr(lib, f"sinkgd_pass_{suffix}")
    sn, sm = ctype(n**0.5), ctype(m**0.5)
    size = p.element_size()
    for _ in range(iters):
        c2 = c * c
        cols.zero_()
        futures = [
            pool.submit(
                sweep,
                g.data_ptr() + a * n * size,
                b - a,
                n,
                c2.data_ptr(),
                r.data_ptr() + a * size,
                cols[k].data_ptr(),
                sn,
                ctype(eps),
            )
            for k, (a, b) in enumerate(blocks)
        ]
        for f in futures:
            f.result()
        col = cols.sum(0)
        getattr(lib, f"sinkgd_columns_{suffix}")(n, col.data_ptr(), c.data_ptr(), sm, ctype(eps))
    apply = getattr(lib, f"sinkgd_apply_{suffix}")
    futures = [
        pool.submit(
            apply,
            g.data_ptr() + a * n * size,
            p.data_ptr() + a * n * size,
            b - a,
            n,
            r.data_ptr() + a * size,
            c.data_ptr(),
            ctype(lr),
        )
        for a, b in blocks
    ]
    for f in futures:
        f.result()


__all__ = ["WHOLE_MATRIX_BYTES", "calls", "column_sums", "library", "sinkgd_step", "supports"]
