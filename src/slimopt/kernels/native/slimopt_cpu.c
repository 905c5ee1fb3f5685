/* slimopt's native CPU loops: the fused CPU tier of the update rules.
 *
 * Built once per source version by slimopt/kernels/cpu.py with the system C compiler and
 * loaded through ctypes; every entry point exists in a float (f32) and a double (f64) version.
 * Each loop mirrors the arithmetic order of its rule's reference (slimopt/algorithms/<rule>.py),
 * including its handling of zero rows and of NaN and Inf.
 *
 * Threads: a loop over at least PAR_MIN elements splits its work with OpenMP over the number of
 * threads set by slimopt_set_threads (cpu.py passes torch.get_num_threads() before each step).
 * Built with -fopenmp, the library uses the OpenMP runtime already loaded by torch (the same
 * libgomp.so.1), so its threads are torch's own: no second pool competing for the cores. Every
 * split is over fixed blocks whose partial results are combined in block order, so a loop's
 * result does not depend on the thread count. Without OpenMP the pragmas are ignored and the
 * loops run on the calling thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* a loop over fewer elements stays on the calling thread (a fork/join costs a few microseconds) */
#define PAR_MIN ((int64_t)1 << 15)
#define PARALLEL(work) (g_threads > 1 && (int64_t)(work) >= PAR_MIN)
/* elements per block of an element-wise loop, and rows per block of partial column sums */
#define EW_BLOCK 4096
#define SINK_ROWS 64

#define DEFINE(T, SUF, SQRT)                                                                  \
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
/* c_j from the column sums of r^2 G^2 (kept where the column is zero). */                   \
static void sinkgd_columns_##SUF(int64_t n, const T* col, T* c, T target, T eps) {            \
  for (int64_t j = 0; j < n; ++j)                                                             \
    if (col[j] > 0) c[j] = c[j] / (c[j] * SQRT(col[j]) + eps) * target;                       \
}                                                                                             \
/* The whole step for one [m, n] matrix: iters sweeps, then p -= lr * G * r[:, None] * c.     \
   Each sweep runs over blocks of SINK_ROWS rows (split over the threads), each block adding   \
   into its own partial column sums; the partials are then added in block order. */           \
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
    _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")               \
    for (int64_t b = 0; b < nb; ++b) {                                                        \
      const int64_t a = b * SINK_ROWS, e = a + SINK_ROWS < m ? a + SINK_ROWS : m;             \
      T* col = parts + b * n;                                                                 \
      memset(col, 0, sizeof(T) * n);                                                          \
      sinkgd_pass_##SUF(G + a * n, e - a, n, c2, r + a, col, sn, eps, four);                  \
    }                                                                                         \
    for (int64_t b = 1; b < nb; ++b) {                                                        \
      const T* part = parts + b * n;                                                          \
      _Pragma("omp simd")                                                                     \
      for (int64_t j = 0; j < n; ++j) parts[j] += part[j];                                    \
    }                                                                                         \
    sinkgd_columns_##SUF(n, parts, c, sm, eps);                                               \
  }                                                                                           \
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")                 \
  for (int64_t i = 0; i < m; ++i) {                                                           \
    const T* g = G + i * n;                                                                   \
    T* p = P + i * n;                                                                         \
    const T ri = r[i];                                                                        \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) p[j] -= lr * ((g[j] * ri) * c[j]);                        \
  }                                                                                           \
  free(r); free(buf);                                                                         \
  return 0;                                                                                   \
}

#define DEFINE_COLUMNS(T, SUF, ABS)                                                          \
/* col[j] += sum over rows [0, rows) of G_ij^2 (square) or |G_ij|: one pass; blocks of 256      \
   rows are summed apart first (split over the threads), then added to col in block order, so   \
   that the error grows like that of a two-level sum and the bits do not depend on threads. */  \
int column_sums_##SUF(const T* G, int64_t rows, int64_t n, T* col, int square) {              \
  const int64_t nb = (rows + 255) / 256;                                                      \
  T* blks = (T*)malloc(sizeof(T) * (nb > 0 ? nb : 1) * n);                                    \
  if (!blks) return 1;                                                                        \
  const int par = PARALLEL(rows * n) && nb > 1;                                               \
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")                 \
  for (int64_t b = 0; b < nb; ++b) {                                                          \
    const int64_t i0 = b * 256, i1 = i0 + 256 < rows ? i0 + 256 : rows;                       \
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
  for (int64_t b = 0; b < nb; ++b) {                                                          \
    const T* blk = blks + b * n;                                                              \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) col[j] += blk[j];                                         \
  }                                                                                           \
  free(blks);                                                                                 \
  return 0;                                                                                   \
}

#define DEFINE_SCALE(T, SUF, SQRT)                                                           \
/* SCALE over rows [0, rows) of a row-normalized matrix: u = g, or with momentum               \
   m = beta*m + (1-beta)*g and u = m; then p = p*decay - u * lr / max(rms(u row), eps). */       \
void scale_rows_##SUF(T* P, const T* G, T* M, int64_t rows, int64_t n, T lr, T decay, T eps,    \
                      T beta) {                                                               \
  const int par = PARALLEL(rows * n) && rows > 1;                                             \
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")                 \
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
  const int par = PARALLEL(rows * n) && rows > 1;                                             \
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")                 \
  for (int64_t i = 0; i < rows; ++i) {                                                        \
    T* p = P + i * n;                                                                         \
    const T* u = U + i * n;                                                                   \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < n; ++j) p[j] = p[j] * decay - u[j] * step[j];                     \
  }                                                                                           \
}

#define SIGN_OR_NAN(T, c) (isfinite(c) ? (T)((c) > 0) - (T)((c) < 0) : (T)NAN)

/* for (q...) over the blocks of EW_BLOCK elements of [0, n), split over the threads when n is
   large; the body sees the block's bounds as [a, e) */
#define EW_BLOCKS(n)                                                                          \
  const int64_t nblk_ = ((n) + EW_BLOCK - 1) / EW_BLOCK;                                      \
  const int par_ = PARALLEL(n);                                                               \
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par_)")                \
  for (int64_t q = 0; q < nblk_; ++q)

#define DEFINE_ELEMENTWISE(T, SUF, FMA)                                                      \
/* The element-wise rules with torch's arithmetic: its `add(x, alpha=a)` is one fused          \
   multiply-add, FMA(x, a, self); the one-minus factors come from the caller, computed as torch \
   computes them (in double, then converted). */                                                \
/* SGD-SaI after its first step: m = fma(g, 1-mu, m*mu);  p = p*decay - m*step. */             \
void sgd_sai_##SUF(T* P, const T* G, T* M, int64_t n, T decay, T mu, T a_, T step) {          \
  EW_BLOCKS(n) {                                                                              \
    const int64_t a = q * EW_BLOCK, e = a + EW_BLOCK < n ? a + EW_BLOCK : n;                  \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = a; j < e; ++j) {                                                         \
      const T m = FMA(G[j], a_, M[j] * mu);                                                   \
      M[j] = m;                                                                               \
      P[j] = P[j] * decay - m * step;                                                         \
    }                                                                                         \
  }                                                                                           \
}                                                                                             \
/* Lion: c = fma(g, a1, m*b1);  p = fma(sign(c), -lr, p*decay);  m = fma(g, a2, m*b2). */       \
void lion_##SUF(T* P, const T* G, T* M, int64_t n, T lr, T decay, T b1, T b2, T a1, T a2) {  \
  EW_BLOCKS(n) {                                                                              \
    const int64_t a = q * EW_BLOCK, e = a + EW_BLOCK < n ? a + EW_BLOCK : n;                  \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = a; j < e; ++j) {                                                         \
      const T c = FMA(G[j], a1, M[j] * b1);                                                   \
      P[j] = FMA(SIGN_OR_NAN(T, c), -lr, P[j] * decay);                                       \
      M[j] = FMA(G[j], a2, M[j] * b2);                                                        \
    }                                                                                         \
  }                                                                                           \
}                                                                                             \
/* SAGE's update of rows [0, rows) of a [rows, n] matrix with its damping H [n]. */            \
void sage_##SUF(T* P, const T* G, T* M, const T* H, int64_t rows, int64_t n, T lr, T decay,   \
                T b1, T b2, T a1, T a2, int lion_order) {                                     \
  const int par = PARALLEL(rows * n) && rows > 1;                                             \
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")                 \
  for (int64_t i = 0; i < rows; ++i) {                                                        \
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
static void philox_batch(uint64_t j0, int64_t nb, uint32_t step, uint32_t w3, uint32_t k0,
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

/* The same over the threads, in blocks of SR_BLOCK (a multiple of 8: a block starts on a Philox
 * counter whatever the thread). */
void sr_round_bf16(const float* src, uint16_t* dst, int64_t n, uint64_t seed, uint64_t step,
                   int64_t offset) {
  const int64_t nblk = (n + SR_BLOCK - 1) / SR_BLOCK;
  const int par = PARALLEL(n);
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")
  for (int64_t q = 0; q < nblk; ++q) {
    const int64_t a = q * SR_BLOCK;
    sr_round_serial(src + a, dst + a, n - a < SR_BLOCK ? n - a : SR_BLOCK, seed, step, offset + a);
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
static void bf16_store(uint16_t* dst, const float* x, int64_t cnt, uint64_t seed, uint64_t step,
                       int64_t idx0, int stochastic) {
  if (stochastic) {
    sr_round_serial(x, dst, cnt, seed, step, idx0);
  } else {
    for (int64_t k = 0; k < cnt; ++k) dst[k] = bf16_nearest(x[k]);
  }
}

#define SR_ARGS uint64_t seed, uint64_t step, int64_t offset, int stochastic
#define CHUNKS(n) for (int64_t a = 0, cnt; a < (n) && ((cnt = ((n) - a < SR_CHUNK ? (n) - a : SR_CHUNK)), 1); a += SR_CHUNK)
/* the chunks of an element-wise loop over [0, n), split over the threads when n is large; the
 * body sees the chunk as [a, a + cnt) and has its own buffer x */
#define PAR_CHUNKS(n)                                                                         \
  const int64_t nchunk_ = ((n) + SR_CHUNK - 1) / SR_CHUNK;                                    \
  const int par_ = PARALLEL(n);                                                               \
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par_)")                \
  for (int64_t q_ = 0; q_ < nchunk_; ++q_)
#define CHUNK_BOUNDS(n)                                                                       \
  float x[SR_CHUNK];                                                                          \
  const int64_t a = q_ * SR_CHUNK, cnt = (n) - a < SR_CHUNK ? (n) - a : SR_CHUNK

/* Lion: c = fma(g, a1, m*b1);  p = fma(sign(c), -lr, p*decay);  m = fma(g, a2, m*b2). */
void lion_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, int64_t n, float lr, float decay,
               float b1, float b2, float a1, float a2, SR_ARGS) {
  PAR_CHUNKS(n) {
    CHUNK_BOUNDS(n);
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

/* SGD-SaI after its first step: m = fma(g, 1 - mu, m*mu);  p = p*decay - m*lr_gsnr. */
void sgd_sai_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, int64_t n, float decay, float mu,
                  float one_minus_mu, float lr_gsnr, SR_ARGS) {
  PAR_CHUNKS(n) {
    CHUNK_BOUNDS(n);
    _Pragma("omp simd")
    for (int64_t k = 0; k < cnt; ++k) {
      const float m = fmaf(bf16_load(G[a + k]), one_minus_mu, bf16_load(M[a + k]) * mu);
      M[a + k] = bf16_nearest(m);
      x[k] = bf16_load(P[a + k]) * decay - m * lr_gsnr;
    }
    bf16_store(P + a, x, cnt, seed, step, offset + a, stochastic);
  }
}

/* AdamW as torch's single-tensor reference: p *= decay;  m = lerp(m, g, w);
 * v = v*b2 + (a2*g)*g;  p += (-step_size*m) / (sqrt(v)/bc2 + eps). */
void adamw_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, uint16_t* V, int64_t n, float decay,
                float w, float w1, float b2, float a2, float neg_step, float bc2, float eps,
                SR_ARGS) {
  const int low = fabsf(w) < 0.5f;
  PAR_CHUNKS(n) {
    CHUNK_BOUNDS(n);
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

/* SAGE's update of rows [0, rows) of a [rows, n] matrix with its damping H [n] (fp32). */
void sage_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, const float* H, int64_t rows,
               int64_t n, float lr, float decay, float b1, float b2, float a1, float a2,
               int lion_order, SR_ARGS) {
  const int par = PARALLEL(rows * n) && rows > 1;
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")
  for (int64_t i = 0; i < rows; ++i) {
    float x[SR_CHUNK];
    uint16_t* p = P + i * n;
    const uint16_t* g_ = G + i * n;
    uint16_t* m_ = M + i * n;
    CHUNKS(n) {
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

/* col[j] += sum over rows of G_ij^2 (square) or |G_ij| for a bf16 G, in fp32 (blocks of 256
 * rows summed apart first, as column_sums_f32). */
int column_sums_bf16(const uint16_t* G, int64_t rows, int64_t n, float* col, int square) {
  const int64_t nb = (rows + 255) / 256;
  float* blks = (float*)malloc(sizeof(float) * (nb > 0 ? nb : 1) * n);
  if (!blks) return 1;
  const int par = PARALLEL(rows * n) && nb > 1;
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * 256, i1 = i0 + 256 < rows ? i0 + 256 : rows;
    float* blk = blks + b * n;
    for (int64_t j = 0; j < n; ++j) blk[j] = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const uint16_t* g = G + i * n;
      if (square) {
        _Pragma("omp simd")
        for (int64_t j = 0; j < n; ++j) { const float v = bf16_load(g[j]); blk[j] += v * v; }
      } else {
        _Pragma("omp simd")
        for (int64_t j = 0; j < n; ++j) blk[j] += fabsf(bf16_load(g[j]));
      }
    }
  }
  for (int64_t b = 0; b < nb; ++b) {
    const float* blk = blks + b * n;
    _Pragma("omp simd")
    for (int64_t j = 0; j < n; ++j) col[j] += blk[j];
  }
  free(blks);
  return 0;
}

/* SCALE, row-normalized, over rows [0, rows): with momentum m = fma(g, 1-beta, m*beta) (rounded
 * to bf16 in place, the update reads the fp32 value), u = m, else u = g; then
 * p = p*decay - u * (lr / max(rms(u row), eps)). */
int scale_rows_bf16(uint16_t* P, const uint16_t* G, uint16_t* M, int64_t rows, int64_t n,
                    float lr, float decay, float eps, float beta, float one_minus_beta, SR_ARGS) {
  const int par = PARALLEL(rows * n) && rows > 1;
  int failed = 0;
  _Pragma("omp parallel num_threads(g_threads) if(par)")
  {
    float* u = (float*)malloc(sizeof(float) * (n > 0 ? n : 1)); /* this thread's row of u */
    if (!u) {
      _Pragma("omp atomic write")
      failed = 1;
    }
    _Pragma("omp for schedule(static)")
    for (int64_t i = 0; i < rows; ++i) {
      if (!u) continue;
      float x[SR_CHUNK];
      uint16_t* p = P + i * n;
      const uint16_t* g = G + i * n;
      float ss = 0;
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
      CHUNKS(n) {
        _Pragma("omp simd")
        for (int64_t k = 0; k < cnt; ++k) x[k] = bf16_load(p[a + k]) * decay - u[a + k] * s;
        bf16_store(p + a, x, cnt, seed, step, offset + i * n + a, stochastic);
      }
    }
    free(u);
  }
  return failed;
}

/* p = p*decay - u * step[j] over rows [0, rows) for a bf16 u (a column-normalized matrix). */
void scale_cols_bf16(uint16_t* P, const uint16_t* U, int64_t rows, int64_t n, const float* st,
                     float decay, SR_ARGS) {
  const int par = PARALLEL(rows * n) && rows > 1;
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")
  for (int64_t i = 0; i < rows; ++i) {
    float x[SR_CHUNK];
    uint16_t* p = P + i * n;
    const uint16_t* u = U + i * n;
    CHUNKS(n) {
      _Pragma("omp simd")
      for (int64_t k = 0; k < cnt; ++k)
        x[k] = bf16_load(p[a + k]) * decay - bf16_load(u[a + k]) * st[a + k];
      bf16_store(p + a, x, cnt, seed, step, offset + i * n + a, stochastic);
    }
  }
}

/* SinkGD on a bf16 gradient: one sweep over rows [0, rows) as sinkgd_pass_f32 (r, c2, col in
 * fp32), and the update p = p*decay - lr * ((g * r_i) * c_j) of rows [0, rows). */
static void sinkgd_pass_bf16(const uint16_t* G, int64_t rows, int64_t n, const float* c2,
                             float* r, float* col, float target, float eps) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* g = G + i * n;
    float q = 0;
    _Pragma("omp simd reduction(+:q)")
    for (int64_t j = 0; j < n; ++j) { const float v = bf16_load(g[j]); q += v * v * c2[j]; }
    rescale_row_f32(r + i, q, target, eps);
    const float w = r[i] * r[i];
    _Pragma("omp simd")
    for (int64_t j = 0; j < n; ++j) { const float v = bf16_load(g[j]); col[j] += w * (v * v); }
  }
}

void sinkgd_apply_bf16(const uint16_t* G, uint16_t* P, int64_t rows, int64_t n, const float* r,
                       const float* c, float lr, float decay, SR_ARGS) {
  const int par = PARALLEL(rows * n) && rows > 1;
  _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")
  for (int64_t i = 0; i < rows; ++i) {
    float x[SR_CHUNK];
    const uint16_t* g = G + i * n;
    uint16_t* p = P + i * n;
    const float ri = r[i];
    CHUNKS(n) {
      _Pragma("omp simd")
      for (int64_t k = 0; k < cnt; ++k)
        x[k] = bf16_load(p[a + k]) * decay - lr * ((bf16_load(g[a + k]) * ri) * c[a + k]);
      bf16_store(p + a, x, cnt, seed, step, offset + i * n + a, stochastic);
    }
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
  const int par = PARALLEL(m * n) && nb > 1;
  for (int64_t i = 0; i < m; ++i) r[i] = 1;
  for (int64_t j = 0; j < n; ++j) c[j] = 1;
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t j = 0; j < n; ++j) c2[j] = c[j] * c[j];
    _Pragma("omp parallel for schedule(static) num_threads(g_threads) if(par)")
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t a = b * SINK_ROWS, e = a + SINK_ROWS < m ? a + SINK_ROWS : m;
      float* col = parts + b * n;
      memset(col, 0, sizeof(float) * n);
      sinkgd_pass_bf16(G + a * n, e - a, n, c2, r + a, col, sn, eps);
    }
    for (int64_t b = 1; b < nb; ++b) {
      const float* part = parts + b * n;
      _Pragma("omp simd")
      for (int64_t j = 0; j < n; ++j) parts[j] += part[j];
    }
    sinkgd_columns_f32(n, parts, c, sm, eps);
  }
  sinkgd_apply_bf16(G, P, m, n, r, c, lr, decay, seed, step, offset, stochastic);
  free(r); free(buf);
  return 0;
}
