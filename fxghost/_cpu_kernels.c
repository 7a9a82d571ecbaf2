/* Fused ghost-normalization kernels for the CPU, compiled on first use by fxghost/_cpu.py.
 *
 * A grouped tensor is dense, element (g, a, c, s) at ((g * A + a) * C + c) * S + s:
 *   "rows"   S == 1: tabular (G, rows, C) and channels-last inputs, channels innermost;
 *   "planes" S > 1:  contiguous NCHW-like inputs (G, samples, C, spatial).
 * Statistics are per (group, channel) and two-pass (mean, then the centred sum of squares), so
 * they stay accurate when |mean| >> std. Partial sums run in the input type over short stretches
 * (at most RUN values per lane, or BLOCK_ROWS rows) and are carried in double beyond that:
 * converting every value to double halves the vector width and measured 2x slower.
 * Each call handles the groups [g0, g1) and channels [c0, c1), so that the caller can split work
 * between threads. Work is blocked so that a block's second and third passes hit cache.
 *
 * Plain C without torch headers: it compiles in about a second. Accumulators are small arrays of
 * independent lanes, which the compiler vectorizes without -ffast-math (that would break NaN
 * propagation).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef T
/* Independent accumulators per run (four AVX2 registers of float), and values per run stretch. */
#define LANES 32
#define RUN 1024
/* Working-set size that stays in a core's L2 cache between passes, and rows per row block. */
#define BLOCK_BYTES (128 * 1024)
#define BLOCK_ROWS 64
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define NAME(f) CAT(f, SFX)

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

#define T float
#define SFX f32
#include "_cpu_kernels.c" /* itself, once per type */
#undef T
#undef SFX

#define T double
#define SFX f64
#include "_cpu_kernels.c" /* itself, once per type */
#undef T
#undef SFX

#else

/* Lane accumulators: runs add into LANES partial sums in T; flush() carries them into double
   before they have summed more than RUN values each stretch, and resets them. */
static void NAME(flush)(T *acc, double *total) {
    /* Pairwise in T first: 32 dependent double additions per flush would cost more than the
       run they follow. */
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) acc[j] += acc[j + width];
    *total += (double)acc[0];
    memset(acc, 0, sizeof(T) * LANES);
}

static void NAME(add_run)(const T *p, int64_t n, T *acc) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += p[i + j];
    for (; i < n; i++) acc[i % LANES] += p[i];
}

static void NAME(add_sq_run)(const T *p, int64_t n, T m, T *acc) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            T d = p[i + j] - m;
            acc[j] += d * d;
        }
    for (; i < n; i++) acc[i % LANES] += (p[i] - m) * (p[i] - m);
}

static void NAME(add_dy_run)(const T *dy, const T *x, int64_t n, T m, T *a0, T *a1) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            a0[j] += dy[i + j];
            a1[j] += dy[i + j] * (x[i + j] - m);
        }
    for (; i < n; i++) {
        a0[i % LANES] += dy[i];
        a1[i % LANES] += dy[i] * (x[i] - m);
    }
}

/* Per-channel mean and M2 (sum of squared deviations) over n values -> the (G, C) outputs, and
   the coefficients of y = (x - center) * scale + shift. */
static void NAME(coefficients)(const double *mu, const double *m2, double n, double eps,
                               const T *w, const T *b, int64_t cw, int64_t nc, T *scale,
                               T *shift, T *center, T *mean_out, T *var_out, T *rstd_out) {
    for (int64_t c = 0; c < nc; c++) {
        double var = m2[c] / n;
        double rstd = 1.0 / sqrt(var + eps);
        scale[c] = (T)(w ? rstd * (double)w[cw + c] : rstd);
        shift[c] = b ? b[cw + c] : (T)0;
        center[c] = (T)mu[c];
        mean_out[c] = (T)mu[c];
        var_out[c] = (T)var;
        rstd_out[c] = (T)rstd;
    }
}

/* Per-thread scratch: two double and five T vectors of nc values. */
static int NAME(scratch)(int64_t nc, double **d, T **t) {
    *d = (double *)malloc(sizeof(double) * nc * 2);
    *t = (T *)malloc(sizeof(T) * nc * 5);
    if (*d && *t) return 1;
    free(*d);
    free(*t);
    return 0;
}

/* Forward: y = (x - mean) * (rstd * w) + b, centred first so that |mean| >> std loses no
   precision; writes the per-(group, channel) mean, biased variance and rstd. */
static int NAME(forward_range)(const T *x, T *y, const T *w, const T *b, T *mean_out,
                                T *var_out, T *rstd_out, int64_t A, int64_t C, int64_t S,
                                double eps, int64_t g0, int64_t g1, int64_t c0, int64_t c1) {
    int64_t nc = c1 - c0;
    double n = (double)(A * S);
    double *dbuf;
    T *tbuf;
    if (!NAME(scratch)(nc, &dbuf, &tbuf)) return 1;
    double *mu = dbuf, *m2 = dbuf + nc;
    T *scale = tbuf, *shift = tbuf + nc, *center = tbuf + 2 * nc, *bs = tbuf + 3 * nc,
      *bq = tbuf + 4 * nc;
    for (int64_t g = g0; g < g1; g++) {
        const T *xg = x + g * A * C * S;
        T *yg = y + g * A * C * S;
        T *mo = mean_out + g * C + c0, *vo = var_out + g * C + c0, *ro = rstd_out + g * C + c0;
        if (S == 1) {
            /* Rows: blocks of rows that stay in cache for their second pass, each reduced
               two-pass and merged with Chan's formula, so x streams from memory once. */
            int64_t rb = BLOCK_BYTES / (int64_t)(sizeof(T) * nc);
            rb = rb < 1 ? 1 : rb > BLOCK_ROWS ? BLOCK_ROWS : rb;
            double seen = 0;
            for (int64_t c = 0; c < nc; c++) mu[c] = m2[c] = 0;
            for (int64_t a0 = 0; a0 < A; a0 += rb) {
                int64_t a1 = a0 + rb < A ? a0 + rb : A;
                double cnt = (double)(a1 - a0), tot = seen + cnt;
                for (int64_t c = 0; c < nc; c++) bs[c] = bq[c] = 0;
                for (int64_t a = a0; a < a1; a++) {
                    const T *row = xg + a * C + c0;
                    for (int64_t c = 0; c < nc; c++) bs[c] += row[c];
                }
                for (int64_t c = 0; c < nc; c++) bs[c] = (T)((double)bs[c] / cnt);
                for (int64_t a = a0; a < a1; a++) {
                    const T *row = xg + a * C + c0;
                    for (int64_t c = 0; c < nc; c++) {
                        T d = row[c] - bs[c];
                        bq[c] += d * d;
                    }
                }
                for (int64_t c = 0; c < nc; c++) {
                    double delta = (double)bs[c] - mu[c];
                    mu[c] += delta * (cnt / tot);
                    m2[c] += (double)bq[c] + delta * delta * (seen * cnt / tot);
                }
                seen = tot;
            }
            NAME(coefficients)(mu, m2, n, eps, w, b, c0, nc, scale, shift, center, mo, vo, ro);
            for (int64_t a = 0; a < A; a++) {
                const T *row = xg + a * C + c0;
                T *out = yg + a * C + c0;
                for (int64_t c = 0; c < nc; c++)
                    out[c] = (row[c] - center[c]) * scale[c] + shift[c];
            }
        } else {
            /* Planes: blocks of channels that stay in cache for all three passes (a block's
               runs are adjacent in memory for each sample). */
            int64_t cb = BLOCK_BYTES / (int64_t)(sizeof(T) * A * S);
            cb = cb < 1 ? 1 : cb;
            for (int64_t b0 = 0; b0 < nc; b0 += cb) {
                int64_t b1 = b0 + cb < nc ? b0 + cb : nc;
                for (int64_t c = b0; c < b1; c++) {
                    T acc[LANES] = {0};
                    double s = 0, q = 0;
                    for (int64_t a = 0, since = 0; a < A; a++, since += S) {
                        if (since >= RUN * LANES) NAME(flush)(acc, &s), since = 0;
                        NAME(add_run)(xg + (a * C + c0 + c) * S, S, acc);
                    }
                    NAME(flush)(acc, &s);
                    mu[c] = s / n;
                    /* Centre on the mean rounded to T, as the normalization does; the rounding
                       only shifts M2 by n * delta^2. */
                    T m = (T)mu[c];
                    for (int64_t a = 0, since = 0; a < A; a++, since += S) {
                        if (since >= RUN * LANES) NAME(flush)(acc, &q), since = 0;
                        NAME(add_sq_run)(xg + (a * C + c0 + c) * S, S, m, acc);
                    }
                    NAME(flush)(acc, &q);
                    double delta = (double)m - mu[c];
                    m2[c] = q - n * delta * delta;
                }
                NAME(coefficients)(mu + b0, m2 + b0, n, eps, w, b, c0 + b0, b1 - b0, scale + b0,
                                   shift + b0, center + b0, mo + b0, vo + b0, ro + b0);
                for (int64_t a = 0; a < A; a++)
                    for (int64_t c = b0; c < b1; c++) {
                        const T *p = xg + (a * C + c0 + c) * S;
                        T *q = yg + (a * C + c0 + c) * S;
                        T k = scale[c], h = shift[c], m = center[c];
                        for (int64_t i = 0; i < S; i++) q[i] = (p[i] - m) * k + h;
                    }
            }
        }
    }
    free(dbuf);
    free(tbuf);
    return 0;
}

/* Per-channel sum(dy) and sum(dy * xhat) -> the (G, C) outputs, and the coefficients of
   dx = k * (dy - sum_dy / n - xhat * sum_dy_xhat / n) = dy * k + (x - mean) * kb + kc. */
static void NAME(grad_coefficients)(const double *sdy, const double *sdx, double n, const T *w,
                                    int64_t cw, int64_t nc, const T *mean, const T *rstd,
                                    T *sum_dy_out, T *sum_dy_xhat_out, T *k, T *kb, T *kc) {
    for (int64_t c = 0; c < nc; c++) {
        double r = (double)rstd[c];
        double sdxh = sdx[c] * r;
        double kk = w ? r * (double)w[cw + c] : r;
        double bb = -kk * r * sdxh / n;
        sum_dy_out[c] = (T)sdy[c];
        sum_dy_xhat_out[c] = (T)sdxh;
        k[c] = (T)kk;
        kb[c] = (T)bb;
        kc[c] = (T)(-kk * sdy[c] / n);
        (void)mean;
    }
}

/* Backward: writes the per-(group, channel) sum(dy) and sum(dy * xhat) that the weight and bias
   gradients are made of, and the input gradient into dx unless it is NULL. */
static int NAME(backward_range)(const T *dy, const T *x, const T *w, const T *mean,
                                 const T *rstd, T *dx, T *sum_dy_out, T *sum_dy_xhat_out,
                                 int64_t A, int64_t C, int64_t S, int64_t g0, int64_t g1,
                                 int64_t c0, int64_t c1) {
    int64_t nc = c1 - c0;
    double n = (double)(A * S);
    double *dbuf;
    T *tbuf;
    if (!NAME(scratch)(nc, &dbuf, &tbuf)) return 1;
    double *sdy = dbuf, *sdx = dbuf + nc;
    T *k = tbuf, *kb = tbuf + nc, *kc = tbuf + 2 * nc, *b0s = tbuf + 3 * nc, *b1s = tbuf + 4 * nc;
    for (int64_t g = g0; g < g1; g++) {
        const T *xg = x + g * A * C * S, *dyg = dy + g * A * C * S;
        T *dxg = dx ? dx + g * A * C * S : NULL;
        const T *mg = mean + g * C + c0, *rg = rstd + g * C + c0;
        T *so = sum_dy_out + g * C + c0, *sxo = sum_dy_xhat_out + g * C + c0;
        if (S == 1) {
            for (int64_t c = 0; c < nc; c++) sdy[c] = sdx[c] = 0;
            for (int64_t a0 = 0; a0 < A; a0 += BLOCK_ROWS) {
                int64_t a1 = a0 + BLOCK_ROWS < A ? a0 + BLOCK_ROWS : A;
                for (int64_t c = 0; c < nc; c++) b0s[c] = b1s[c] = 0;
                for (int64_t a = a0; a < a1; a++) {
                    const T *xr = xg + a * C + c0, *dr = dyg + a * C + c0;
                    for (int64_t c = 0; c < nc; c++) {
                        b0s[c] += dr[c];
                        b1s[c] += dr[c] * (xr[c] - mg[c]);
                    }
                }
                for (int64_t c = 0; c < nc; c++) {
                    sdy[c] += (double)b0s[c];
                    sdx[c] += (double)b1s[c];
                }
            }
            NAME(grad_coefficients)(sdy, sdx, n, w, c0, nc, mg, rg, so, sxo, k, kb, kc);
            if (!dxg) continue;
            for (int64_t a = 0; a < A; a++) {
                const T *xr = xg + a * C + c0, *dr = dyg + a * C + c0;
                T *out = dxg + a * C + c0;
                for (int64_t c = 0; c < nc; c++)
                    out[c] = dr[c] * k[c] + (xr[c] - mg[c]) * kb[c] + kc[c];
            }
        } else {
            int64_t cb = BLOCK_BYTES / (int64_t)(2 * sizeof(T) * A * S);
            cb = cb < 1 ? 1 : cb;
            for (int64_t p0 = 0; p0 < nc; p0 += cb) {
                int64_t p1 = p0 + cb < nc ? p0 + cb : nc;
                for (int64_t c = p0; c < p1; c++) {
                    T a0[LANES] = {0}, a1[LANES] = {0};
                    sdy[c] = sdx[c] = 0;
                    for (int64_t a = 0, since = 0; a < A; a++, since += S) {
                        if (since >= RUN * LANES) {
                            NAME(flush)(a0, &sdy[c]);
                            NAME(flush)(a1, &sdx[c]);
                            since = 0;
                        }
                        int64_t off = (a * C + c0 + c) * S;
                        NAME(add_dy_run)(dyg + off, xg + off, S, mg[c], a0, a1);
                    }
                    NAME(flush)(a0, &sdy[c]);
                    NAME(flush)(a1, &sdx[c]);
                }
                NAME(grad_coefficients)(sdy + p0, sdx + p0, n, w, c0 + p0, p1 - p0, mg + p0,
                                        rg + p0, so + p0, sxo + p0, k + p0, kb + p0, kc + p0);
                if (!dxg) continue;
                for (int64_t a = 0; a < A; a++)
                    for (int64_t c = p0; c < p1; c++) {
                        int64_t off = (a * C + c0 + c) * S;
                        const T *xr = xg + off, *dr = dyg + off;
                        T *out = dxg + off;
                        T kk = k[c], bb = kb[c], cc = kc[c], m = mg[c];
                        for (int64_t i = 0; i < S; i++) out[i] = dr[i] * kk + (xr[i] - m) * bb + cc;
                    }
            }
        }
    }
    free(dbuf);
    free(tbuf);
    return 0;
}

/* The exported entry points: G groups split between nthreads threads, by groups when there are
   enough of them, else by channels. They return 0, or 1 when scratch memory ran out. */
int NAME(fxg_forward)(const T *x, T *y, const T *w, const T *b, T *mean_out, T *var_out,
                       T *rstd_out, int64_t G, int64_t A, int64_t C, int64_t S, double eps,
                       int64_t nthreads) {
    int64_t parts = split_parts(G, C, nthreads);
    int failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1) reduction(| : failed)
    for (int64_t t = 0; t < parts; t++) {
        int64_t r[4];
        split_range(t, parts, G, C, r);
        failed |= NAME(forward_range)(x, y, w, b, mean_out, var_out, rstd_out, A, C, S, eps, r[0],
                                      r[1], r[2], r[3]);
    }
    return failed;
}

int NAME(fxg_backward)(const T *dy, const T *x, const T *w, const T *mean, const T *rstd, T *dx,
                        T *sum_dy_out, T *sum_dy_xhat_out, int64_t G, int64_t A, int64_t C,
                        int64_t S, int64_t nthreads) {
    int64_t parts = split_parts(G, C, nthreads);
    int failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1) reduction(| : failed)
    for (int64_t t = 0; t < parts; t++) {
        int64_t r[4];
        split_range(t, parts, G, C, r);
        failed |= NAME(backward_range)(dy, x, w, mean, rstd, dx, sum_dy_out, sum_dy_xhat_out, A,
                                       C, S, r[0], r[1], r[2], r[3]);
    }
    return failed;
}

#endif
