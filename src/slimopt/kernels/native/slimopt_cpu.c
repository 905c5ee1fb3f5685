/* slimopt's native CPU loops: the fused CPU tier of the update rules.
 *
 * Built once per source version by slimopt/kernels/cpu.py with the system C compiler and
 * loaded through ctypes; every entry point exists in a float (f32) and a double (f64) version,
 * and the pure-bf16 ones in a bf16 version. Each loop mirrors the arithmetic order of its rule's
 * reference (slimopt/algorithms/<rule>.py), including its handling of zero rows and of NaN and Inf.
 *
 * Threads: an entry point given at least PAR_MIN elements splits its work with OpenMP over the
 * number of threads set by slimopt_set_threads (cpu.py passes torch.get_num_threads() before each
 * step). Built with -fopenmp, the library uses the OpenMP runtime torch already loaded (the same
 * libgomp.so.1), so its threads are torch's own: no second pool competes for the cores. Each
 * entry point is a parallel region that hands every thread its share of whole blocks (share())
 * and calls a serial kernel on it (a plain function of plain arguments, which the compiler
 * vectorises as it would without OpenMP; the loops written inside the region itself ran 2x
 * slower, measured). Sums go over fixed blocks whose partial results are added in block order,
 * so no result depends on the thread count. Without OpenMP the pragmas are ignored and the
 * loops run on the calling thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static int g_threads = 1;

/* The number of threads a large loop splits over (at least 1). */
void slimopt_set_threads(int n) { g_threads = n > 0 ? n : 1; }

/* 1 where the library was built with OpenMP (its loops can use several threads), else 0. */
int slimopt_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

/* a loop over fewer elements stays on the calling thread (a fork/join costs microseconds) */
#define PAR_MIN ((int64_t)1 << 15)
#define PARALLEL(work) (g_threads > 1 && (int64_t)(work) >= PAR_MIN)
/* a parallel region over g_threads threads when `par` (a local int) is set */
#ifdef _OPENMP
#define REGION _Pragma("omp parallel num_threads(g_threads) if(par)")
#else
#define REGION (void)par;
#endif
/* elements per block of an element-wise loop (a multiple of 8: blocks start on a Philox
 * counter), rows per block of SinkGD's partial column sums and of the column sums */
#define EW_BLOCK 4096
#define SINK_ROWS 64
#define SUM_ROWS 256
#define KERNEL static __attribute__((noinline))

/* This thread's share [*a, *e) of [0, n), in whole blocks of `block` (contiguous, in order). */
static inline void share(int64_t n, int64_t block, int64_t* a, int64_t* e) {
#ifdef _OPENMP
  const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
  const int64_t t = 0, T = 1;
#endif
  const int64_t nb = (n + block - 1) / block;
  const int64_t a_ = (nb * t / T) * block, e_ = (nb * (t + 1) / T) * block;
  *a = a_ < n ? a_ : n;
  *e = e_ < n ? e_ : n;
}

#define SIGN_OR_NAN(T, c) (isfinite(c) ? (T)((c) > 0) - (T)((c) < 0) : (T)NAN)

#define DEFINE(T, SUF, SQRT)                                                                  \
/* dst[j] += parts[b * n + j] for the blocks b in [first, nb), in block order: how every      \
   split sum is combined, so that its bits do not depend on the thread count */               \
static void add_blocks_##SUF(T* dst, const T* parts, int64_t first, int64_t nb, int64_t n) {  \
  for (int64_t b = first; b < nb; ++b) {                                                      \
    const T* part = parts + b * n;                                                            \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) dst[j] += part[j];                                        \
  }                                                                                           \
}                                                                                             \
/* One sweep over rows [0, rows): rescale r_i from this row's sum of G^2 c^2, then add       \
   r_i^2 G^2 to col. With `four`, four rows at a time: their sums share the loads of c2 (four   \
   independent accumulators) and their contributions to col one load and store of it; faster   \
   on a matrix of a few MB, slower (measured) when the rows stream from memory. */             \
static inline void rescale_row_##SUF(T* r, T q, T target, T eps) {                             \
  if (q > 0) { const T ri = *r; *r = ri / (ri * SQRT(q) + eps) * target; }                    \
}                                                                                             \
static void sinkgd_pass_##SUF(const T* G, int64_t rows, int64_t n, const T* c2, T* r, T* col, \
                              T target, T eps, int four) {                                    \
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
/* the sweep of row blocks [b0, b1), each into its own partial column sums */                 \
KERNEL void sinkgd_blocks_##SUF(const T* G, int64_t m, int64_t n, int64_t b0, int64_t b1,     \
                                const T* c2, T* r, T* parts, T target, T eps, int four) {     \
  for (int64_t b = b0; b < b1; ++b) {                                                         \
    const int64_t a = b * SINK_ROWS, e = a + SINK_ROWS < m ? a + SINK_ROWS : m;               \
    T* col = parts + b * n;                                                                   \
    memset(col, 0, sizeof(T) * n);                                                            \
    sinkgd_pass_##SUF(G + a * n, e - a, n, c2, r + a, col, target, eps, four);                \
  }                                                                                           \
}                                                                                             \
/* p -= lr * G * r[:, None] * c[None, :] over rows [i0, i1). */                               \
KERNEL void sinkgd_apply_##SUF(const T* G, T* P, int64_t i0, int64_t i1, int64_t n,          \
                               const T* r, const T* c, T lr) {                                \
  for (int64_t i = i0; i < i1; ++i) {                                                         \
    const T* g = G + i * n;                                                                   \
    T* p = P + i * n;                                                                         \
    const T ri = r[i];                                                                        \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) p[j] -= lr * ((g[j] * ri) * c[j]);                        \
  }                                                                                           \
}                                                                                             \
/* c_j from the column sums of r^2 G^2 (kept where the column is zero). */                   \
static void sinkgd_columns_##SUF(int64_t n, const T* col, T* c, T target, T eps) {            \
  for (int64_t j = 0; j < n; ++j)                                                             \
    if (col[j] > 0) c[j] = c[j] / (c[j] * SQRT(col[j]) + eps) * target;                       \
}                                                                                             \
/* The whole step for one [m, n] matrix: iters sweeps over blocks of SINK_ROWS rows (split over  \
   the threads), each block adding into its own partial column sums, which are then added in  \
   block order; then the update. */                                                           \
int sinkgd_full_##SUF(const T* G, T* P, int64_t m, int64_t n, int64_t iters, T eps, T lr) {  \
  const int64_t nb = (m + SINK_ROWS - 1) / SINK_ROWS;                                         \
  T* r = (T*)malloc(sizeof(T) * m);                                                           \
  T* buf = (T*)malloc(sizeof(T) * (2 + nb) * n);                                              \
  if (!r || !buf) { free(r); free(buf); return 1; }                                           \
  T* c = buf; T* c2 = buf + n; T* parts = buf + 2 * n;                                        \
  const T sn = SQRT((T)n), sm = SQRT((T)m);                                                   \
  const int four = m * n * (int64_t)sizeof(T) <= (1 << 22);                                   \
  const int par = PARALLEL(m * n) && nb > 1;                                                  \
  for (int64_t i = 0; i < m; ++i) r[i] = 1;                                                   \
  for (int64_t j = 0; j < n; ++j) c[j] = 1;                                                   \
  for (int64_t it = 0; it < iters; ++it) {                                                    \
    for (int64_t j = 0; j < n; ++j) c2[j] = c[j] * c[j];                                      \
    REGION {                                                                                  \
      int64_t b0, b1;                                                                         \
      share(nb, 1, &b0, &b1);                                                                 \
      sinkgd_blocks_##SUF(G, m, n, b0, b1, c2, r, parts, sn, eps, four);                      \
    }                                                                                         \
    add_blocks_##SUF(parts, parts, 1, nb, n);                                                 \
    sinkgd_columns_##SUF(n, parts, c, sm, eps);                                               \
  }                                                                                           \
  REGION {                                                                                    \
    int64_t i0, i1;                                                                           \
    share(m, 1, &i0, &i1);                                                                    \
    sinkgd_apply_##SUF(G, P, i0, i1, n, r, c, lr);                                            \
  }                                                                                           \
  free(r); free(buf);                                                                         \
  return 0;                                                                                   \
}

#define DEFINE_COLUMNS(T, SUF, ABS)                                                          \
/* blocks [b0, b1) of SUM_ROWS rows: blks[b] = sum over its rows of G^2 (square) or |G| */     \
KERNEL void column_blocks_##SUF(const T* G, int64_t rows, int64_t n, int64_t b0, int64_t b1, \
                                T* blks, int square) {                                        \
  for (int64_t b = b0; b < b1; ++b) {                                                         \
    const int64_t i0 = b * SUM_ROWS, i1 = i0 + SUM_ROWS < rows ? i0 + SUM_ROWS : rows;        \
    T* blk = blks + b * n;                                                                    \
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
  }                                                                                           \
}                                                                                             \
/* col[j] += sum over rows [0, rows) of G_ij^2 (square) or |G_ij|: one pass; blocks of SUM_ROWS \
   rows are summed apart first (split over the threads), then added to col in block order, so   \
   that the error grows like that of a two-level sum and the bits do not depend on threads. */  \
int column_sums_##SUF(const T* G, int64_t rows, int64_t n, T* col, int square) {              \
  const int64_t nb = (rows + SUM_ROWS - 1) / SUM_ROWS;                                        \
  T* blks = (T*)malloc(sizeof(T) * (nb > 0 ? nb : 1) * n);                                    \
  if (!blks) return 1;                                                                        \
  const int par = PARALLEL(rows * n) && nb > 1;                                               \
  REGION {                                                                                    \
    int64_t b0, b1;                                                                           \
    share(nb, 1, &b0, &b1);                                                                   \
    column_blocks_##SUF(G, rows, n, b0, b1, blks, square);                                    \
  }                                                                                           \
  add_blocks_##SUF(col, blks, 0, nb, n);                                                      \
  free(blks);                                                                                 \
  return 0;                                                                                   \
}

#define DEFINE_SCALE(T, SUF, SQRT)                                                           \
/* SCALE over rows [i0, i1) of a row-normalized matrix: u = g, or with momentum                \
   m = beta*m + (1-beta)*g and u = m; then p = p*decay - u * lr / max(rms(u row), eps). */       \
KERNEL void scale_rows_range_##SUF(T* P, const T* G, T* M, int64_t i0, int64_t i1, int64_t n, \
                                   T lr, T decay, T eps, T beta) {                            \
  for (int64_t i = i0; i < i1; ++i) {                                                         \
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
void scale_rows_##SUF(T* P, const T* G, T* M, int64_t rows, int64_t n, T lr, T decay, T eps,    \
                      T beta) {                                                               \
  const int par = PARALLEL(rows * n) && rows > 1;                                             \
  REGION {                                                                                    \
    int64_t i0, i1;                                                                           \
    share(rows, 1, &i0, &i1);                                                                 \
    scale_rows_range_##SUF(P, G, M, i0, i1, n, lr, decay, eps, beta);                         \
  }                                                                                           \
}                                                                                             \
/* p = p*decay - u * step[j] over rows [i0, i1) (a column-normalized matrix). */              \
KERNEL void scale_cols_range_##SUF(T* P, const T* U, int64_t i0, int64_t i1, int64_t n,       \
                                   const T* step, T decay) {                                  \
  for (int64_t i = i0; i < i1; ++i) {                                                         \
    T* p = P + i * n;                                                                         \
    const T* u = U + i * n;                                                                   \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) p[j] = p[j] * decay - u[j] * step[j];                     \
  }                                                                                           \
}                                                                                             \
void scale_cols_##SUF(T* P, const T* U, int64_t rows, int64_t n, const T* step, T decay) {     \
  const int par = PARALLEL(rows * n) && rows > 1;                                             \
  REGION {                                                                                    \
    int64_t i0, i1;                                                                           \
    share(rows, 1, &i0, &i1);                                                                 \
    scale_cols_range_##SUF(P, U, i0, i1, n, step, decay);                                     \
  }                                                                                           \
}

#define DEFINE_ELEMENTWISE(T, SUF, FMA)                                                      \
/* The element-wise rules with torch's arithmetic: its `add(x, alpha=a)` is one fused          \
   multiply-add, FMA(x, a, self); the one-minus factors come from the caller, computed as torch \
   computes them (in double, then converted). */                                                \
/* SGD-SaI after its first step over [a, e): m = fma(g, 1-mu, m*mu);  p = p*decay - m*step. */  \
KERNEL void sgd_sai_range_##SUF(T* P, const T* G, T* M, int64_t a, int64_t e, T decay, T mu,  \
                                T a_, T step) {                                               \
  _Pragma("omp simd")                                                                         \
  for (int64_t j = a; j < e; ++j) {                                                           \
    const T m = FMA(G[j], a_, M[j] * mu);                                                     \
    M[j] = m;                                                                                 \
    P[j] = P[j] * decay - m * step;                                                           \
  }                                                                                           \
}                                                                                             \
void sgd_sai_##SUF(T* P, const T* G, T* M, int64_t n, T decay, T mu, T a_, T step) {          \
  const int par = PARALLEL(n);                                                                \
  REGION {                                                                                    \
    int64_t a, e;                                                                             \
    share(n, EW_BLOCK, &a, &e);                                                               \
    sgd_sai_range_##SUF(P, G, M, a, e, decay, mu, a_, step);                                  \
  }                                                                                           \
}                                                                                             \
/* Lion over [a, e): c = fma(g, a1, m*b1);  p = fma(sign(c), -lr, p*decay);                    \
   m = fma(g, a2, m*b2). */                                                                    \
KERNEL void lion_range_##SUF(T* P, const T* G, T* M, int64_t a, int64_t e, T lr, T decay,     \
                             T b1, T b2, T a1, T a2) {                                        \
  _Pragma("omp simd")                                                                         \
  for (int64_t j = a; j < e; ++j) {                                                           \
    const T c = FMA(G[j], a1, M[j] * b1);                                                     \
    P[j] = FMA(SIGN_OR_NAN(T, c), -lr, P[j] * decay);                                         \
    M[j] = FMA(G[j], a2, M[j] * b2);                                                          \
  }                                                                                           \
}                                                                                             \
void lion_##SUF(T* P, const T* G, T* M, int64_t n, T lr, T decay, T b1, T b2, T a1, T a2) {  \
  const int par = PARALLEL(n);                                                                \
  REGION {                                                                                    \
    int64_t a, e;                                                                             \
    share(n, EW_BLOCK, &a, &e);                                                               \
    lion_range_##SUF(P, G, M, a, e, lr, decay, b1, b2, a1, a2);                               \
  }                                                                                           \
}                                                                                             \
/* SAGE's update of rows [i0, i1) of a [rows, n] matrix with its damping H [n]. */            \
KERNEL void sage_range_##SUF(T* P, const T* G, T* M, const T* H, int64_t i0, int64_t i1,      \
                             int64_t n, T lr, T decay, T b1, T b2, T a1, T a2,                \
                             int lion_order) {                                                \
  for (int64_t i = i0; i < i1; ++i) {                                                         \
    T* p = P + i * n;                                                                         \
    const T* g = G + i * n;                                                                   \
    T* m = M + i * n;                                                                         \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) {                                                         \
      const T m_new = FMA(g[j], a2, m[j] * b2);                                               \
      const T c = FMA(g[j], a1, (lion_order ? m[j] : m_new) * b1);                            \
      p[j] = FMA(SIGN_OR_NAN(T, c) * H[j], -lr, p[j] * decay);                                \
      m[j] = m_new;                                                                           \
    }                                                                                         \
  }                                                                                           \
}                                                                                             \
void sage_##SUF(T* P, const T* G, T* M, const T* H, int64_t rows, int64_t n, T lr, T decay,   \
                T b1, T b2, T a1, T a2, int lion_order) {                                     \
  const int par = PARALLEL(rows * n) && rows > 1;                                             \
  REGION {                                                                                    \
    int64_t i0, i1;                                                                           \
    share(rows, 1, &i0, &i1);                                                                 \
    sage_range_##SUF(P, G, M, H, i0, i1, n, lr, decay, b1, b2, a1, a2, lion_order);           \
  }                                                                                           \
}

DEFINE(float, f32, sqrtf)
DEFINE(double, f64, sqrt)
DEFINE_SCALE(float, f32, sqrtf)
DEFINE_SCALE(double, f64, sqrt)
DEFINE_ELEMENTWISE(float, f32, fmaf)
DEFINE_ELEMENTWISE(double, f64, fma)
DEFINE_COLUMNS(float, f32, fabsf)
DEFINE_COLUMNS(double, f64, fabs)

/* Counter-based stochastic rounding of float32 to bf16 (docs/algorithms.md, "Lean modes"): the
 * rounding integer of element i (its index in the whole tensor) is a 16-bit half of Philox4x32-10
 * with key (seed lo, seed hi) and counter (i/8 lo, i/8 hi, step, 0): element i takes half i%2 (low
 * first) of word (i%8)/2. Philox runs on PHILOX_BATCH counters at a time, each round a loop the
 * compiler vectorises (32x32->64 multiplies), so the bits cost little next to the memory traffic.
 * Finite values get the integer added to their bit pattern before the low 16 bits are cleared;
 * infinities keep their pattern and a NaN stays a quiet NaN. Same bits as slimopt.rounding. */
#define PHILOX_BATCH 72 /* >= SR_BLOCK / 8 + 1: an unaligned block of 512 spans 65 */
/* out[4b + w] = word w of counter block j0 + b: stored so, the uint32 words of a block are its
 * eight 16-bit rounding integers in element order (low half first, on a little-endian CPU). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the rounding integers are read as the 16-bit halves of little-endian words"
#endif
static void philox_generic(uint64_t j0, int64_t nb, uint32_t step, uint32_t w3, uint32_t k0,
                           uint32_t k1, uint32_t* out) {
  /* one counter per SIMD lane, its ten rounds in registers */
  _Pragma("omp simd")
  for (int64_t b = 0; b < nb; ++b) {
    const uint64_t j = j0 + (uint64_t)b;
    uint32_t c0 = (uint32_t)j, c1 = (uint32_t)(j >> 32), c2 = step, c3 = w3;
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = (uint64_t)0xD2511F53u * c0;
      const uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
      const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ ka;
      const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ kb;
      c1 = (uint32_t)p1; c3 = (uint32_t)p0; c0 = n0; c2 = n2;
      ka += 0x9E3779B9u; kb += 0xBB67AE85u;
    }
    out[4 * b] = c0; out[4 * b + 1] = c1; out[4 * b + 2] = c2; out[4 * b + 3] = c3;
  }
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* The same for 32 counters j0 .. j0 + 31 with AVX-512: two independent sets of 16 (one per
 * 32-bit lane) in flight. A round's 32x32->64 products come from vpmuludq on the even lanes and
 * on the odd lanes swapped into even position, their high and low halves put back with lane
 * swaps and blends (no 64-bit shifts: those share one port with the multiplies); then a 4 x 16
 * transpose to the word order of out. Measured 2.4x faster than the compiler's vectorisation of
 * philox_generic (0.19 against 0.46 ns per rounding integer); equal to it bit for bit (tested
 * through every rounding test, counters that carry into their high word included). */
#define PHILOX_SETS 2
static void philox32_avx512(uint64_t j0, uint32_t step, uint32_t w3, uint32_t k0, uint32_t k1,
                            uint32_t* out) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i c0[PHILOX_SETS], c1[PHILOX_SETS], c2[PHILOX_SETS], c3[PHILOX_SETS];
  for (int q = 0; q < PHILOX_SETS; ++q) {
    const uint64_t j = j0 + 16 * (uint64_t)q;
    const __m512i lo = _mm512_set1_epi32((int)(uint32_t)j), hi = _mm512_set1_epi32((int)(j >> 32));
    c0[q] = _mm512_add_epi32(lo, lane);
    /* the lanes whose low word wrapped carry one into the high word */
    c1[q] = _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(c0[q], lo), hi, one);
    c2[q] = _mm512_set1_epi32((int)step);
    c3[q] = _mm512_set1_epi32((int)w3);
  }
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  uint32_t ka = k0, kb = k1;
  for (int r = 0; r < 10; ++r) {
    const __m512i key_a = _mm512_set1_epi32((int)ka), key_b = _mm512_set1_epi32((int)kb);
    for (int q = 0; q < PHILOX_SETS; ++q) {
      const __m512i e0 = _mm512_mul_epu32(c0[q], m0);
      const __m512i o0 = _mm512_mul_epu32(_mm512_shuffle_epi32(c0[q], 0xB1), m0);
      const __m512i e1 = _mm512_mul_epu32(c2[q], m1);
      const __m512i o1 = _mm512_mul_epu32(_mm512_shuffle_epi32(c2[q], 0xB1), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(e0, 0xB1), o0);
      const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, e0, _mm512_shuffle_epi32(o0, 0xB1));
      const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(e1, 0xB1), o1);
      const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, e1, _mm512_shuffle_epi32(o1, 0xB1));
      const __m512i n0 = _mm512_ternarylogic_epi32(hi1, c1[q], key_a, 0x96); /* a ^ b ^ c */
      const __m512i n2 = _mm512_ternarylogic_epi32(hi0, c3[q], key_b, 0x96);
      c1[q] = lo1; c3[q] = lo0; c0[q] = n0; c2[q] = n2;
    }
    ka += 0x9E3779B9u; kb += 0xBB67AE85u;
  }
  for (int q = 0; q < PHILOX_SETS; ++q) {
    const __m512i t0 = _mm512_unpacklo_epi32(c0[q], c1[q]), t1 = _mm512_unpackhi_epi32(c0[q], c1[q]);
    const __m512i t2 = _mm512_unpacklo_epi32(c2[q], c3[q]), t3 = _mm512_unpackhi_epi32(c2[q], c3[q]);
    /* 128-bit lane L of u_k holds the four words of counter 4L + k */
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    const __m512i a0 = _mm512_shuffle_i32x4(u0, u1, 0x44), a1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
    const __m512i a2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), a3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    uint32_t* o = out + 64 * q;
    _mm512_storeu_si512(o, _mm512_shuffle_i32x4(a0, a1, 0x88));
    _mm512_storeu_si512(o + 16, _mm512_shuffle_i32x4(a0, a1, 0xDD));
    _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(a2, a3, 0x88));
    _mm512_storeu_si512(o + 48, _mm512_shuffle_i32x4(a2, a3, 0xDD));
  }
}
#endif

static void philox_batch(uint64_t j0, int64_t nb, uint32_t step, uint32_t w3, uint32_t k0,
                         uint32_t k1, uint32_t* out) {
  int64_t b = 0;
#if defined(__AVX512F__)
  for (; b + 16 * PHILOX_SETS <= nb; b += 16 * PHILOX_SETS)
    philox32_avx512(j0 + (uint64_t)b, step, w3, k0, k1, out + 4 * b);
#endif
  if (b < nb) philox_generic(j0 + (uint64_t)b, nb - b, step, w3, k0, k1, out + 4 * b);
}

/* The four output words of one Philox4x32-10 call (for the known-answer tests). */
void philox4x32_10(const uint32_t* ctr, const uint32_t* key, uint32_t* out) {
  uint32_t words[4];
  const uint64_t j = (uint64_t)ctr[0] | ((uint64_t)ctr[1] << 32);
  philox_batch(j, 1, ctr[2], ctr[3], key[0], key[1], words);
  for (int w = 0; w < 4; ++w) out[w] = words[w];
}

/* The rounding integers of global element indices [i0, i0 + cnt), cnt <= SR_BLOCK: Philox on
 * the blocks j = i/8 they fall in, each block's four words split into its eight 16-bit halves in
 * element order; returns a pointer to element i0's integer inside `tmp`. */
#define SR_BLOCK 512
static const uint16_t* sr_bits(uint64_t seed, uint64_t step, int64_t i0, int64_t cnt,
                               uint32_t tmp[4 * PHILOX_BATCH]) {
  const uint64_t j0 = (uint64_t)i0 >> 3;
  const int64_t nb = (int64_t)((((uint64_t)(i0 + cnt - 1)) >> 3) + 1 - j0);
  philox_batch(j0, nb, (uint32_t)step, 0, (uint32_t)seed, (uint32_t)(seed >> 32), tmp);
  return (const uint16_t*)tmp + (i0 - (int64_t)(j0 << 3));
}

/* Finite values get the integer added to their bit pattern before the low 16 bits are cleared;
 * infinities keep their pattern and a NaN stays a quiet NaN (branch-free, so the loop
 * vectorises). */
static inline uint16_t sr_one(float x, uint32_t r) {
  uint32_t bits;
  memcpy(&bits, &x, 4);
  const int finite = (bits & 0x7F800000u) != 0x7F800000u;
  const uint32_t nan = (!finite && (bits & 0x007FFFFFu)) ? 0x40u : 0u;
  return (uint16_t)(finite ? (bits + r) >> 16 : (bits >> 16) | nan);
}


/* dst[k] = stochastic round of src[k], k in [0, n), for global element indices offset + k. */
static void sr_round_serial(const float* src, uint16_t* dst, int64_t n, uint64_t seed,
                            uint64_t step, int64_t offset) {
  uint32_t tmp[4 * PHILOX_BATCH];
  for (int64_t a = 0; a < n; a += SR_BLOCK) {
    const int64_t cnt = n - a < SR_BLOCK ? n - a : SR_BLOCK;
    const uint16_t* r = sr_bits(seed, step, offset + a, cnt, tmp);
    _Pragma("omp simd")
    for (int64_t k = 0; k < cnt; ++k) dst[a + k] = sr_one(src[a + k], r[k]);
  }
}

KERNEL void sr_round_range(const float* src, uint16_t* dst, int64_t a, int64_t e, uint64_t seed,
                           uint64_t step, int64_t offset) {
  sr_round_serial(src + a, dst + a, e - a, seed, step, offset + a);
}

/* The same over the threads (each a share of whole blocks of EW_BLOCK elements). */
void sr_round_bf16(const float* src, uint16_t* dst, int64_t n, uint64_t seed, uint64_t step,
                   int64_t offset) {
  const int par = PARALLEL(n);
  REGION {
    int64_t a, e;
    share(n, EW_BLOCK, &a, &e);
    sr_round_range(src, dst, a, e, seed, step, offset);
  }
}

/* ---------------------------------------------------------------------------------------------
 * bf16 storage (pure bf16, docs/algorithms.md "Lean modes"): the loops read bf16 parameters,
 * gradients and state (uint16 bit patterns), compute in fp32 registers with the same operations,
 * in the same order and with the same fused multiply-adds as the rule's torch reference on fp32
 * copies (torch's CPU kernels use an FMA for `add(x, alpha=a)`, `lerp` and nothing else here;
 * the library is built with -ffp-contract=off so that no other product is fused), and write the
 * state rounded to nearest even (torch's `.to(bfloat16)`) and the parameter rounded
 * stochastically with the counter-based bits of its elements' indices in the whole tensor
 * (`offset + k`), or to nearest when `stochastic` is 0. Work goes in chunks of SR_CHUNK elements:
 * the new values are computed into a buffer, then rounded with one batch of Philox bits.
 * ------------------------------------------------------------------------------------------- */
#define SR_CHUNK 512

static inline float bf16_load(uint16_t h) {
  const uint32_t b = (uint32_t)h << 16;
  float f;
  memcpy(&f, &b, 4);
  return f;
}

static inline uint16_t bf16_nearest(float x) {
  uint32_t b;
  memcpy(&b, &x, 4);
  if (x != x) return 0x7FC0u;
  return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

/* the parameter's new values x[0, cnt) into dst, for global element indices idx0 + k */
static inline void bf16_store(uint16_t* dst, const float* x, int64_t cnt, uint64_t seed,
                              uint64_t step, int64_t idx0, int stochastic) {
  if (stochastic) {
    sr_round_serial(x, dst, cnt, seed, step, idx0);
  } else {
    _Pragma("omp simd")
    for (int64_t k = 0; k < cnt; ++k) dst[k] = bf16_nearest(x[k]);
  }
}

/* Software prefetch of the chunk PF_AHEAD elements ahead of element a of x: the bf16 loops
 * compute enough per byte that the hardware prefetcher alone leaves them waiting on memory
 * (lion_bf16 from a cold cache, measured: 0.98 ns per element without, 0.77 with, at 1024 or 2048
 * ahead). A prefetch never faults, so the chunks near the end need no test (the address is
 * formed as an integer: no pointer past the array). */
#define PF_AHEAD 1024
static inline void prefetch_ahead(const uint16_t* x, int64_t a) {
  const uintptr_t at = (uintptr_t)x + 2 * (uintptr_t)(a + PF_AHEAD);
  for (int k = 0; k < 2 * SR_CHUNK; k += 64) __builtin_prefetch((const void*)(at + k), 0, 3);
}
/* the same for an array the loop writes (prefetched for ownership) */
static inline void prefetch_ahead_w(const uint16_t* x, int64_t a) {
  const uintptr_t at = (uintptr_t)x + 2 * (uintptr_t)(a + PF_AHEAD);
  for (int k = 0; k < 2 * SR_CHUNK; k += 64) __builtin_prefetch((const void*)(at + k), 1, 3);
}

/* for the loops that take a row at a time: the first PF_AHEAD elements of the row `ahead`
 * rows on (a long row streams well once started) */
static inline void prefetch_row(const uint16_t* row, int64_t ahead, int64_t n, int write) {
  const uintptr_t at = (uintptr_t)row + 2 * (uintptr_t)(ahead * n);
  const int64_t bytes = 2 * (n < PF_AHEAD ? n : PF_AHEAD);
  if (write)
    for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch((const void*)(at + k), 1, 3);
  else
    for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch((const void*)(at + k), 0, 3);
}

#define SR_ARGS uint64_t seed, uint64_t step, int64_t offset, int stochastic
#define SR_VALS seed, step, offset, stochastic
/* for (a, cnt) over the chunks of SR_CHUNK elements of [a0, e0) */
#define CHUNKS(a0, e0)                                                                       \
  for (int64_t a = (a0), cnt; a < (e0) && ((cnt = ((e0) - a < SR_CHUNK ? (e0) - a : SR_CHUNK)), 1); \
       a += SR_CHUNK)

/* Lion over [a0, e0): c = fma(g, a1, m*b1);  p = fma(sign(c), -lr, p*decay);
 * m = fma(g, a2, m*b2). */
KERNEL void lion_bf16_range(uint16_t* P, const uint16_t* G, uint16_t* M, int64_t a0, int64_t e0,
                            float lr, float decay, float b1, float b2, float a1, float a2,
                            SR_ARGS) {
  float x[SR_CHUNK];
  CHUNKS(a0, e0) {
    prefetch_ahead_w(P, a);
    prefetch_ahead(G, a);
    prefetch_ahead_w(M, a);
    _Pragma("omp simd")
    for (int64_t k = 0; k < cnt; ++k) {
      const float g = bf16_load(G[a + k]), m = bf16_load(M[a + k]);
      const float c = fmaf(g, a1, m * b1);
      x[k] = fmaf(SIGN_OR_NAN(float, c), -lr, bf16_load(P[a + k]) * decay);
      M[a + k] = bf16_nearest(fmaf(g, a2, m * b2));
    }
    bf16_store(P + a, x, cnt, seed, step, offset + a, stochastic);
  }
}

void lion_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, int64_t n, float lr, float decay,
               float b1, float b2, float a1, float a2, SR_ARGS) {
  const int par = PARALLEL(n);
  REGION {
    int64_t a, e;
    share(n, EW_BLOCK, &a, &e);
    lion_bf16_range(P, G, M, a, e, lr, decay, b1, b2, a1, a2, SR_VALS);
  }
}

/* SGD-SaI after its first step over [a0, e0): m = fma(g, 1 - mu, m*mu);  p = p*decay - m*lr_gsnr. */
KERNEL void sgd_sai_bf16_range(uint16_t* P, const uint16_t* G, uint16_t* M, int64_t a0,
                               int64_t e0, float decay, float mu, float one_minus_mu,
                               float lr_gsnr, SR_ARGS) {
  float x[SR_CHUNK];
  CHUNKS(a0, e0) {
    prefetch_ahead_w(P, a);
    prefetch_ahead(G, a);
    prefetch_ahead_w(M, a);
    _Pragma("omp simd")
    for (int64_t k = 0; k < cnt; ++k) {
      const float m = fmaf(bf16_load(G[a + k]), one_minus_mu, bf16_load(M[a + k]) * mu);
      M[a + k] = bf16_nearest(m);
      x[k] = bf16_load(P[a + k]) * decay - m * lr_gsnr;
    }
    bf16_store(P + a, x, cnt, seed, step, offset + a, stochastic);
  }
}

void sgd_sai_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, int64_t n, float decay, float mu,
                  float one_minus_mu, float lr_gsnr, SR_ARGS) {
  const int par = PARALLEL(n);
  REGION {
    int64_t a, e;
    share(n, EW_BLOCK, &a, &e);
    sgd_sai_bf16_range(P, G, M, a, e, decay, mu, one_minus_mu, lr_gsnr, SR_VALS);
  }
}

/* AdamW as torch's single-tensor reference, over [a0, e0): p *= decay;  m = lerp(m, g, w);
 * v = v*b2 + (a2*g)*g;  p += (-step_size*m) / (sqrt(v)/bc2 + eps). */
KERNEL void adamw_bf16_range(uint16_t* P, const uint16_t* G, uint16_t* M, uint16_t* V, int64_t a0,
                             int64_t e0, float decay, float w, float w1, float b2, float a2,
                             float neg_step, float bc2, float eps, SR_ARGS) {
  float x[SR_CHUNK];
  const int low = fabsf(w) < 0.5f;
  CHUNKS(a0, e0) {
    prefetch_ahead_w(P, a);
    prefetch_ahead(G, a);
    prefetch_ahead_w(M, a);
    prefetch_ahead_w(V, a);
    _Pragma("omp simd")
    for (int64_t k = 0; k < cnt; ++k) {
      const float g = bf16_load(G[a + k]), m0 = bf16_load(M[a + k]);
      const float d = g - m0;
      const float m = low ? fmaf(w, d, m0) : fmaf(-d, w1, g);
      const float v = bf16_load(V[a + k]) * b2 + (a2 * g) * g;
      M[a + k] = bf16_nearest(m);
      V[a + k] = bf16_nearest(v);
      x[k] = bf16_load(P[a + k]) * decay + (neg_step * m) / (sqrtf(v) / bc2 + eps);
    }
    bf16_store(P + a, x, cnt, seed, step, offset + a, stochastic);
  }
}

void adamw_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, uint16_t* V, int64_t n, float decay,
                float w, float w1, float b2, float a2, float neg_step, float bc2, float eps,
                SR_ARGS) {
  const int par = PARALLEL(n);
  REGION {
    int64_t a, e;
    share(n, EW_BLOCK, &a, &e);
    adamw_bf16_range(P, G, M, V, a, e, decay, w, w1, b2, a2, neg_step, bc2, eps, SR_VALS);
  }
}

/* SAGE's update of rows [i0, i1) of a [rows, n] matrix with its damping H [n] (fp32). */
KERNEL void sage_bf16_range(uint16_t* P, const uint16_t* G, uint16_t* M, const float* H,
                            int64_t i0, int64_t i1, int64_t n, float lr, float decay, float b1,
                            float b2, float a1, float a2, int lion_order, SR_ARGS) {
  float x[SR_CHUNK];
  for (int64_t i = i0; i < i1; ++i) {
    uint16_t* p = P + i * n;
    const uint16_t* g_ = G + i * n;
    uint16_t* m_ = M + i * n;
    CHUNKS(0, n) {
      prefetch_ahead_w(P, i * n + a);
      prefetch_ahead(G, i * n + a);
      prefetch_ahead_w(M, i * n + a);
      _Pragma("omp simd")
      for (int64_t k = 0; k < cnt; ++k) {
        const float g = bf16_load(g_[a + k]), m = bf16_load(m_[a + k]);
        const float m_new = fmaf(g, a2, m * b2);
        const float c = fmaf(g, a1, (lion_order ? m : m_new) * b1);
        x[k] = fmaf(SIGN_OR_NAN(float, c) * H[a + k], -lr, bf16_load(p[a + k]) * decay);
        m_[a + k] = bf16_nearest(m_new);
      }
      bf16_store(p + a, x, cnt, seed, step, offset + i * n + a, stochastic);
    }
  }
}

void sage_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, const float* H, int64_t rows,
               int64_t n, float lr, float decay, float b1, float b2, float a1, float a2,
               int lion_order, SR_ARGS) {
  const int par = PARALLEL(rows * n) && rows > 1;
  REGION {
    int64_t i0, i1;
    share(rows, 1, &i0, &i1);
    sage_bf16_range(P, G, M, H, i0, i1, n, lr, decay, b1, b2, a1, a2, lion_order, SR_VALS);
  }
}

/* blocks [b0, b1) of SUM_ROWS rows of a bf16 G: blks[b] = sum over its rows of G^2 or |G| */
KERNEL void column_blocks_bf16(const uint16_t* G, int64_t rows, int64_t n, int64_t b0,
                               int64_t b1, float* blks, int square) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * SUM_ROWS, i1 = i0 + SUM_ROWS < rows ? i0 + SUM_ROWS : rows;
    float* blk = blks + b * n;
    for (int64_t j = 0; j < n; ++j) blk[j] = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const uint16_t* g = G + i * n;
      prefetch_row(g, 2, n, 0);
      if (square) {
        _Pragma("omp simd")
        for (int64_t j = 0; j < n; ++j) { const float v = bf16_load(g[j]); blk[j] += v * v; }
      } else {
        _Pragma("omp simd")
        for (int64_t j = 0; j < n; ++j) blk[j] += fabsf(bf16_load(g[j]));
      }
    }
  }
}

/* col[j] += sum over rows of G_ij^2 (square) or |G_ij| for a bf16 G, in fp32 (blocks of
 * SUM_ROWS rows summed apart first, as column_sums_f32). */
int column_sums_bf16(const uint16_t* G, int64_t rows, int64_t n, float* col, int square) {
  const int64_t nb = (rows + SUM_ROWS - 1) / SUM_ROWS;
  float* blks = (float*)malloc(sizeof(float) * (nb > 0 ? nb : 1) * n);
  if (!blks) return 1;
  const int par = PARALLEL(rows * n) && nb > 1;
  REGION {
    int64_t b0, b1;
    share(nb, 1, &b0, &b1);
    column_blocks_bf16(G, rows, n, b0, b1, blks, square);
  }
  add_blocks_f32(col, blks, 0, nb, n);
  free(blks);
  return 0;
}

/* SCALE, row-normalized, over rows [i0, i1): with momentum m = fma(g, 1-beta, m*beta) (rounded
 * to bf16 in place, the update reads the fp32 value), u = m, else u = g; then
 * p = p*decay - u * (lr / max(rms(u row), eps)). `u` is a row of n floats of scratch. */
KERNEL void scale_rows_bf16_range(uint16_t* P, const uint16_t* G, uint16_t* M, int64_t i0,
                                  int64_t i1, int64_t n, float lr, float decay, float eps,
                                  float beta, float one_minus_beta, float* u, SR_ARGS) {
  float x[SR_CHUNK];
  for (int64_t i = i0; i < i1; ++i) {
    uint16_t* p = P + i * n;
    const uint16_t* g = G + i * n;
    float ss = 0;
    prefetch_row(g, 2, n, 0);
    prefetch_row(p, 2, n, 1);
    if (M) prefetch_row(M + i * n, 2, n, 1);
    if (M) {
      uint16_t* m = M + i * n;
      _Pragma("omp simd")
      for (int64_t j = 0; j < n; ++j) {
        const float v = fmaf(bf16_load(g[j]), one_minus_beta, bf16_load(m[j]) * beta);
        m[j] = bf16_nearest(v);
        u[j] = v;
      }
    } else {
      _Pragma("omp simd")
      for (int64_t j = 0; j < n; ++j) u[j] = bf16_load(g[j]);
    }
    _Pragma("omp simd reduction(+:ss)")
    for (int64_t j = 0; j < n; ++j) ss += u[j] * u[j];
    float denom = sqrtf(ss / (float)n);
    if (!(denom >= eps)) denom = denom != denom ? denom : eps;
    const float s = lr / denom;
    CHUNKS(0, n) {
      _Pragma("omp simd")
      for (int64_t k = 0; k < cnt; ++k) x[k] = bf16_load(p[a + k]) * decay - u[a + k] * s;
      bf16_store(p + a, x, cnt, seed, step, offset + i * n + a, stochastic);
    }
  }
}

/* The same over all rows, split over the threads (each with its own row of scratch); 1 where
 * the scratch could not be allocated (nothing written then by that thread). */
int scale_rows_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, int64_t rows, int64_t n,
                    float lr, float decay, float eps, float beta, float one_minus_beta, SR_ARGS) {
  const int par = PARALLEL(rows * n) && rows > 1;
  int failed = 0;
  REGION {
    float* u = (float*)malloc(sizeof(float) * (n > 0 ? n : 1));
    if (u) {
      int64_t i0, i1;
      share(rows, 1, &i0, &i1);
      scale_rows_bf16_range(P, G, M, i0, i1, n, lr, decay, eps, beta, one_minus_beta, u,
                            SR_VALS);
      free(u);
    } else {
      _Pragma("omp atomic write")
      failed = 1;
    }
  }
  return failed;
}

/* p = p*decay - u * step[j] over rows [i0, i1) for a bf16 u (a column-normalized matrix). */
KERNEL void scale_cols_bf16_range(uint16_t* P, const uint16_t* U, int64_t i0, int64_t i1,
                                  int64_t n, const float* st, float decay, SR_ARGS) {
  float x[SR_CHUNK];
  for (int64_t i = i0; i < i1; ++i) {
    uint16_t* p = P + i * n;
    const uint16_t* u = U + i * n;
    CHUNKS(0, n) {
      prefetch_ahead_w(P, i * n + a);
      prefetch_ahead(U, i * n + a);
      _Pragma("omp simd")
      for (int64_t k = 0; k < cnt; ++k)
        x[k] = bf16_load(p[a + k]) * decay - bf16_load(u[a + k]) * st[a + k];
      bf16_store(p + a, x, cnt, seed, step, offset + i * n + a, stochastic);
    }
  }
}

void scale_cols_bf16(uint16_t* P, const uint16_t* U, int64_t rows, int64_t n, const float* st,
                     float decay, SR_ARGS) {
  const int par = PARALLEL(rows * n) && rows > 1;
  REGION {
    int64_t i0, i1;
    share(rows, 1, &i0, &i1);
    scale_cols_bf16_range(P, U, i0, i1, n, st, decay, SR_VALS);
  }
}

/* SinkGD on a bf16 gradient: one sweep over rows [0, rows) as sinkgd_pass_f32 (r, c2, col in
 * fp32), and the update p = p*decay - lr * ((g * r_i) * c_j) of rows [i0, i1). */
static void sinkgd_pass_bf16(const uint16_t* G, int64_t rows, int64_t n, const float* c2,
                             float* r, float* col, float target, float eps, int four) {
  int64_t i = 0;
  /* four rows at a time, as sinkgd_pass_f32 (measured on a 512 x 512 bf16 matrix in cache: the
   * row-at-a-time sweep was 2.2x the fp32 one) */
  for (; four && i + 4 <= rows; i += 4) {
    const uint16_t* g0 = G + i * n; const uint16_t* g1 = g0 + n;
    const uint16_t* g2 = g1 + n; const uint16_t* g3 = g2 + n;
    float q0 = 0, q1 = 0, q2 = 0, q3 = 0;
    _Pragma("omp simd reduction(+:q0,q1,q2,q3)")
    for (int64_t j = 0; j < n; ++j) {
      const float c = c2[j];
      const float v0 = bf16_load(g0[j]), v1 = bf16_load(g1[j]);
      const float v2 = bf16_load(g2[j]), v3 = bf16_load(g3[j]);
      q0 += v0 * v0 * c; q1 += v1 * v1 * c; q2 += v2 * v2 * c; q3 += v3 * v3 * c;
    }
    rescale_row_f32(r + i, q0, target, eps); rescale_row_f32(r + i + 1, q1, target, eps);
    rescale_row_f32(r + i + 2, q2, target, eps); rescale_row_f32(r + i + 3, q3, target, eps);
    const float w0 = r[i] * r[i], w1 = r[i + 1] * r[i + 1];
    const float w2 = r[i + 2] * r[i + 2], w3 = r[i + 3] * r[i + 3];
    _Pragma("omp simd")
    for (int64_t j = 0; j < n; ++j) {
      const float v0 = bf16_load(g0[j]), v1 = bf16_load(g1[j]);
      const float v2 = bf16_load(g2[j]), v3 = bf16_load(g3[j]);
      col[j] += w0 * (v0 * v0) + w1 * (v1 * v1) + w2 * (v2 * v2) + w3 * (v3 * v3);
    }
  }
  for (; i < rows; ++i) {
    const uint16_t* g = G + i * n;
    float q = 0;
    prefetch_row(g, 2, n, 0);
    _Pragma("omp simd reduction(+:q)")
    for (int64_t j = 0; j < n; ++j) { const float v = bf16_load(g[j]); q += v * v * c2[j]; }
    rescale_row_f32(r + i, q, target, eps);
    const float w = r[i] * r[i];
    _Pragma("omp simd")
    for (int64_t j = 0; j < n; ++j) { const float v = bf16_load(g[j]); col[j] += w * (v * v); }
  }
}

KERNEL void sinkgd_blocks_bf16(const uint16_t* G, int64_t m, int64_t n, int64_t b0, int64_t b1,
                               const float* c2, float* r, float* parts, float target, float eps,
                               int four) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t a = b * SINK_ROWS, e = a + SINK_ROWS < m ? a + SINK_ROWS : m;
    float* col = parts + b * n;
    memset(col, 0, sizeof(float) * n);
    sinkgd_pass_bf16(G + a * n, e - a, n, c2, r + a, col, target, eps, four);
  }
}

KERNEL void sinkgd_apply_bf16_range(const uint16_t* G, uint16_t* P, int64_t i0, int64_t i1,
                                    int64_t n, const float* r, const float* c, float lr,
                                    float decay, SR_ARGS) {
  float x[SR_CHUNK];
  for (int64_t i = i0; i < i1; ++i) {
    const uint16_t* g = G + i * n;
    uint16_t* p = P + i * n;
    const float ri = r[i];
    CHUNKS(0, n) {
      prefetch_ahead_w(P, i * n + a);
      prefetch_ahead(G, i * n + a);
      _Pragma("omp simd")
      for (int64_t k = 0; k < cnt; ++k)
        x[k] = bf16_load(p[a + k]) * decay - lr * ((bf16_load(g[a + k]) * ri) * c[a + k]);
      bf16_store(p + a, x, cnt, seed, step, offset + i * n + a, stochastic);
    }
  }
}

/* The update of rows [0, rows), split over the threads. */
void sinkgd_apply_bf16(const uint16_t* G, uint16_t* P, int64_t rows, int64_t n, const float* r,
                       const float* c, float lr, float decay, SR_ARGS) {
  const int par = PARALLEL(rows * n) && rows > 1;
  REGION {
    int64_t i0, i1;
    share(rows, 1, &i0, &i1);
    sinkgd_apply_bf16_range(G, P, i0, i1, n, r, c, lr, decay, SR_VALS);
  }
}

/* The whole SinkGD step for one bf16 [m, n] matrix: iters sweeps, then the update. */
int sinkgd_full_bf16(const uint16_t* G, uint16_t* P, int64_t m, int64_t n, int64_t iters,
                     float eps, float lr, float decay, SR_ARGS) {
  const int64_t nb = (m + SINK_ROWS - 1) / SINK_ROWS;
  float* r = (float*)malloc(sizeof(float) * m);
  float* buf = (float*)malloc(sizeof(float) * (2 + nb) * n);
  if (!r || !buf) { free(r); free(buf); return 1; }
  float* c = buf; float* c2 = buf + n; float* parts = buf + 2 * n;
  const float sn = sqrtf((float)n), sm = sqrtf((float)m);
  const int four = m * n * (int64_t)sizeof(float) <= (1 << 22); /* as sinkgd_full_f32 */
  const int par = PARALLEL(m * n) && nb > 1;
  for (int64_t i = 0; i < m; ++i) r[i] = 1;
  for (int64_t j = 0; j < n; ++j) c[j] = 1;
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t j = 0; j < n; ++j) c2[j] = c[j] * c[j];
    REGION {
      int64_t b0, b1;
      share(nb, 1, &b0, &b1);
      sinkgd_blocks_bf16(G, m, n, b0, b1, c2, r, parts, sn, eps, four);
    }
    add_blocks_f32(parts, parts, 1, nb, n);
    sinkgd_columns_f32(n, parts, c, sm, eps);
  }
  sinkgd_apply_bf16(G, P, m, n, r, c, lr, decay, SR_VALS);
  free(r); free(buf);
  return 0;
}
