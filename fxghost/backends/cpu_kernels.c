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
 * Plain C without torch headers: it compiles in about a second. No -ffast-math (that would break
 * NaN propagation); restrict-qualified pointers let the compiler vectorize without alias checks.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

#define T float
#define SFX f32
#ifdef __AVX__
#define VEC __m256
#define VLEN 8
#define VLOAD _mm256_loadu_ps
#define VADD _mm256_add_ps
#define VSUB _mm256_sub_ps
#define VMUL _mm256_mul_ps
#define VSTREAM _mm256_stream_ps
#endif
#include "cpu_kernels.c" /* itself, once per type; it ends by undefining T and the V* macros */

#define T double
#define SFX f64
#ifdef __AVX__
#define VEC __m256d
#define VLEN 4
#define VLOAD _mm256_loadu_pd
#define VADD _mm256_add_pd
#define VSUB _mm256_sub_pd
#define VMUL _mm256_mul_pd
#define VSTREAM _mm256_stream_pd
#endif
#include "cpu_kernels.c" /* itself, once per type; it ends by undefining T and the V* macros */

#else

/* acc[j] += x[r * ld + j] over n rows; four rows per load and store of the accumulators. */
static void NAME(col_sum)(const T *restrict x, int64_t ld, int64_t n, int64_t len,
                          T *restrict acc) {
    int64_t r = 0;
    for (; r + 4 <= n; r += 4, x += 4 * ld)
        for (int64_t j = 0; j < len; j++)
            acc[j] += (x[j] + x[j + ld]) + (x[j + 2 * ld] + x[j + 3 * ld]);
    for (; r < n; r++, x += ld)
        for (int64_t j = 0; j < len; j++) acc[j] += x[j];
}

/* acc[j] += (x[r * ld + j] - cen[j])^2 over n rows. */
static void NAME(col_sq)(const T *restrict x, int64_t ld, int64_t n, int64_t len,
                         const T *restrict cen, T *restrict acc) {
    int64_t r = 0;
    for (; r + 4 <= n; r += 4, x += 4 * ld)
        for (int64_t j = 0; j < len; j++) {
            T d0 = x[j] - cen[j], d1 = x[j + ld] - cen[j];
            T d2 = x[j + 2 * ld] - cen[j], d3 = x[j + 3 * ld] - cen[j];
            acc[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
    for (; r < n; r++, x += ld)
        for (int64_t j = 0; j < len; j++) {
            T d = x[j] - cen[j];
            acc[j] += d * d;
        }
}

/* a0[j] += dy[r * ld + j] and a1[j] += dy[r * ld + j] * (x[r * ld + j] - cen[j]) over n rows. */
static void NAME(col_dy)(const T *restrict dy, const T *restrict x, int64_t ld, int64_t n,
                         int64_t len, const T *restrict cen, T *restrict a0, T *restrict a1) {
    int64_t r = 0;
    for (; r + 2 <= n; r += 2, x += 2 * ld, dy += 2 * ld)
        for (int64_t j = 0; j < len; j++) {
            a0[j] += dy[j] + dy[j + ld];
            a1[j] += dy[j] * (x[j] - cen[j]) + dy[j + ld] * (x[j + ld] - cen[j]);
        }
    for (; r < n; r++, x += ld, dy += ld)
        for (int64_t j = 0; j < len; j++) {
            a0[j] += dy[j];
            a1[j] += dy[j] * (x[j] - cen[j]);
        }
}

/* out[c] += sum of acc[c * S ... c * S + S) in double, and acc is zeroed. */
static void NAME(carry)(T *restrict acc, int64_t nb, int64_t S, double *restrict out) {
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
static const T *NAME(expand)(const T *v, int64_t nb, int64_t S, T *restrict row) {
    if (S == 1) return v;
    for (int64_t c = 0; c < nb; c++)
        for (int64_t i = 0; i < S; i++) row[c * S + i] = v[c];
    return row;
}

/* Leading elements of q before a 32-byte boundary (all of len when streaming is off or
   unavailable): the stores after them may be non-temporal. */
static int64_t NAME(stream_head)(const T *q, int64_t len, int nt) {
#ifdef __AVX__
    if (nt) {
        int64_t head = (int64_t)((32 - ((uintptr_t)q & 31)) & 31) / (int64_t)sizeof(T);
        if ((uintptr_t)q % sizeof(T) == 0 && head + VLEN <= len) return head;
    }
#endif
    (void)q, (void)nt;
    return len;
}

/* q[j] = (p[j] - cen[j]) * k[j] + h[j] */
static void NAME(norm_row)(const T *restrict p, const T *restrict cen, const T *restrict k,
                           const T *restrict h, T *restrict q, int64_t len, int nt) {
    int64_t j = NAME(stream_head)(q, len, nt);
    for (int64_t i = 0; i < j; i++) q[i] = (p[i] - cen[i]) * k[i] + h[i];
#ifdef __AVX__
    for (; j + VLEN <= len; j += VLEN) {
        VEC v = VMUL(VSUB(VLOAD(p + j), VLOAD(cen + j)), VLOAD(k + j));
        VSTREAM(q + j, VADD(v, VLOAD(h + j)));
    }
    for (; j < len; j++) q[j] = (p[j] - cen[j]) * k[j] + h[j];
#endif
}

/* q[j] = d[j] * k[j] + (p[j] - cen[j]) * kb[j] + kc[j] */
static void NAME(grad_row)(const T *restrict d, const T *restrict p, const T *restrict cen,
                           const T *restrict k, const T *restrict kb, const T *restrict kc,
                           T *restrict q, int64_t len, int nt) {
    int64_t j = NAME(stream_head)(q, len, nt);
    for (int64_t i = 0; i < j; i++) q[i] = d[i] * k[i] + (p[i] - cen[i]) * kb[i] + kc[i];
#ifdef __AVX__
    for (; j + VLEN <= len; j += VLEN) {
        VEC v = VADD(VMUL(VLOAD(d + j), VLOAD(k + j)),
                     VMUL(VSUB(VLOAD(p + j), VLOAD(cen + j)), VLOAD(kb + j)));
        VSTREAM(q + j, VADD(v, VLOAD(kc + j)));
    }
    for (; j < len; j++) q[j] = d[j] * k[j] + (p[j] - cen[j]) * kb[j] + kc[j];
#endif
}

/* The per-channel results of a forward block, from its mean mu and centred sum of squares m2
   over `seen` values: mean, biased variance and rstd, and the coefficients of
   y = (x - cen) * k + h. Its own function so that restrict-qualified pointers let the loop
   vectorize (with -fno-math-errno for sqrt): with small ghost batches this per-channel work
   costs as much as the passes over the data. w and b may be NULL. */
static void NAME(forward_coefs)(int64_t nb, const double *restrict mu, const double *restrict m2,
                                double seen, double eps, const T *restrict w, const T *restrict b,
                                T *restrict cv, T *restrict kv, T *restrict hv,
                                T *restrict mean_out, T *restrict var_out, T *restrict rstd_out) {
    for (int64_t c = 0; c < nb; c++) {
        double var = m2[c] / seen;
        double rstd = 1.0 / sqrt(var + eps);
        kv[c] = (T)(w ? rstd * (double)w[c] : rstd);
        hv[c] = b ? b[c] : (T)0;
        cv[c] = (T)mu[c];
        mean_out[c] = (T)mu[c];
        var_out[c] = (T)var;
        rstd_out[c] = (T)rstd;
    }
}

/* The per-channel results of a backward block from its sums of dy and dy * (x - mean) over n
   values: the group's sum(dy) and sum(dy * xhat), and the coefficients of
   dx = dy * k + (x - mean) * kb + kc. Its own function for the same reason. w may be NULL. */
static void NAME(backward_coefs)(int64_t nb, const double *restrict sdy,
                                 const double *restrict sdx, double n, const T *restrict rstd,
                                 const T *restrict w, double *restrict sum_dy_out,
                                 double *restrict sum_dy_xhat_out, T *restrict kv,
                                 T *restrict kbv, T *restrict kcv) {
    for (int64_t c = 0; c < nb; c++) {
        double r = (double)rstd[c];
        double sdxh = sdx[c] * r;
        double kk = w ? r * (double)w[c] : r;
        sum_dy_out[c] = sdy[c];
        sum_dy_xhat_out[c] = sdxh;
        kv[c] = (T)kk;
        kbv[c] = (T)(-kk * r * sdxh / n);
        kcv[c] = (T)(-kk * sdy[c] / n);
    }
}

/* d[j] = d[j] * k[j] + (p[j] - cen[j]) * kb[j] + kc[j]: grad_row with dx written over dy, each
   element read before it is written. Plain stores: the lines were just read, so they are in
   cache and a store costs no extra read. */
static void NAME(grad_row_inplace)(T *d, const T *restrict p, const T *restrict cen,
                                   const T *restrict k, const T *restrict kb,
                                   const T *restrict kc, int64_t len) {
    for (int64_t j = 0; j < len; j++) d[j] = d[j] * k[j] + (p[j] - cen[j]) * kb[j] + kc[j];
}

/* Per-thread scratch: 6 * nb doubles and 9 segments of len values of T. */
/* Laid out by the largest block (nb, len), whatever block uses it: a smaller last block must not
   move the arrays, or its temporaries would land in the next block's zeroed accumulators. */
typedef struct {
    double *d;
    T *t;
    int64_t nb, len;
    int nt; /* outputs written with non-temporal stores */
} NAME(scratch_t);

static int NAME(scratch)(int64_t nb, int64_t len, int nt, NAME(scratch_t) *s) {
    s->nb = nb, s->len = len, s->nt = nt;
    s->d = (double *)calloc((size_t)(6 * nb), sizeof(double));
    s->t = (T *)calloc((size_t)(9 * len), sizeof(T));
    if (s->d && s->t) return 1;
    free(s->d);
    free(s->t);
    return 0;
}

static void NAME(scratch_free)(NAME(scratch_t) *s) {
#ifdef __AVX__
    /* Non-temporal stores are weakly ordered: make them visible before the threads join. */
    if (s->nt) _mm_sfence();
#endif
    free(s->d);
    free(s->t);
}

/* Forward of channels [b0, b0 + nb) of one group: y = (x - mean) * (rstd * w) + b, centred
   first so that |mean| >> std loses no precision; writes the group's mean, biased variance and
   rstd of these channels. */
static void NAME(forward_block)(const T *restrict x, T *restrict y, const T *w, const T *b,
                                T *mean_out, T *var_out, T *rstd_out, int64_t A, int64_t C,
                                int64_t S, double eps, int64_t b0, int64_t nb,
                                NAME(scratch_t) *s) {
    int64_t ld = C * S, len = nb * S;
    int64_t sn = s->nb, sl = s->len;
    double *mu = s->d, *m2 = mu + sn, *bsum = m2 + sn, *bsq = bsum + sn;
    T *acc = s->t, *cen_row = acc + sl, *k_row = cen_row + sl, *h_row = k_row + sl,
      *cv = h_row + sl, *kv = cv + sl, *hv = kv + sl;
    const T *cen;
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
        /* Centred on the block mean rounded to T; the rounding shifts M2 by cnt * delta^2. */
        for (int64_t c = 0; c < nb; c++) cv[c] = (T)(bsum[c] / cnt);
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
    const T *kr = NAME(expand)(kv, nb, S, k_row), *hr = NAME(expand)(hv, nb, S, h_row);
    T *ys = y + b0 * S;
    for (int64_t a = 0; a < A; a++)
        NAME(norm_row)(xs + a * ld, cen, kr, hr, ys + a * ld, len, s->nt);
}

static int NAME(forward_range)(const T *x, T *y, const T *w, const T *b, T *mean_out,
                                T *var_out, T *rstd_out, int64_t A, int64_t C, int64_t S,
                                double eps, int64_t g0, int64_t g1, int64_t c0, int64_t c1,
                                int nt) {
    int64_t nb = channel_block(A, S, c1 - c0, sizeof(T), BLOCK_BYTES);
    NAME(scratch_t) s;
    if (!NAME(scratch)(nb, nb * S, nt, &s)) return 1;
    for (int64_t g = g0; g < g1; g++)
        for (int64_t b0 = c0; b0 < c1; b0 += nb)
            NAME(forward_block)(x + g * A * C * S, y + g * A * C * S, w, b, mean_out + g * C,
                                var_out + g * C, rstd_out + g * C, A, C, S, eps, b0,
                                MIN(nb, c1 - b0), &s);
    NAME(scratch_free)(&s);
    return 0;
}

/* Backward of channels [b0, b0 + nb) of one group: the group's sum(dy) and sum(dy * xhat) of
   these channels, and dx = k * (dy - sum_dy / n - xhat * sum_dy_xhat / n), written as
   dy * k + (x - mean) * kb + kc, unless dx is NULL; dx may be dy itself (then written over it). */
static void NAME(backward_block)(const T *dy, const T *restrict x, const T *w,
                                 const T *mean, const T *rstd, T *dx, double *sum_dy_out,
                                 double *sum_dy_xhat_out, int64_t A, int64_t C, int64_t S,
                                 int64_t b0, int64_t nb, NAME(scratch_t) *s) {
    int64_t ld = C * S, len = nb * S;
    int64_t sn = s->nb, sl = s->len;
    double *sdy = s->d, *sdx = sdy + sn, n = (double)(A * S);
    T *a0 = s->t, *a1 = a0 + sl, *rows = a1 + sl, *kv = rows + 4 * sl, *kbv = kv + sn,
      *kcv = kbv + sn;
    const T *xs = x + b0 * S, *dys = dy + b0 * S;
    for (int64_t c = 0; c < nb; c++) sdy[c] = sdx[c] = 0;
    const T *cen = NAME(expand)(mean + b0, nb, S, rows);
    for (int64_t r = 0; r < A; r += RUN_ROWS) {
        NAME(col_dy)(dys + r * ld, xs + r * ld, ld, MIN(RUN_ROWS, A - r), len, cen, a0, a1);
        NAME(carry)(a0, nb, S, sdy);
        NAME(carry)(a1, nb, S, sdx);
    }
    NAME(backward_coefs)(nb, sdy, sdx, n, rstd + b0, w ? w + b0 : NULL, sum_dy_out + b0,
                         sum_dy_xhat_out + b0, kv, kbv, kcv);
    if (!dx) return;
    const T *kr = NAME(expand)(kv, nb, S, rows + sl),
            *kbr = NAME(expand)(kbv, nb, S, rows + 2 * sl),
            *kcr = NAME(expand)(kcv, nb, S, rows + 3 * sl);
    T *dxs = dx + b0 * S;
    if (dx == dy) { /* in place: this block's dy has been read (its sums) and is now spent */
        for (int64_t a = 0; a < A; a++)
            NAME(grad_row_inplace)(dxs + a * ld, xs + a * ld, cen, kr, kbr, kcr, len);
        return;
    }
    for (int64_t a = 0; a < A; a++)
        NAME(grad_row)(dys + a * ld, xs + a * ld, cen, kr, kbr, kcr, dxs + a * ld, len, s->nt);
}

static int NAME(backward_range)(const T *dy, const T *x, const T *w, const T *mean,
                                 const T *rstd, T *dx, double *sum_dy_out, double *sum_dy_xhat_out,
                                 int64_t A, int64_t C, int64_t S, int64_t g0, int64_t g1,
                                 int64_t c0, int64_t c1, int nt) {
    /* Two input streams share the cache. */
    int64_t nb = channel_block(A, S, c1 - c0, sizeof(T), BLOCK_BYTES / 2);
    NAME(scratch_t) s;
    if (!NAME(scratch)(nb, nb * S, nt, &s)) return 1;
    for (int64_t g = g0; g < g1; g++) {
        int64_t off = g * A * C * S;
        for (int64_t b0 = c0; b0 < c1; b0 += nb)
            NAME(backward_block)(dy + off, x + off, w, mean + g * C, rstd + g * C,
                                 dx ? dx + off : NULL, sum_dy_out + g * C,
                                 sum_dy_xhat_out + g * C, A, C, S, b0, MIN(nb, c1 - b0), &s);
    }
    NAME(scratch_free)(&s);
    return 0;
}

/* Whether a (G, A, C, S) output is large enough for non-temporal stores. */
static int NAME(streamed)(int64_t G, int64_t A, int64_t C, int64_t S) {
    return G * A * C * S * (int64_t)sizeof(T) >= STREAM_MIN_BYTES;
}

/* The exported entry points: G groups split between nthreads threads, by groups when there are
   enough of them, else by channels. They return 0, or 1 when scratch memory ran out. */
int NAME(fxg_forward)(const T *x, T *y, const T *w, const T *b, T *mean_out, T *var_out,
                       T *rstd_out, int64_t G, int64_t A, int64_t C, int64_t S, double eps,
                       int64_t nthreads) {
    int64_t parts = split_parts(G, C, nthreads);
    int nt = NAME(streamed)(G, A, C, S), failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1) reduction(| : failed)
    for (int64_t t = 0; t < parts; t++) {
        int64_t r[4];
        split_range(t, parts, G, C, r);
        failed |= NAME(forward_range)(x, y, w, b, mean_out, var_out, rstd_out, A, C, S, eps, r[0],
                                      r[1], r[2], r[3], nt);
    }
    return failed;
}

/* The per-(group, channel) sums of the backward, totalled over the groups into the weight and
   bias gradients (C values each) in double, in group order, so the result does not depend on the
   thread count. dx may be dy: each block reads its part of dy before writing dx over it. */
int NAME(fxg_backward)(const T *dy, const T *x, const T *w, const T *mean, const T *rstd, T *dx,
                        T *grad_w, T *grad_b, int64_t G, int64_t A, int64_t C, int64_t S,
                        int64_t nthreads) {
    int64_t parts = split_parts(G, C, nthreads);
    double *sum_dy = (double *)malloc((size_t)(2 * G * C) * sizeof(double));
    if (!sum_dy) return 1;
    double *sum_dy_xhat = sum_dy + G * C;
    int nt = NAME(streamed)(G, A, C, S), failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1) reduction(| : failed)
    for (int64_t t = 0; t < parts; t++) {
        int64_t r[4];
        split_range(t, parts, G, C, r);
        failed |= NAME(backward_range)(dy, x, w, mean, rstd, dx, sum_dy, sum_dy_xhat, A, C, S,
                                       r[0], r[1], r[2], r[3], nt);
    }
    for (int64_t c = 0; c < C; c++) {
        double tw = 0, tb = 0;
        for (int64_t g = 0; g < G; g++) {
            tw += sum_dy_xhat[g * C + c];
            tb += sum_dy[g * C + c];
        }
        grad_w[c] = (T)tw;
        grad_b[c] = (T)tb;
    }
    free(sum_dy);
    return failed;
}

/* The running statistics after G ghost batches, in closed form (fxghost/_math.py derives it):
   r = beta * r + scale * sum_g wts[g] * stat[g], for mean (scale 1) and var (scale `unbias`).
   Returns 0, or 1 when scratch memory ran out. */
int NAME(fxg_running)(const T *mean, const T *var, const T *wts, int64_t G, int64_t C,
                       double beta, double unbias, T *running_mean, T *running_var) {
    double *m = (double *)calloc((size_t)(2 * C), sizeof(double));
    if (!m) return 1;
    double *v = m + C;
    for (int64_t g = 0; g < G; g++) { /* row by row: unit-stride loops over the channels */
        double wg = (double)wts[g];
        const T *mg = mean + g * C, *vg = var + g * C;
        for (int64_t c = 0; c < C; c++) {
            m[c] += wg * (double)mg[c];
            v[c] += wg * (double)vg[c];
        }
    }
    for (int64_t c = 0; c < C; c++) {
        running_mean[c] = (T)(beta * (double)running_mean[c] + m[c]);
        running_var[c] = (T)(beta * (double)running_var[c] + unbias * v[c]);
    }
    free(m);
    return 0;
}

/* The type and its vector macros, defined by the includer for this copy only. */
#undef T
#undef SFX
#undef VEC
#undef VLEN
#undef VLOAD
#undef VADD
#undef VSUB
#undef VMUL
#undef VSTREAM

#endif
