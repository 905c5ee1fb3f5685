/* slimopt's native CPU loops: the fused CPU tier of the update rules.
 *
 * Built once per source version by slimopt/kernels/cpu.py with the system C compiler and
 * loaded through ctypes; every entry point exists in a float (f32) and a double (f64) version.
 * Each loop mirrors the arithmetic order of its rule's reference (slimopt/algorithms/<rule>.py),
 * including its handling of zero rows and of NaN and Inf.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* Counter-based stochastic rounding of float32 to bf16 (docs/algorithms.md, "Lean modes"): the
 * rounding integer of element i (its index in the whole tensor) is a 16-bit half of Philox4x32-10
 * with key (seed lo, seed hi) and counter (i/8 lo, i/8 hi, step, 0): element i takes half i%2 (low
 * first) of word (i%8)/2. Philox runs on PHILOX_BATCH counters at a time, each round a loop the
 * compiler vectorises (32x32->64 multiplies), so the bits cost little next to the memory traffic.
 * Finite values get the integer added to their bit pattern before the low 16 bits are cleared;
 * infinities keep their pattern and a NaN stays a quiet NaN. Same bits as slimopt.rounding. */
#define PHILOX_BATCH 64
static void philox_batch(uint64_t j0, int64_t nb, uint32_t step, uint32_t w3, uint32_t k0,
                         uint32_t k1, uint32_t out[4][PHILOX_BATCH]) {
  uint32_t c0[PHILOX_BATCH], c1[PHILOX_BATCH], c2[PHILOX_BATCH], c3[PHILOX_BATCH];
  for (int64_t b = 0; b < nb; ++b) {
    const uint64_t j = j0 + (uint64_t)b;
    c0[b] = (uint32_t)j; c1[b] = (uint32_t)(j >> 32); c2[b] = step; c3[b] = w3;
  }
  for (int r = 0; r < 10; ++r) {
    _Pragma("omp simd")
    for (int64_t b = 0; b < nb; ++b) {
      const uint64_t p0 = (uint64_t)0xD2511F53u * c0[b];
      const uint64_t p1 = (uint64_t)0xCD9E8D57u * c2[b];
      const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[b] ^ k0;
      const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[b] ^ k1;
      c1[b] = (uint32_t)p1; c3[b] = (uint32_t)p0; c0[b] = n0; c2[b] = n2;
    }
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  for (int64_t b = 0; b < nb; ++b) {
    out[0][b] = c0[b]; out[1][b] = c1[b]; out[2][b] = c2[b]; out[3][b] = c3[b];
  }
}

/* The four output words of one Philox4x32-10 call (for the known-answer tests). */
void philox4x32_10(const uint32_t* ctr, const uint32_t* key, uint32_t* out) {
  uint32_t words[4][PHILOX_BATCH];
  const uint64_t j = (uint64_t)ctr[0] | ((uint64_t)ctr[1] << 32);
  philox_batch(j, 1, ctr[2], ctr[3], key[0], key[1], words);
  for (int w = 0; w < 4; ++w) out[w] = words[w][0];
}

static inline uint16_t sr_one(float x, uint32_t r) {
  uint32_t bits;
  memcpy(&bits, &x, 4);
  if (!isfinite(x)) return (uint16_t)((bits >> 16) | (isnan(x) ? 0x40u : 0u));
  return (uint16_t)((bits + r) >> 16);
}

/* dst[k] = stochastic round of src[k], k in [0, n), for global element indices offset + k. */
void sr_round_bf16(const float* src, uint16_t* dst, int64_t n, uint64_t seed, uint64_t step,
                   int64_t offset) {
  uint32_t words[4][PHILOX_BATCH];
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32), s = (uint32_t)step;
  int64_t i = offset;
  const int64_t end = offset + n;
  while (i < end) {
    const uint64_t j0 = (uint64_t)i >> 3;
    const uint64_t j_end = ((uint64_t)(end - 1) >> 3) + 1;
    const int64_t nb = (int64_t)((j_end - j0) < PHILOX_BATCH ? (j_end - j0) : PHILOX_BATCH);
    philox_batch(j0, nb, s, 0, k0, k1, words);
    const int64_t stop = (int64_t)((j0 + (uint64_t)nb) << 3) < end ? (int64_t)((j0 + (uint64_t)nb) << 3) : end;
    for (; i < stop; ++i) {
      const int64_t e = i - (int64_t)(j0 << 3);
      const uint32_t w = words[(e & 7) >> 1][e >> 3];
      const uint32_t r = (e & 1) ? (w >> 16) : (w & 0xFFFFu);
      dst[i - offset] = sr_one(src[i - offset], r);
    }
  }
}
