/* Fused ghost-normalization kernels for the CPU, compiled on first use by fxghost/backends/cpu.py.
 *
 * A grouped tensor is dense, element (g, a, c, s) at ((g * A + a) * C + c) * S + s: S == 1 for
 * tabular (G, rows, C) and channels-last inputs (A = samples x positions), S = spatial positions
 * for contiguous NCHW-like inputs (A = samples). Either way, the values of channels [c0, c1) of
 * one row a are the contiguous segment x[(g*A + a)*C*S + c0*S ... + c1*S): every pass below walks
 * such segments row after row and works on whole segments, so its inner loops are unit-stride
 * vector loops over independent elements whatever S is.
 *
 * Statistics are per (group, channel) and two-pass (mean, then the centred sum of squares), so
 * they stay accurate when |mean| >> std. Work goes in blocks of rows and channels that stay in
 * L2 cache between passes: when a group's block fits, x streams from memory once per step; when
 * it does not, blocks are merged with Chan's formula. Column sums run in the input type over at
 * most RUN_ROWS rows and are carried in double beyond that.
 * Each call handles the groups [g0, g1) and channels [c0, c1), so that the caller can split work
 * between threads. Outputs of STREAM_MIN_BYTES or more are written with non-temporal stores where
 * the compiler targets AVX. The backward also totals its per-group sums into the weight and bias
 * gradients, and fxg_running applies the closed-form running-statistics update, so that eager
 * Python makes one call where it would make a dozen small torch ops.
 *
 * Each kernel exists per input type T: float (_f32), double (_f64), bfloat16 (_bf16) and float16
 * (_f16), the 16-bit types as their bits in a uint16_t. Inputs and outputs are read and
 * written in T; everything else (weight, bias, statistics, gradients of the parameters, running
 * statistics, accumulators) is in F, T itself for float and double and float for the 16-bit types,
 * as torch computes 16-bit BatchNorm. LD converts an element of T to F, ST rounds F to T (to
 * nearest even, as torch does).
 *
 * The forward can end with an epilogue, y = relu(bn(x) + r) or relu(bn(x)): the ReLU and residual
 * add that follow most BatchNorms, in the same pass over the data. It rounds bn(x) to T before
 * the add, as the unfused ops do, so that the results are the same bit for bit. Its backward
 * takes the output y and passes the incoming gradient where y > 0, as ReLU's own backward does
 * (y is what an unfused ReLU saves, so nothing more is kept alive), and writes the residual's
 * gradient (the masked incoming gradient) when asked.
 *
 * Plain C without torch headers: it compiles in about a second. No -ffast-math (that would break
 * NaN propagation); restrict-qualified pointers let the compiler vectorize without alias checks.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#ifndef T
/* Working set that stays in a core's L2 cache between passes. */
#define BLOCK_BYTES (128 * 1024)
/* Rows summed in the input type before the sums are carried into double. */
#define RUN_ROWS 64
/* Shortest segment worth a vector loop, in elements: below it, blocks grow past BLOCK_BYTES. */
#define MIN_SEGMENT 512
/* Outputs (y, dx) of at least this many bytes are written with non-temporal stores. An output
   this much larger than a core's L2 is out of cache by the time the next op reads it, so a normal
   store only adds a read of every line before it is overwritten: measured 25-30% faster for
   16 MB outputs on an AMD EPYC VM, and neutral to slightly slower for 4 MB ones. */
#ifndef STREAM_MIN_BYTES
#define STREAM_MIN_BYTES (8 << 20)
#endif
/* The loops over a row's segment: kept out of line, so that the compiler vectorizes each
   against its own restrict-qualified arguments whatever it inlines into its callers (inlined,
   the float16 conversions were left scalar). A call per row costs nothing next to a segment. */
#if defined(__GNUC__)
#define ROW_FN static __attribute__((noinline))
#else
#define ROW_FN static
#endif
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define NAME(f) CAT(f, SFX)
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* Built with -fopenmp, this links libgomp.so.1, and the dynamic linker resolves that to the copy
   torch has already loaded: the kernels share torch's OpenMP threads instead of competing with
   them. Without OpenMP the pragmas are ignored and the kernels run on one thread. */
static int64_t split_parts(int64_t G, int64_t C, int64_t nthreads) {
    int64_t parts = nthreads < 1 ? 1 : nthreads;
    if (G < parts) parts = G * C < parts ? G * C : parts;
    return parts < 1 ? 1 : parts;
}

/* Part t of parts: groups [r0, r1) and channels [r2, r3). */
static void split_range(int64_t t, int64_t parts, int64_t G, int64_t C, int64_t *r) {
    if (G >= parts) {
        r[0] = G * t / parts, r[1] = G * (t + 1) / parts, r[2] = 0, r[3] = C;
    } else { /* fewer groups than parts: G == 1 in practice (a tail group, or eval) */
        r[0] = 0, r[1] = G, r[2] = C * t / parts, r[3] = C * (t + 1) / parts;
    }
}

/* Channels per block: a group's rows of the block take at most `budget` bytes, unless that
   leaves segments shorter than MIN_SEGMENT elements. */
static int64_t channel_block(int64_t A, int64_t S, int64_t nc, int64_t elem, int64_t budget) {
    int64_t nb = budget / (A * S * elem);
    nb = MAX(nb, (MIN_SEGMENT + S - 1) / S);
    return MAX(1, MIN(nb, nc));
}

/* Rows per block, for segments of len elements in `streams` arrays. */
static int64_t row_block(int64_t len, int64_t elem, int64_t streams) {
    return MAX(1, BLOCK_BYTES / (len * elem * streams));
}

/* bfloat16 from and to its bits, as c10::BFloat16 converts (NaN becomes the quiet NaN 0x7FC0). */
static inline float bf16_ld(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_st(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7FC0u : r);
}

/* float16 from and to its bits, exactly as c10::Half converts (all 65536 values, and rounding
   to nearest even, checked against torch). Selects, not branches, so that loops over them
   vectorize (with -fno-trapping-math, which lets the compiler compute every arm). */
static inline float f16_ld(uint16_t h) {
    uint32_t em = (uint32_t)h & 0x7FFFu, e = em & 0x7C00u, s = ((uint32_t)h & 0x8000u) << 16;
    uint32_t normal = (em << 13) + ((uint32_t)(127 - 15) << 23);
    uint32_t special = (em << 13) | 0x7F800000u; /* infinities and NaNs */
    float sub = (float)(em & 0x3FFu) * 0x1p-24f; /* subnormals, exactly, without float denormals */
    uint32_t sub_bits, u;
    memcpy(&sub_bits, &sub, sizeof sub_bits);
    u = (e == 0 ? sub_bits : e == 0x7C00u ? special : normal) | s;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f16_st(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7FFFFFFFu;
    uint32_t big = u > 0x7F800000u ? 0x7E00u : 0x7C00u; /* NaN, or too large: infinity */
    /* Below half's normal range: adding 0.5 (whose ulp, 2^-24, is half's subnormal step) rounds
       to nearest even, leaving the half's bits in the low mantissa. */
    float a, t;
    memcpy(&a, &u, sizeof a);
    t = a + 0.5f;
    uint32_t t_bits;
    memcpy(&t_bits, &t, sizeof t_bits);
    uint32_t sub = t_bits - 0x3F000000u;
    uint32_t norm = (u + ((uint32_t)(15 - 127) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
    uint32_t o = u >= 0x47800000u ? big : u < 0x38800000u ? sub : norm;
    return (uint16_t)(o | sign);
}

#define T float
#define F float
#define SFX f32
#define LD(v) (v)
#define ST(v) (v)
#ifdef __AVX__
#define VEC __m256
#define VLEN 8
#define VLOAD _mm256_loadu_ps
#define VADD _mm256_add_ps
#define VSUB _mm256_sub_ps
#define VMUL _mm256_mul_ps
#define VSTREAM _mm256_stream_ps
#endif
#include "cpu_kernels.c" /* itself, once per type; it ends by undefining T and the other macros */

#define T double
#define F double
#define SFX f64
#define LD(v) (v)
#define ST(v) (v)
#ifdef __AVX__
#define VEC __m256d
#define VLEN 4
#define VLOAD _mm256_loadu_pd
#define VADD _mm256_add_pd
#define VSUB _mm256_sub_pd
#define VMUL _mm256_mul_pd
#define VSTREAM _mm256_stream_pd
#endif
#include "cpu_kernels.c"

#define T uint16_t
#define F float
#define SFX bf16
#define LD(v) bf16_ld(v)
#define ST(v) bf16_st(v)
#include "cpu_kernels.c"

#if defined(__F16C__) && defined(__AVX__)
/* float16 rows staged through float with the F16C conversions, when the compiler targets them:
   GCC does not vectorize conversions of _Float16, and the software conversions above, though
   vectorized, cost more than the arithmetic (2.5x plain BatchNorm's time on a conv layer). A
   tile of each input row goes to a float buffer, the float32 row function runs on it, and its
   outputs are rounded back. The float32 functions compute in float, as the float16 ones do, in
   the same order (rows go in groups of 4, which the 4-row and 2-row groupings of the column sums
   keep), and F16C converts exactly and rounds to nearest even: the results are the software
   path's bit for bit, NaNs aside (F16C keeps a NaN's payload). */
#define STAGE 256
#define STAGE_ROWS 4
#define F16_RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

static inline void f16_stage(const uint16_t *restrict h, float *restrict f, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(f + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + j))));
    for (; j < n; j++) f[j] = _cvtsh_ss(h[j]);
}

static inline void f16_unstage(const float *restrict f, uint16_t *restrict h, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(h + j), _mm256_cvtps_ph(_mm256_loadu_ps(f + j), F16_RNE));
    for (; j < n; j++) h[j] = _cvtss_sh(f[j], F16_RNE);
}

/* Elements [j, j + n) of `rows` rows ld apart, to rows STAGE apart. */
static inline void f16_stage_rows(const uint16_t *x, int64_t ld, int64_t rows, int64_t n,
                                  float *restrict f) {
    for (int64_t r = 0; r < rows; r++) f16_stage(x + r * ld, f + r * STAGE, n);
}

ROW_FN void col_sum_f16(const uint16_t *restrict x, int64_t ld, int64_t n, int64_t len,
                        float *restrict acc) {
    float bx[STAGE_ROWS * STAGE];
    for (int64_t r = 0; r < n; r += STAGE_ROWS)
        for (int64_t j = 0; j < len; j += STAGE) {
            int64_t rows = MIN(STAGE_ROWS, n - r), tl = MIN(STAGE, len - j);
            f16_stage_rows(x + r * ld + j, ld, rows, tl, bx);
            col_sum_f32(bx, STAGE, rows, tl, acc + j);
        }
}

ROW_FN void col_sq_f16(const uint16_t *restrict x, int64_t ld, int64_t n, int64_t len,
                       const float *restrict cen, float *restrict acc) {
    float bx[STAGE_ROWS * STAGE];
    for (int64_t r = 0; r < n; r += STAGE_ROWS)
        for (int64_t j = 0; j < len; j += STAGE) {
            int64_t rows = MIN(STAGE_ROWS, n - r), tl = MIN(STAGE, len - j);
            f16_stage_rows(x + r * ld + j, ld, rows, tl, bx);
            col_sq_f32(bx, STAGE, rows, tl, cen + j, acc + j);
        }
}

ROW_FN void col_dy_f16(const uint16_t *restrict dy, const uint16_t *restrict m,
                       const uint16_t *restrict x, int64_t ld, int64_t n, int64_t len,
                       const float *restrict cen, float *restrict a0, float *restrict a1) {
    float bd[STAGE_ROWS * STAGE], bm[STAGE_ROWS * STAGE], bx[STAGE_ROWS * STAGE];
    for (int64_t r = 0; r < n; r += STAGE_ROWS)
        for (int64_t j = 0; j < len; j += STAGE) {
            int64_t rows = MIN(STAGE_ROWS, n - r), tl = MIN(STAGE, len - j), o = r * ld + j;
            f16_stage_rows(dy + o, ld, rows, tl, bd);
            if (m) f16_stage_rows(m + o, ld, rows, tl, bm);
            f16_stage_rows(x + o, ld, rows, tl, bx);
            col_dy_f32(bd, m ? bm : NULL, bx, STAGE, rows, tl, cen + j, a0 + j, a1 + j);
        }
}

ROW_FN void norm_row_f16(const uint16_t *restrict p, const float *restrict cen,
                         const float *restrict k, const float *restrict h, uint16_t *restrict q,
                         int64_t len, int nt) {
    float bp[STAGE], bq[STAGE];
    (void)nt;
    for (int64_t j = 0; j < len; j += STAGE) {
        int64_t tl = MIN(STAGE, len - j);
        f16_stage(p + j, bp, tl);
        norm_row_f32(bp, cen + j, k + j, h + j, bq, tl, 0);
        f16_unstage(bq, q + j, tl);
    }
}

/* Rounds each of v[0, n) to float16 and back. */
static inline void f16_round(float *restrict v, uint16_t *restrict tmp, int64_t n) {
    f16_unstage(v, tmp, n);
    f16_stage(tmp, v, n);
}

ROW_FN void norm_row_epilogue_f16(const uint16_t *restrict p, const uint16_t *restrict r,
                                  const float *restrict cen, const float *restrict k,
                                  const float *restrict h, uint16_t *restrict q, int64_t len) {
    float bp[STAGE], bq[STAGE];
    uint16_t bh[STAGE];
    for (int64_t j = 0; j < len; j += STAGE) {
        int64_t tl = MIN(STAGE, len - j);
        f16_stage(p + j, bp, tl);
        norm_row_f32(bp, cen + j, k + j, h + j, bq, tl, 0);
        f16_round(bq, bh, tl); /* bn(x) in float16, as the unfused ops have it */
        if (r) {
            f16_stage(r + j, bp, tl);
            for (int64_t i = 0; i < tl; i++) bq[i] += bp[i];
            f16_round(bq, bh, tl);
        }
        for (int64_t i = 0; i < tl; i++) bq[i] = bq[i] < 0 ? 0.0f : bq[i];
        f16_unstage(bq, q + j, tl);
    }
}

ROW_FN void grad_row_f16(const uint16_t *restrict d, const uint16_t *restrict p,
                         const float *restrict cen, const float *restrict k,
                         const float *restrict kb, const float *restrict kc,
                         uint16_t *restrict q, int64_t len, int nt) {
    float bd[STAGE], bp[STAGE], bq[STAGE];
    (void)nt;
    for (int64_t j = 0; j < len; j += STAGE) {
        int64_t tl = MIN(STAGE, len - j);
        f16_stage(d + j, bd, tl);
        f16_stage(p + j, bp, tl);
        grad_row_f32(bd, bp, cen + j, k + j, kb + j, kc + j, bq, tl, 0);
        f16_unstage(bq, q + j, tl);
    }
}

/* q may be d, as in the other types' grad_row_masked: a tile of d is staged before q's is
   written. */
ROW_FN void grad_row_masked_f16(const uint16_t *d, const uint16_t *restrict m,
                                const uint16_t *restrict p, const float *restrict cen,
                                const float *restrict k, const float *restrict kb,
                                const float *restrict kc, uint16_t *q, uint16_t *restrict dr,
                                int64_t len) {
    float bd[STAGE], bm[STAGE], bp[STAGE], bq[STAGE], br[STAGE];
    for (int64_t j = 0; j < len; j += STAGE) {
        int64_t tl = MIN(STAGE, len - j);
        f16_stage(d + j, bd, tl);
        f16_stage(m + j, bm, tl);
        f16_stage(p + j, bp, tl);
        grad_row_masked_f32(bd, bm, bp, cen + j, k + j, kb + j, kc + j, bq, dr ? br : NULL, tl);
        f16_unstage(bq, q + j, tl);
        if (dr) f16_unstage(br, dr + j, tl);
    }
}

ROW_FN void grad_row_inplace_f16(uint16_t *d, const uint16_t *restrict p,
                                 const float *restrict cen, const float *restrict k,
                                 const float *restrict kb, const float *restrict kc, int64_t len) {
    float bd[STAGE], bp[STAGE];
    for (int64_t j = 0; j < len; j += STAGE) {
        int64_t tl = MIN(STAGE, len - j);
        f16_stage(d + j, bd, tl);
        f16_stage(p + j, bp, tl);
        grad_row_inplace_f32(bd, bp, cen + j, k + j, kb + j, kc + j, tl);
        f16_unstage(bd, d + j, tl);
    }
}
#define STAGED_ROWS
#endif

#define T uint16_t
#define F float
#define SFX f16
#define LD(v) f16_ld(v)
#define ST(v) f16_st(v)
#include "cpu_kernels.c"

#else

/* The incoming gradient of element j of a row: dy, or with a ReLU epilogue (m, its output, not
   NULL) 0 where the output is <= 0, as ReLU's backward (threshold_backward) has it: a NaN output
   passes its gradient. */
static inline F NAME(grad)(T d, T m) {
    F v = LD(d); /* loaded whatever the mask says, so that the select vectorizes */
    return LD(m) <= 0 ? (F)0 : v;
}
#define GRAD(dy, m, j) NAME(grad)((dy)[j], (m)[j])

#ifndef STAGED_ROWS /* else defined before this file was included */
/* acc[j] += x[r * ld + j] over n rows; four rows per load and store of the accumulators. */
ROW_FN void NAME(col_sum)(const T *restrict x, int64_t ld, int64_t n, int64_t len,
                          F *restrict acc) {
    int64_t r = 0;
    for (; r + 4 <= n; r += 4, x += 4 * ld)
        for (int64_t j = 0; j < len; j++)
            acc[j] += (LD(x[j]) + LD(x[j + ld])) + (LD(x[j + 2 * ld]) + LD(x[j + 3 * ld]));
    for (; r < n; r++, x += ld)
        for (int64_t j = 0; j < len; j++) acc[j] += LD(x[j]);
}

/* acc[j] += (x[r * ld + j] - cen[j])^2 over n rows. */
ROW_FN void NAME(col_sq)(const T *restrict x, int64_t ld, int64_t n, int64_t len,
                         const F *restrict cen, F *restrict acc) {
    int64_t r = 0;
    for (; r + 4 <= n; r += 4, x += 4 * ld)
        for (int64_t j = 0; j < len; j++) {
            F d0 = LD(x[j]) - cen[j], d1 = LD(x[j + ld]) - cen[j];
            F d2 = LD(x[j + 2 * ld]) - cen[j], d3 = LD(x[j + 3 * ld]) - cen[j];
            acc[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
    for (; r < n; r++, x += ld)
        for (int64_t j = 0; j < len; j++) {
            F d = LD(x[j]) - cen[j];
            acc[j] += d * d;
        }
}

/* a0[j] += g[r * ld + j] and a1[j] += g[r * ld + j] * (x[r * ld + j] - cen[j]) over n rows,
   g the incoming gradient (GRAD). m and dy are read at the same offsets. */
ROW_FN void NAME(col_dy)(const T *restrict dy, const T *restrict m, const T *restrict x,
                         int64_t ld, int64_t n, int64_t len, const F *restrict cen,
                         F *restrict a0, F *restrict a1) {
    int64_t r = 0;
    if (m) { /* summed in the same order as below, so that the sums are those of unfused ops */
        for (; r + 2 <= n; r += 2, x += 2 * ld, dy += 2 * ld, m += 2 * ld)
            for (int64_t j = 0; j < len; j++) {
                F g0 = GRAD(dy, m, j), g1 = GRAD(dy, m, j + ld);
                a0[j] += g0 + g1;
                a1[j] += g0 * (LD(x[j]) - cen[j]) + g1 * (LD(x[j + ld]) - cen[j]);
            }
        for (; r < n; r++, x += ld, dy += ld, m += ld)
            for (int64_t j = 0; j < len; j++) {
                F g = GRAD(dy, m, j);
                a0[j] += g;
                a1[j] += g * (LD(x[j]) - cen[j]);
            }
        return;
    }
    for (; r + 2 <= n; r += 2, x += 2 * ld, dy += 2 * ld)
        for (int64_t j = 0; j < len; j++) {
            a0[j] += LD(dy[j]) + LD(dy[j + ld]);
            a1[j] += LD(dy[j]) * (LD(x[j]) - cen[j]) + LD(dy[j + ld]) * (LD(x[j + ld]) - cen[j]);
        }
    for (; r < n; r++, x += ld, dy += ld)
        for (int64_t j = 0; j < len; j++) {
            a0[j] += LD(dy[j]);
            a1[j] += LD(dy[j]) * (LD(x[j]) - cen[j]);
        }
}

#endif

/* out[c] += sum of acc[c * S ... c * S + S) in double, and acc is zeroed. */
static void NAME(carry)(F *restrict acc, int64_t nb, int64_t S, double *restrict out) {
    if (S == 1) {
        for (int64_t c = 0; c < nb; c++) out[c] += (double)acc[c];
    } else {
        for (int64_t c = 0; c < nb; c++) {
            double s = 0;
            for (int64_t i = 0; i < S; i++) s += (double)acc[c * S + i];
            out[c] += s;
        }
    }
    for (int64_t j = 0; j < nb * S; j++) acc[j] = 0;
}

/* Per-channel values v laid out as one segment: row[c * S + i] = v[c]; v itself when S == 1. */
static const F *NAME(expand)(const F *v, int64_t nb, int64_t S, F *restrict row) {
    if (S == 1) return v;
    for (int64_t c = 0; c < nb; c++)
        for (int64_t i = 0; i < S; i++) row[c * S + i] = v[c];
    return row;
}

#ifdef VEC
/* Leading elements of q before a 32-byte boundary (all of len when streaming is off): the
   stores after them may be non-temporal. */
static int64_t NAME(stream_head)(const T *q, int64_t len, int nt) {
    if (nt) {
        int64_t head = (int64_t)((32 - ((uintptr_t)q & 31)) & 31) / (int64_t)sizeof(T);
        if ((uintptr_t)q % sizeof(T) == 0 && head + VLEN <= len) return head;
    }
    return len;
}
#endif

#ifndef STAGED_ROWS
/* q[j] = (p[j] - cen[j]) * k[j] + h[j] */
ROW_FN void NAME(norm_row)(const T *restrict p, const F *restrict cen, const F *restrict k,
                           const F *restrict h, T *restrict q, int64_t len, int nt) {
#ifdef VEC
    int64_t j = NAME(stream_head)(q, len, nt);
    for (int64_t i = 0; i < j; i++) q[i] = (p[i] - cen[i]) * k[i] + h[i];
    for (; j + VLEN <= len; j += VLEN) {
        VEC v = VMUL(VSUB(VLOAD(p + j), VLOAD(cen + j)), VLOAD(k + j));
        VSTREAM(q + j, VADD(v, VLOAD(h + j)));
    }
    for (; j < len; j++) q[j] = (p[j] - cen[j]) * k[j] + h[j];
#else /* one plain loop, which the compiler vectorizes with the conversions */
    (void)nt;
    for (int64_t j = 0; j < len; j++) q[j] = ST((LD(p[j]) - cen[j]) * k[j] + h[j]);
#endif
}

/* norm_row with the epilogue: q[j] = relu(bn + r[j]) (relu(bn) where r is NULL), bn rounded to T
   before the add, as the unfused ops round it. */
ROW_FN void NAME(norm_row_epilogue)(const T *restrict p, const T *restrict r,
                                    const F *restrict cen, const F *restrict k,
                                    const F *restrict h, T *restrict q, int64_t len) {
    if (r) {
        for (int64_t j = 0; j < len; j++) {
            F v = LD(ST(LD(ST((LD(p[j]) - cen[j]) * k[j] + h[j])) + LD(r[j])));
            q[j] = v < 0 ? ST((F)0) : ST(v);
        }
        return;
    }
    for (int64_t j = 0; j < len; j++) {
        F v = LD(ST((LD(p[j]) - cen[j]) * k[j] + h[j]));
        q[j] = v < 0 ? ST((F)0) : ST(v);
    }
}

/* q[j] = d[j] * k[j] + (p[j] - cen[j]) * kb[j] + kc[j] */
ROW_FN void NAME(grad_row)(const T *restrict d, const T *restrict p, const F *restrict cen,
                           const F *restrict k, const F *restrict kb, const F *restrict kc,
                           T *restrict q, int64_t len, int nt) {
#ifdef VEC
    int64_t j = NAME(stream_head)(q, len, nt);
    for (int64_t i = 0; i < j; i++) q[i] = d[i] * k[i] + (p[i] - cen[i]) * kb[i] + kc[i];
    for (; j + VLEN <= len; j += VLEN) {
        VEC v = VADD(VMUL(VLOAD(d + j), VLOAD(k + j)),
                     VMUL(VSUB(VLOAD(p + j), VLOAD(cen + j)), VLOAD(kb + j)));
        VSTREAM(q + j, VADD(v, VLOAD(kc + j)));
    }
    for (; j < len; j++) q[j] = d[j] * k[j] + (p[j] - cen[j]) * kb[j] + kc[j];
#else
    (void)nt;
    for (int64_t j = 0; j < len; j++)
        q[j] = ST(LD(d[j]) * k[j] + (LD(p[j]) - cen[j]) * kb[j] + kc[j]);
#endif
}

/* grad_row with the incoming gradient masked by the ReLU's output m (GRAD), and the masked
   gradient written to dr unless it is NULL (the residual's gradient). q may be d: each element
   is read before it is written. */
ROW_FN void NAME(grad_row_masked)(const T *d, const T *restrict m, const T *restrict p,
                                  const F *restrict cen, const F *restrict k,
                                  const F *restrict kb, const F *restrict kc, T *q,
                                  T *restrict dr, int64_t len) {
    if (dr) {
        for (int64_t j = 0; j < len; j++) {
            F g = GRAD(d, m, j);
            dr[j] = ST(g);
            q[j] = ST(g * k[j] + (LD(p[j]) - cen[j]) * kb[j] + kc[j]);
        }
        return;
    }
    for (int64_t j = 0; j < len; j++) {
        F g = GRAD(d, m, j);
        q[j] = ST(g * k[j] + (LD(p[j]) - cen[j]) * kb[j] + kc[j]);
    }
}

/* d[j] = d[j] * k[j] + (p[j] - cen[j]) * kb[j] + kc[j]: grad_row with dx written over dy, each
   element read before it is written. Plain stores: the lines were just read, so they are in
   cache and a store costs no extra read. */
ROW_FN void NAME(grad_row_inplace)(T *d, const T *restrict p, const F *restrict cen,
                                   const F *restrict k, const F *restrict kb,
                                   const F *restrict kc, int64_t len) {
    for (int64_t j = 0; j < len; j++)
        d[j] = ST(LD(d[j]) * k[j] + (LD(p[j]) - cen[j]) * kb[j] + kc[j]);
}
#endif

/* The per-channel results of a forward block, from its mean mu and centred sum of squares m2
   over `seen` values: mean, biased variance and rstd, and the coefficients of
   y = (x - cen) * k + h. Its own function so that restrict-qualified pointers let the loop
   vectorize (with -fno-math-errno for sqrt): with small ghost batches this per-channel work
   costs as much as the passes over the data. w and b may be NULL. */
static void NAME(forward_coefs)(int64_t nb, const double *restrict mu, const double *restrict m2,
                                double seen, double eps, const F *restrict w, const F *restrict b,
                                F *restrict cv, F *restrict kv, F *restrict hv,
                                F *restrict mean_out, F *restrict var_out, F *restrict rstd_out) {
    for (int64_t c = 0; c < nb; c++) {
        double var = m2[c] / seen;
        double rstd = 1.0 / sqrt(var + eps);
        kv[c] = (F)(w ? rstd * (double)w[c] : rstd);
        hv[c] = b ? b[c] : (F)0;
        cv[c] = (F)mu[c];
        mean_out[c] = (F)mu[c];
        var_out[c] = (F)var;
        rstd_out[c] = (F)rstd;
    }
}

/* The per-channel results of a backward block from its sums of dy and dy * (x - mean) over n
   values: the group's sum(dy) and sum(dy * xhat), and the coefficients of
   dx = dy * k + (x - mean) * kb + kc. Its own function for the same reason. w may be NULL. */
static void NAME(backward_coefs)(int64_t nb, const double *restrict sdy,
                                 const double *restrict sdx, double n, const F *restrict rstd,
                                 const F *restrict w, double *restrict sum_dy_out,
                                 double *restrict sum_dy_xhat_out, F *restrict kv,
                                 F *restrict kbv, F *restrict kcv) {
    for (int64_t c = 0; c < nb; c++) {
        double r = (double)rstd[c];
        double sdxh = sdx[c] * r;
        double kk = w ? r * (double)w[c] : r;
        sum_dy_out[c] = sdy[c];
        sum_dy_xhat_out[c] = sdxh;
        kv[c] = (F)kk;
        kbv[c] = (F)(-kk * r * sdxh / n);
        kcv[c] = (F)(-kk * sdy[c] / n);
    }
}

/* Per-thread scratch: 6 * nb doubles and 9 segments of len values of F. */
/* Laid out by the largest block (nb, len), whatever block uses it: a smaller last block must not
   move the arrays, or its temporaries would land in the next block's zeroed accumulators. */
typedef struct {
    double *d;
    F *t;
    int64_t nb, len;
    int nt; /* outputs written with non-temporal stores */
} NAME(scratch_t);

static int NAME(scratch)(int64_t nb, int64_t len, int nt, NAME(scratch_t) *s) {
    s->nb = nb, s->len = len, s->nt = nt;
    s->d = (double *)calloc((size_t)(6 * nb), sizeof(double));
    s->t = (F *)calloc((size_t)(9 * len), sizeof(F));
    if (s->d && s->t) return 1;
    free(s->d);
    free(s->t);
    return 0;
}

static void NAME(scratch_free)(NAME(scratch_t) *s) {
#ifdef VEC
    /* Non-temporal stores are weakly ordered: make them visible before the threads join. */
    if (s->nt) _mm_sfence();
#endif
    free(s->d);
    free(s->t);
}

/* Forward of channels [b0, b0 + nb) of one group: y = (x - mean) * (rstd * w) + b, centred
   first so that |mean| >> std loses no precision, then the epilogue when relu is set (with the
   residual res unless it is NULL); writes the group's mean, biased variance and rstd of these
   channels. */
static void NAME(forward_block)(const T *restrict x, const T *restrict res, T *restrict y,
                                const F *w, const F *b, F *mean_out, F *var_out, F *rstd_out,
                                int64_t A, int64_t C, int64_t S, double eps, int relu,
                                int64_t b0, int64_t nb, NAME(scratch_t) *s) {
    int64_t ld = C * S, len = nb * S;
    int64_t sn = s->nb, sl = s->len;
    double *mu = s->d, *m2 = mu + sn, *bsum = m2 + sn, *bsq = bsum + sn;
    F *acc = s->t, *cen_row = acc + sl, *k_row = cen_row + sl, *h_row = k_row + sl,
      *cv = h_row + sl, *kv = cv + sl, *hv = kv + sl;
    const F *cen;
    const T *xs = x + b0 * S;
    int64_t rb = row_block(len, sizeof(T), 1);
    double seen = 0;
    for (int64_t c = 0; c < nb; c++) mu[c] = m2[c] = 0;
    for (int64_t a0 = 0; a0 < A; a0 += rb) {
        int64_t a1 = MIN(A, a0 + rb);
        double cnt = (double)((a1 - a0) * S), tot = seen + cnt;
        for (int64_t c = 0; c < nb; c++) bsum[c] = bsq[c] = 0;
        for (int64_t r = a0; r < a1; r += RUN_ROWS) {
            NAME(col_sum)(xs + r * ld, ld, MIN(RUN_ROWS, a1 - r), len, acc);
            NAME(carry)(acc, nb, S, bsum);
        }
        /* Centred on the block mean rounded to F; the rounding shifts M2 by cnt * delta^2. */
        for (int64_t c = 0; c < nb; c++) cv[c] = (F)(bsum[c] / cnt);
        cen = NAME(expand)(cv, nb, S, cen_row);
        for (int64_t r = a0; r < a1; r += RUN_ROWS) {
            NAME(col_sq)(xs + r * ld, ld, MIN(RUN_ROWS, a1 - r), len, cen, acc);
            NAME(carry)(acc, nb, S, bsq);
        }
        for (int64_t c = 0; c < nb; c++) {
            double bm = bsum[c] / cnt, dr = (double)cv[c] - bm;
            double bm2 = bsq[c] - cnt * dr * dr;
            double delta = bm - mu[c];
            mu[c] += delta * (cnt / tot);
            m2[c] += bm2 + delta * delta * (seen * cnt / tot);
        }
        seen = tot;
    }
    NAME(forward_coefs)(nb, mu, m2, seen, eps, w ? w + b0 : NULL, b ? b + b0 : NULL, cv, kv, hv,
                        mean_out + b0, var_out + b0, rstd_out + b0);
    cen = NAME(expand)(cv, nb, S, cen_row);
    const F *kr = NAME(expand)(kv, nb, S, k_row), *hr = NAME(expand)(hv, nb, S, h_row);
    T *ys = y + b0 * S;
    if (relu) {
        const T *rs = res ? res + b0 * S : NULL;
        for (int64_t a = 0; a < A; a++)
            NAME(norm_row_epilogue)(xs + a * ld, rs ? rs + a * ld : NULL, cen, kr, hr,
                                    ys + a * ld, len);
        return;
    }
    for (int64_t a = 0; a < A; a++)
        NAME(norm_row)(xs + a * ld, cen, kr, hr, ys + a * ld, len, s->nt);
}

static int NAME(forward_range)(const T *x, const T *res, T *y, const F *w, const F *b,
                                F *mean_out, F *var_out, F *rstd_out, int64_t A, int64_t C,
                                int64_t S, double eps, int relu, int64_t g0, int64_t g1,
                                int64_t c0, int64_t c1, int nt) {
    int64_t nb = channel_block(A, S, c1 - c0, sizeof(T), BLOCK_BYTES);
    NAME(scratch_t) s;
    if (!NAME(scratch)(nb, nb * S, nt, &s)) return 1;
    for (int64_t g = g0; g < g1; g++) {
        int64_t off = g * A * C * S;
        for (int64_t b0 = c0; b0 < c1; b0 += nb)
            NAME(forward_block)(x + off, res ? res + off : NULL, y + off, w, b, mean_out + g * C,
                                var_out + g * C, rstd_out + g * C, A, C, S, eps, relu, b0,
                                MIN(nb, c1 - b0), &s);
    }
    NAME(scratch_free)(&s);
    return 0;
}

/* Backward of channels [b0, b0 + nb) of one group: the group's sum(g) and sum(g * xhat) of
   these channels, g the incoming gradient (dy, masked by the ReLU's output m unless m is NULL),
   and dx = k * (g - sum_g / n - xhat * sum_g_xhat / n), written as g * k + (x - mean) * kb + kc,
   unless dx is NULL; dx may be dy itself (then written over it). With m, g itself goes to dr
   unless it is NULL (the residual's gradient). */
static void NAME(backward_block)(const T *dy, const T *restrict m, const T *restrict x,
                                 const F *w, const F *mean, const F *rstd, T *dx, T *dr,
                                 double *sum_dy_out, double *sum_dy_xhat_out, int64_t A,
                                 int64_t C, int64_t S, int64_t b0, int64_t nb,
                                 NAME(scratch_t) *s) {
    int64_t ld = C * S, len = nb * S;
    int64_t sn = s->nb, sl = s->len;
    double *sdy = s->d, *sdx = sdy + sn, n = (double)(A * S);
    F *a0 = s->t, *a1 = a0 + sl, *rows = a1 + sl, *kv = rows + 4 * sl, *kbv = kv + sn,
      *kcv = kbv + sn;
    const T *xs = x + b0 * S, *dys = dy + b0 * S, *ms = m ? m + b0 * S : NULL;
    for (int64_t c = 0; c < nb; c++) sdy[c] = sdx[c] = 0;
    const F *cen = NAME(expand)(mean + b0, nb, S, rows);
    for (int64_t r = 0; r < A; r += RUN_ROWS) {
        NAME(col_dy)(dys + r * ld, ms ? ms + r * ld : NULL, xs + r * ld, ld,
                     MIN(RUN_ROWS, A - r), len, cen, a0, a1);
        NAME(carry)(a0, nb, S, sdy);
        NAME(carry)(a1, nb, S, sdx);
    }
    NAME(backward_coefs)(nb, sdy, sdx, n, rstd + b0, w ? w + b0 : NULL, sum_dy_out + b0,
                         sum_dy_xhat_out + b0, kv, kbv, kcv);
    if (!dx && !dr) return;
    const F *kr = NAME(expand)(kv, nb, S, rows + sl),
            *kbr = NAME(expand)(kbv, nb, S, rows + 2 * sl),
            *kcr = NAME(expand)(kcv, nb, S, rows + 3 * sl);
    T *dxs = dx ? dx + b0 * S : NULL, *drs = dr ? dr + b0 * S : NULL;
    if (ms) {
        for (int64_t a = 0; a < A; a++) {
            T *drow = drs ? drs + a * ld : NULL;
            if (dxs) {
                NAME(grad_row_masked)(dys + a * ld, ms + a * ld, xs + a * ld, cen, kr, kbr, kcr,
                                      dxs + a * ld, drow, len);
            } else { /* only the residual's gradient */
                for (int64_t j = 0; j < len; j++) drow[j] = ST(GRAD(dys + a * ld, ms + a * ld, j));
            }
        }
        return;
    }
    if (!dxs) return;
    if (dx == dy) { /* in place: this block's dy has been read (its sums) and is now spent */
        for (int64_t a = 0; a < A; a++)
            NAME(grad_row_inplace)(dxs + a * ld, xs + a * ld, cen, kr, kbr, kcr, len);
        return;
    }
    for (int64_t a = 0; a < A; a++)
        NAME(grad_row)(dys + a * ld, xs + a * ld, cen, kr, kbr, kcr, dxs + a * ld, len, s->nt);
}

static int NAME(backward_range)(const T *dy, const T *m, const T *x, const F *w, const F *mean,
                                 const F *rstd, T *dx, T *dr, double *sum_dy_out,
                                 double *sum_dy_xhat_out, int64_t A, int64_t C, int64_t S,
                                 int64_t g0, int64_t g1, int64_t c0, int64_t c1, int nt) {
    /* Two input streams share the cache (three with a ReLU's output). */
    int64_t nb = channel_block(A, S, c1 - c0, sizeof(T), BLOCK_BYTES / (m ? 3 : 2));
    NAME(scratch_t) s;
    if (!NAME(scratch)(nb, nb * S, nt, &s)) return 1;
    for (int64_t g = g0; g < g1; g++) {
        int64_t off = g * A * C * S;
        for (int64_t b0 = c0; b0 < c1; b0 += nb)
            NAME(backward_block)(dy + off, m ? m + off : NULL, x + off, w, mean + g * C,
                                 rstd + g * C, dx ? dx + off : NULL, dr ? dr + off : NULL,
                                 sum_dy_out + g * C, sum_dy_xhat_out + g * C, A, C, S, b0,
                                 MIN(nb, c1 - b0), &s);
    }
    NAME(scratch_free)(&s);
    return 0;
}

/* Whether a (G, A, C, S) output is large enough for non-temporal stores. */
static int NAME(streamed)(int64_t G, int64_t A, int64_t C, int64_t S) {
    return G * A * C * S * (int64_t)sizeof(T) >= STREAM_MIN_BYTES;
}

/* The exported entry points: G groups split between nthreads threads, by groups when there are
   enough of them, else by channels. They return 0, or 1 when scratch memory ran out.
   fxg_forward: with relu set, y = relu(bn(x) + res) (relu(bn(x)) where res is NULL), res laid
   out as x. */
int NAME(fxg_forward)(const T *x, const T *res, T *y, const F *w, const F *b, F *mean_out,
                       F *var_out, F *rstd_out, int64_t G, int64_t A, int64_t C, int64_t S,
                       double eps, int64_t relu, int64_t nthreads) {
    int64_t parts = split_parts(G, C, nthreads);
    int nt = NAME(streamed)(G, A, C, S), failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1) reduction(| : failed)
    for (int64_t t = 0; t < parts; t++) {
        int64_t r[4];
        split_range(t, parts, G, C, r);
        failed |= NAME(forward_range)(x, res, y, w, b, mean_out, var_out, rstd_out, A, C, S, eps,
                                      (int)relu, r[0], r[1], r[2], r[3], nt);
    }
    return failed;
}

/* The per-(group, channel) sums of the backward, totalled over the groups into the weight and
   bias gradients (C values each) in double, in group order, so the result does not depend on the
   thread count. dx may be dy: each block reads its part of dy before writing dx over it. With a
   ReLU epilogue, m is the forward's output (laid out as x), which masks dy, and dr (unless NULL)
   receives the masked dy, the residual's gradient; m is NULL otherwise. */
int NAME(fxg_backward)(const T *dy, const T *m, const T *x, const F *w, const F *mean,
                        const F *rstd, T *dx, T *dr, F *grad_w, F *grad_b, int64_t G, int64_t A,
                        int64_t C, int64_t S, int64_t nthreads) {
    int64_t parts = split_parts(G, C, nthreads);
    double *sum_dy = (double *)malloc((size_t)(2 * G * C) * sizeof(double));
    if (!sum_dy) return 1;
    double *sum_dy_xhat = sum_dy + G * C;
    int nt = NAME(streamed)(G, A, C, S), failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1) reduction(| : failed)
    for (int64_t t = 0; t < parts; t++) {
        int64_t r[4];
        split_range(t, parts, G, C, r);
        failed |= NAME(backward_range)(dy, m, x, w, mean, rstd, dx, dr, sum_dy, sum_dy_xhat, A, C,
                                       S, r[0], r[1], r[2], r[3], nt);
    }
    for (int64_t c = 0; c < C; c++) {
        double tw = 0, tb = 0;
        for (int64_t g = 0; g < G; g++) {
            tw += sum_dy_xhat[g * C + c];
            tb += sum_dy[g * C + c];
        }
        grad_w[c] = (F)tw;
        grad_b[c] = (F)tb;
    }
    free(sum_dy);
    return failed;
}

/* The running statistics after G ghost batches, in closed form (fxghost/_math.py derives it):
   r = beta * r + scale * sum_g wts[g] * stat[g], for mean (scale 1) and var (scale `unbias`).
   Returns 0, or 1 when scratch memory ran out. */
int NAME(fxg_running)(const F *mean, const F *var, const F *wts, int64_t G, int64_t C,
                       double beta, double unbias, F *running_mean, F *running_var) {
    double *m = (double *)calloc((size_t)(2 * C), sizeof(double));
    if (!m) return 1;
    double *v = m + C;
    for (int64_t g = 0; g < G; g++) { /* row by row: unit-stride loops over the channels */
        double wg = (double)wts[g];
        const F *mg = mean + g * C, *vg = var + g * C;
        for (int64_t c = 0; c < C; c++) {
            m[c] += wg * (double)mg[c];
            v[c] += wg * (double)vg[c];
        }
    }
    for (int64_t c = 0; c < C; c++) {
        running_mean[c] = (F)(beta * (double)running_mean[c] + m[c]);
        running_var[c] = (F)(beta * (double)running_var[c] + unbias * v[c]);
    }
    free(m);
    return 0;
}

/* The types and their macros, defined by the includer for this copy only. */
#undef T
#undef F
#undef SFX
#undef LD
#undef ST
#undef GRAD
#undef STAGED_ROWS
#undef VEC
#undef VLEN
#undef VLOAD
#undef VADD
#undef VSUB
#undef VMUL
#undef VSTREAM

#endif
