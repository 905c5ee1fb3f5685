"""Native CPU loops for the fused path: the updates whose passes torch cannot fuse well on a CPU.

``torch.compile`` fuses element-wise updates into one loop, but each compiled call costs tens of
microseconds in guards and wrappers (a model has hundreds of parameters), and SinkGD's iterations
alternate a reduction over rows with one over columns, which inductor (and eager torch, through
G*G and batched mat-vecs) turns into two or more passes over the matrix per iteration. The small
C loops below read each tensor once and write it once:

- SinkGD: one pass per Sinkhorn iteration (for each row: ``q_i = sum_j G_ij**2 c_j**2``, the row
  scale, and at once ``r_i**2 G_ij**2`` added to the column sums; row in L1), then one pass
  ``p -= lr * G * r * c``. The matrix is read ``iters + 1`` times and never copied.
- SCALE: a row's momentum, RMS and update in one pass (the row stays in L1); the column-normalized
  embedding's update given its column denominators; column sums of ``G**2`` or ``|G|`` (SAGE's
  statistic too) in one pass.
- SGD-SaI (after its first step), Lion and SAGE's update: one pass each.

Part of the opt-in fused path (:func:`slimopt.algorithms.fused.set_fused`): float32/float64
contiguous CPU tensors only (elsewhere the compiled or eager paths run); compiled with the system
C compiler (``cc``, or ``$CC``) into ``$XDG_CACHE_HOME/slimopt/kernels`` once per source version;
``ctypes`` calls release the GIL, so tensors, or blocks of their rows, are spread over
``torch.get_num_threads()`` threads. Without a working compiler :func:`library` returns None
(with one warning) and the rules keep their other paths. The arithmetic follows each rule's
reference (tested in float64 to 1e-10), including its handling of zero rows and of NaN and Inf.
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
from typing import Any

import torch
from torch import Tensor

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define DEFINE(T, SUF, SQRT)                                                                  \
/* One sweep over rows [0, rows): rescale r_i from this row's sum of G^2 c^2, then add       \
   r_i^2 G^2 to col. With `four`, four rows at a time: their sums share the loads of c2 (four   \
   independent accumulators) and their contributions to col one load and store of it; faster   \
   on a matrix of a few MB, slower (measured) when the rows stream from memory. */             \
static inline void rescale_row_##SUF(T* r, T q, T target, T eps) {                             \
  if (q > 0) { const T ri = *r; *r = ri / (ri * SQRT(q) + eps) * target; }                    \
}                                                                                             \
void sinkgd_pass_##SUF(const T* G, int64_t rows, int64_t n, const T* c2, T* r, T* col,        \
                       T target, T eps, int four) {                                           \
  int64_t i = 0;                                                                              \
  for (; four && i + 4 <= rows; i += 4) {                                                     \
    const T* g0 = G + i * n; const T* g1 = g0 + n; const T* g2 = g1 + n; const T* g3 = g2 + n; \
    T q0 = 0, q1 = 0, q2 = 0, q3 = 0;                                                         \
    _Pragma("omp simd reduction(+:q0,q1,q2,q3)")                                              \
    for (int64_t j = 0; j < n; ++j) {                                                         \
      const T c = c2[j];                                                                      \
      q0 += g0[j] * g0[j] * c; q1 += g1[j] * g1[j] * c;                                        \
      q2 += g2[j] * g2[j] * c; q3 += g3[j] * g3[j] * c;                                        \
    }                                                                                         \
    rescale_row_##SUF(r + i, q0, target, eps); rescale_row_##SUF(r + i + 1, q1, target, eps);   \
    rescale_row_##SUF(r + i + 2, q2, target, eps); rescale_row_##SUF(r + i + 3, q3, target, eps);\
    const T w0 = r[i] * r[i], w1 = r[i + 1] * r[i + 1];                                       \
    const T w2 = r[i + 2] * r[i + 2], w3 = r[i + 3] * r[i + 3];                               \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j)                                                           \
      col[j] += w0 * (g0[j] * g0[j]) + w1 * (g1[j] * g1[j])                                    \
              + w2 * (g2[j] * g2[j]) + w3 * (g3[j] * g3[j]);                                   \
  }                                                                                           \
  for (; i < rows; ++i) {                                                                     \
    const T* g = G + i * n;                                                                   \
    T q = 0;                                                                                  \
    _Pragma("omp simd reduction(+:q)")                                                        \
    for (int64_t j = 0; j < n; ++j) q += g[j] * g[j] * c2[j];                                 \
    rescale_row_##SUF(r + i, q, target, eps);                                                 \
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
    sinkgd_pass_##SUF(G, m, n, c2, r, col, sn, eps, m * n * (int64_t)sizeof(T) <= (1 << 22)); \
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

#define DEFINE_SCALE(T, SUF, SQRT)                                                           \
/* SCALE over rows [0, rows) of a row-normalized matrix: u = g, or with momentum               \
   m = beta*m + (1-beta)*g and u = m; then p = p*decay - u * lr / max(rms(u row), eps). */       \
void scale_rows_##SUF(T* P, const T* G, T* M, int64_t rows, int64_t n, T lr, T decay, T eps,    \
                      T beta) {                                                               \
  for (int64_t i = 0; i < rows; ++i) {                                                        \
    T* p = P + i * n;                                                                         \
    const T* u = G + i * n;                                                                   \
    if (M) {                                                                                  \
      T* m = M + i * n;                                                                       \
      const T a = 1 - beta;                                                                   \
      _Pragma("omp simd")                                                                     \
      for (int64_t j = 0; j < n; ++j) m[j] = m[j] * beta + a * u[j];                          \
      u = m;                                                                                  \
    }                                                                                         \
    T ss = 0;                                                                                 \
    _Pragma("omp simd reduction(+:ss)")                                                       \
    for (int64_t j = 0; j < n; ++j) ss += u[j] * u[j];                                        \
    T denom = SQRT(ss / (T)n);                                                                \
    if (!(denom >= eps)) denom = denom != denom ? denom : eps; /* clamp, NaN kept */          \
    const T step = lr / denom;                                                                \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) p[j] = p[j] * decay - u[j] * step;                        \
  }                                                                                           \
}                                                                                             \
/* p = p*decay - u * step[j] over rows [0, rows) (a column-normalized matrix). */             \
void scale_cols_##SUF(T* P, const T* U, int64_t rows, int64_t n, const T* step, T decay) {     \
  for (int64_t i = 0; i < rows; ++i) {                                                        \
    T* p = P + i * n;                                                                         \
    const T* u = U + i * n;                                                                   \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) p[j] = p[j] * decay - u[j] * step[j];                     \
  }                                                                                           \
}

#define SIGN_OR_NAN(T, c) (isfinite(c) ? (T)((c) > 0) - (T)((c) < 0) : (T)NAN)

#define DEFINE_ELEMENTWISE(T, SUF)                                                           \
/* SGD-SaI after its first step: m = mu*m + (1-mu)*g;  p = p*decay - m*step. */               \
void sgd_sai_##SUF(T* P, const T* G, T* M, int64_t n, T decay, T mu, T step) {               \
  const T a = 1 - mu;                                                                         \
  _Pragma("omp simd")                                                                         \
  for (int64_t j = 0; j < n; ++j) {                                                           \
    const T m = M[j] * mu + a * G[j];                                                         \
    M[j] = m;                                                                                 \
    P[j] = P[j] * decay - m * step;                                                           \
  }                                                                                           \
}                                                                                             \
/* Lion: c = b1*m + (1-b1)*g;  p = p*decay - lr*sign(c);  m = b2*m + (1-b2)*g. */              \
void lion_##SUF(T* P, const T* G, T* M, int64_t n, T lr, T decay, T b1, T b2) {              \
  const T a1 = 1 - b1, a2 = 1 - b2;                                                           \
  _Pragma("omp simd")                                                                         \
  for (int64_t j = 0; j < n; ++j) {                                                           \
    const T c = M[j] * b1 + a1 * G[j];                                                        \
    P[j] = P[j] * decay - lr * SIGN_OR_NAN(T, c);                                             \
    M[j] = M[j] * b2 + a2 * G[j];                                                             \
  }                                                                                           \
}                                                                                             \
/* SAGE's update of rows [0, rows) of a [rows, n] matrix with its damping H [n]. */            \
void sage_##SUF(T* P, const T* G, T* M, const T* H, int64_t rows, int64_t n, T lr, T decay,   \
                T b1, T b2, int lion_order) {                                                 \
  const T a1 = 1 - b1, a2 = 1 - b2;                                                           \
  for (int64_t i = 0; i < rows; ++i) {                                                        \
    T* p = P + i * n;                                                                         \
    const T* g = G + i * n;                                                                   \
    T* m = M + i * n;                                                                         \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) {                                                         \
      const T m_new = m[j] * b2 + a2 * g[j];                                                  \
      const T c = (lion_order ? m[j] : m_new) * b1 + a1 * g[j];                               \
      p[j] = p[j] * decay - lr * (SIGN_OR_NAN(T, c) * H[j]);                                  \
      m[j] = m_new;                                                                           \
    }                                                                                         \
  }                                                                                           \
}

DEFINE(float, f32, sqrtf)
DEFINE(double, f64, sqrt)
DEFINE_SCALE(float, f32, sqrtf)
DEFINE_SCALE(double, f64, sqrt)
DEFINE_ELEMENTWISE(float, f32)
DEFINE_ELEMENTWISE(double, f64)
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
_workers = 0
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
        path = _cache_dir() / f"native-{digest}.so"
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
                sweep.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctype, ctype, ctypes.c_int]
                sweep.restype = None
                columns = getattr(lib, f"sinkgd_columns_{suffix}")
                columns.argtypes = [i64, ptr, ptr, ctype, ctype]
                columns.restype = None
                apply = getattr(lib, f"sinkgd_apply_{suffix}")
                apply.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ctype]
                apply.restype = None
                rows_fn = getattr(lib, f"scale_rows_{suffix}")
                rows_fn.argtypes = [ptr, ptr, ptr, i64, i64, ctype, ctype, ctype, ctype]
                rows_fn.restype = None
                cols_fn = getattr(lib, f"scale_cols_{suffix}")
                cols_fn.argtypes = [ptr, ptr, i64, i64, ptr, ctype]
                cols_fn.restype = None
                sgd = getattr(lib, f"sgd_sai_{suffix}")
                sgd.argtypes = [ptr, ptr, ptr, i64, ctype, ctype, ctype]
                sgd.restype = None
                lion = getattr(lib, f"lion_{suffix}")
                lion.argtypes = [ptr, ptr, ptr, i64, ctype, ctype, ctype, ctype]
                lion.restype = None
                sage = getattr(lib, f"sage_{suffix}")
                sage.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctype, ctype, ctype, ctype]
                sage.argtypes += [ctypes.c_int]
                sage.restype = None
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


def supports_all(*tensors: Tensor) -> bool:
    """Whether the native loops can take these same-shaped tensors (any ndim) and are built."""
    first = tensors[0]
    return (
        all(
            t.device.type == "cpu"
            and t.dtype == first.dtype
            and type(t) in (Tensor, torch.nn.Parameter)
            and t.is_contiguous()
            and t.shape == first.shape
            for t in tensors
        )
        and first.dtype in _TYPES
        and first.numel() > 1
        and library() is not None
    )


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


def _workers_now() -> int:
    _threads()
    return _workers


def _threads() -> ThreadPoolExecutor:
    """The worker threads, as many as ``torch.get_num_threads()`` (re-made when that changes)."""
    global _pool, _workers
    workers = max(1, torch.get_num_threads())
    if _pool is None or _workers != workers:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slimopt-native")
        _workers = workers
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
    workers = _workers
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
    workers = min(_workers, max(1, m // 64))
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


def _row_blocks(m: int, n: int, size: int, workers: int) -> list[tuple[int, int]]:
    """Split rows [0, m) into blocks of at least ~1 MB, at most ``workers`` of them."""
    parts = max(1, min(workers, (m * n * size) // 2**20))
    bounds = [(m * k) // parts for k in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def scale_step(
    items: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]],
    lr: float,
    weight_decay: float,
    eps: float,
    beta: float,
) -> None:
    """SCALE's update for CPU float32/float64 matrices, one pass each, over the threads.

    ``items``: ``(p, u, m, step)``. Row-normalized (``step`` None): ``u`` is the gradient, with
    ``m`` the momentum buffer updated here (or None), and each row's RMS is taken in the same
    pass as its update. Column-normalized: ``step`` [n] = lr / the column denominators, and
    ``u`` is what they were taken of (the gradient, or the already-updated momentum).
    """
    lib = library()
    assert lib is not None
    _count("scale")
    pool = _threads()
    decay = 1.0 - lr * weight_decay
    jobs = []
    for p, u, m, step in items:
        suffix, ctype = _TYPES[p.dtype]
        rows = p.shape[0]
        n = p.numel() // rows
        size = p.element_size()
        for a, b in _row_blocks(rows, n, size, _workers):
            offset = a * n * size
            if step is None:
                fn = getattr(lib, f"scale_rows_{suffix}")
                m_ptr = None if m is None else m.data_ptr() + offset
                args = (p.data_ptr() + offset, u.data_ptr() + offset, m_ptr, b - a, n)
                args += (ctype(lr), ctype(decay), ctype(eps), ctype(beta))
            else:
                fn = getattr(lib, f"scale_cols_{suffix}")
                args = (p.data_ptr() + offset, u.data_ptr() + offset, b - a, n, step.data_ptr())
                args += (ctype(decay),)
            jobs.append(pool.submit(fn, *args))
    for job in jobs:
        job.result()


def _run(jobs: list[tuple[Any, tuple]]) -> None:
    """Run ``(fn, args)`` jobs: here when there is one thread or one job, else over the pool."""
    pool = _threads()
    if _workers == 1 or len(jobs) == 1:
        for fn, args in jobs:
            fn(*args)
        return
    for future in [pool.submit(fn, *args) for fn, args in jobs]:
        future.result()


def _blocks(t: Tensor) -> tuple[int, int]:
    """[rows, n] for a contiguous tensor: its matrix view, or a vector cut in rows of 4096."""
    if t.ndim >= 2:
        return t.shape[0], t.numel() // t.shape[0]
    n = t.numel()
    return (n // 4096, 4096) if n % 4096 == 0 and n >= 4096 else (1, n)


def _elementwise_jobs(name: str, tensors: tuple[Tensor, ...], scalars: tuple) -> list:
    """One job per ~1 MB block of rows of same-shaped tensors, for an element-wise loop
    ``fn(*pointers, count, *scalars)``."""
    lib = library()
    assert lib is not None
    suffix, ctype = _TYPES[tensors[0].dtype]
    fn = getattr(lib, f"{name}_{suffix}")
    rows, n = _blocks(tensors[0])
    size = tensors[0].element_size()
    jobs = []
    for a, b in _row_blocks(rows, n, size, _workers_now()):
        ptrs = [t.data_ptr() + a * n * size for t in tensors]
        jobs.append((fn, (*ptrs, (b - a) * n, *(ctype(x) for x in scalars))))
    return jobs


def sgd_sai_step(
    items: list[tuple[Tensor, Tensor, Tensor, float]], lr: float, weight_decay: float, mu: float
) -> None:
    """SGD-SaI after its first step for ``(p, g, m, step)``, ``step`` = lr * gsnr (rounded to
    p's dtype): ``m = mu*m + (1-mu)*g; p = p*(1 - lr*wd) - m*step`` in one pass."""
    _count("sgd_sai")
    jobs = []
    for p, g, m, step in items:
        jobs += _elementwise_jobs("sgd_sai", (p, g, m), (1.0 - weight_decay * lr, mu, step))
    _run(jobs)


def lion_step(
    items: list[tuple[Tensor, Tensor, Tensor]], lr: float, weight_decay: float, b1: float, b2: float
) -> None:
    """Lion for ``(p, g, m)``, one pass each (NaN where the interpolation is not finite)."""
    _count("lion")
    jobs = []
    for p, g, m in items:
        jobs += _elementwise_jobs("lion", (p, g, m), (lr, 1.0 - lr * weight_decay, b1, b2))
    _run(jobs)


def sage_step(
    items: list[tuple[Tensor, Tensor, Tensor, Tensor]],
    lr: float,
    weight_decay: float,
    b1: float,
    b2: float,
    lion_order: bool,
) -> None:
    """SAGE's update for ``(p, g, m, H)`` matrices (H [n] over the rows), one pass each."""
    lib = library()
    assert lib is not None
    _count("sage")
    jobs = []
    for p, g, m, H in items:
        suffix, ctype = _TYPES[p.dtype]
        fn = getattr(lib, f"sage_{suffix}")
        rows, n = _blocks(p)
        size = p.element_size()
        for a, b in _row_blocks(rows, n, size, _workers_now()):
            off = a * n * size
            ptrs = (p.data_ptr() + off, g.data_ptr() + off, m.data_ptr() + off, H.data_ptr())
            scalars = (ctype(lr), ctype(1.0 - lr * weight_decay), ctype(b1), ctype(b2))
            jobs.append((fn, (*ptrs, b - a, n, *scalars, int(lion_order))))
    _run(jobs)


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
    workers = _workers
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
                0,
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


__all__ = [
    "WHOLE_MATRIX_BYTES",
    "calls",
    "column_sums",
    "library",
    "lion_step",
    "sage_step",
    "scale_step",
    "sgd_sai_step",
    "sinkgd_step",
    "supports",
    "supports_all",
]
