/* Native CPU GGUF block quantizers: a scalar C port of lowbit.gguf's torch code.
 *
 * Every function mirrors its torch counterpart (quants.py, kquants.py, iquants.py,
 * _blockops.py) operation by operation in float32, so the bytes are the same. Build
 * with -ffp-contract=off and without fast-math: fused multiply-adds or reassociation
 * would change results.
 *
 * Entry point: lowbit_quantize(); see the end of the file.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 32
#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

/* ------------------------------------------------------------------ scalar helpers */

/* _blockops.nearest_int: add 1.5 * 2**23 and read the mantissa. */
static inline int nearest_int(float v) {
    float t = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007FFFFF) - 0x00400000;
}

/* _blockops.c_int8_cast: truncate to int32 (out of range / NaN -> INT_MIN), keep the low byte. */
static inline int c_int8_cast(float v) {
    int32_t t = fabsf(v) < 2147483648.0f ? (int32_t)v : 0;
    return (int)(int8_t)(uint8_t)(t & 0xFF);
}

/* c_int8_cast(roundf(v)): C roundf (half away from zero), then the int8 cast. */
static inline int round_int8(float v) {
    if (!(fabsf(v) < 8388608.0f)) return c_int8_cast(v); /* already integral, inf or NaN */
    int32_t t = (int32_t)v;
    float frac = v - (float)t; /* exact */
    t += (frac >= 0.5f) - (frac <= -0.5f);
    return (int)(int8_t)(uint8_t)(t & 0xFF);
}

/* _blockops.sqrtf: float64 root rounded once to float32. */
static inline float sqrt_f(float v) { return (float)sqrt((double)v); }

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int iclamp(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* IEEE half, round to nearest even (subnormals, overflow to inf, NaN kept quiet). */
static uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) {                                    /* below 2**-14: half subnormal */
        uint32_t e = ax >> 23;
        if (e < 102) return (uint16_t)sign; /* below 2**-25 */
        uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
        uint32_t s = 126 - e; /* 14 .. 24 */
        uint32_t q = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    ax += 0xC8000FFFu + ((ax >> 13) & 1u); /* rebias the exponent, round to nearest even */
    return (uint16_t)(sign | (ax >> 13));
}

static float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FFu, bits;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-8f; /* m * 2**-24, exact */
        memcpy(&bits, &v, 4);
        bits |= sign;
    } else if (e == 31) {
        bits = sign | 0x7F800000u | (m << 13);
    } else {
        bits = sign | ((e + 112) << 23) | (m << 13);
    }
    float r;
    memcpy(&r, &bits, 4);
    return r;
}

static inline float fp16_round(float v) { return fp16_to_fp32(fp32_to_fp16(v)); }

static inline void put_f16(uint8_t *p, float v) {
    uint16_t h = fp32_to_fp16(v);
    p[0] = (uint8_t)(h & 0xFF);
    p[1] = (uint8_t)(h >> 8);
}

/* _blockops.first_abs_max: max |x| and the signed first value reaching it (+0 if all zero). */
static inline float first_abs_max(const float *x, int n, float *amax_out) {
    float amax = 0.0f, mx = 0.0f;
    for (int i = 0; i < n; i++) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            mx = x[i];
        }
    }
    if (amax_out) *amax_out = amax;
    return mx;
}

/* _blockops.seq_min / seq_max: first value of the running strict comparison. */
static inline float seq_min(const float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] < m) m = x[i];
    return m;
}

static inline float seq_max(const float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > m) m = x[i];
    return m;
}

/* amax over a block (value only) */
static inline float max_val(const float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > m) m = x[i];
    return m;
}

/* kquants._pos_max: running max starting from +0.0 */
static inline float pos_max(const float *v, int n) {
    float m = 0.0f;
    for (int i = 0; i < n; i++)
        if (v[i] > m) m = v[i];
    return m;
}

static inline float sum_sq(const float *x, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s = s + x[i] * x[i];
    return s;
}

/* ------------------------------------------------------------------ 8-lane vectors
 * GCC/Clang vector extensions: each lane does exactly the scalar float32 operations (IEEE,
 * no contraction), so lanes are independent blocks or candidates computed side by side. */

#define NL 8
typedef float vf __attribute__((vector_size(4 * NL)));
typedef int32_t vi __attribute__((vector_size(4 * NL)));
#define VINLINE static inline __attribute__((always_inline))

/* The searches also get an AVX2 build, picked at load time where the CPU has it: the same
 * IEEE float32 operations on wider registers (no FMA: -ffp-contract=off), so the same bytes. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(LOWBIT_NO_CLONES)
#define SEARCH __attribute__((target_clones("avx2", "default")))
#else
#define SEARCH
#endif

VINLINE vf vsplat(float v) { return (vf){0} + v; }
VINLINE vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
VINLINE vf vabs(vf v) { return (vf)((vi)v & 0x7FFFFFFF); }

/* nearest_int lane-wise, clamped to [lo, hi] */
VINLINE vi vnearest(vf v, int lo, int hi) {
    vi i = ((vi)(v + 12582912.0f) & 0x007FFFFF) - 0x00400000;
    vi m = i < lo;
    i = (i & ~m) | (lo & m);
    m = i > hi;
    return (i & ~m) | (hi & m);
}

VINLINE vf vcodes(vf v, int lo, int hi) { return __builtin_convertvector(vnearest(v, lo, hi), vf); }

/* ------------------------------------------------------------------ searches */

/* _blockops.make_qx_quants (symmetric scale search) on NL blocks side by side: block k is
 * x + k*n, w + k*n (w NULL -> x*x), L + k*n (n <= 32); lanes past nblk repeat block 0.
 * Writes scale[k] and L in [0, 2*nmax). */
SEARCH static void make_qx_lanes(int nblk, int n, int nmax, const float *x, const float *w, float *scale_out, uint8_t *L) {
    float xs[32][NL], ws[32][NL], a_mx[NL];
    int zero[NL];
    for (int k = 0; k < NL; k++) {
        int b = k < nblk ? k : 0;
        const float *xb = x + b * n;
        float amax, mx = first_abs_max(xb, n, &amax);
        zero[k] = amax < GROUP_MAX_EPS;
        a_mx[k] = zero[k] ? 1.0f : mx;
        for (int i = 0; i < n; i++) {
            xs[i][k] = xb[i];
            ws[i][k] = w ? w[b * n + i] : xb[i] * xb[i];
        }
    }
    vf xt[32], wt[32], wx[32], mx;
    memcpy(xt, xs, sizeof(vf) * n);
    memcpy(wt, ws, sizeof(vf) * n);
    memcpy(&mx, a_mx, sizeof mx);
    for (int i = 0; i < n; i++) wx[i] = wt[i] * xt[i];
    vf chosen = vsplat((float)(-nmax)) / mx, sumlx = vsplat(0.0f), suml2 = sumlx;
    for (int i = 0; i < n; i++) {
        vf l = vcodes(chosen * xt[i], -nmax, nmax - 1);
        sumlx = sumlx + wx[i] * l;
        suml2 = suml2 + (wt[i] * l) * l;
    }
    vf scale = vsel(suml2 != 0.0f, sumlx / suml2, vsplat(0.0f));
    vf best = scale * sumlx;
    for (int s = -9; s <= 9; s++) {
        if (s == 0) continue;
        vf isc = vsplat(-((float)nmax + 0.1f * (float)s)) / mx, slx = vsplat(0.0f), sl2 = slx;
        for (int i = 0; i < n; i++) {
            vf l = vcodes(isc * xt[i], -nmax, nmax - 1);
            slx = slx + wx[i] * l;
            sl2 = sl2 + (wt[i] * l) * l;
        }
        vi take = (sl2 > 0.0f) & (slx * slx > best * sl2);
        vf ns = slx / sl2;
        chosen = vsel(take, isc, chosen);
        scale = vsel(take, ns, scale);
        best = vsel(take, ns * slx, best);
    }
    float a_ch[NL], a_sc[NL];
    memcpy(a_ch, &chosen, sizeof a_ch);
    memcpy(a_sc, &scale, sizeof a_sc);
    for (int k = 0; k < nblk; k++) {
        for (int i = 0; i < n; i++)
            L[k * n + i] = zero[k] ? 0 : (uint8_t)(iclamp(nearest_int(a_ch[k] * x[k * n + i]), -nmax, nmax - 1) + nmax);
        scale_out[k] = zero[k] ? 0.0f : a_sc[k];
    }
}

/* make_qx_quants on one block; returns its scale. */
static float make_qx_quants(int n, int nmax, const float *x, const float *w, uint8_t *L) {
    float scale;
    make_qx_lanes(1, n, nmax, x, w, &scale, L);
    return scale;
}

/* _blockops.make_q3_quants (weights x*x, coordinate descent) on 2*NL blocks of n <= 32 side by
 * side: block k is x + k*n (all present). The descent is a serial chain per block, so two vector
 * groups run interleaved. Writes scale[k] and L in [0, 2*nmax). */
SEARCH static void make_q3_lanes(int n, int nmax, const float *x, float *scale_out, uint8_t *Lout) {
    float xs[2][32][NL], a_mx[2][NL];
    int zero[2 * NL];
    for (int k = 0; k < 2 * NL; k++) {
        const float *xb = x + k * n;
        float amax, mx = first_abs_max(xb, n, &amax);
        zero[k] = amax < GROUP_MAX_EPS;
        a_mx[k / NL][k % NL] = zero[k] ? 1.0f : mx;
        for (int i = 0; i < n; i++) xs[k / NL][i][k % NL] = xb[i];
    }
    vf xt[2][32], w[2][32], wx[2][32], sumlx[2], suml2[2];
    vi L[2][32];
    memcpy(xt, xs, sizeof xt);
    for (int h = 0; h < 2; h++) {
        vf mx;
        memcpy(&mx, a_mx[h], sizeof mx);
        vf iscale = vsplat((float)(-nmax)) / mx;
        sumlx[h] = suml2[h] = vsplat(0.0f);
        for (int i = 0; i < n; i++) {
            L[h][i] = vnearest(iscale * xt[h][i], -nmax, nmax - 1);
            w[h][i] = xt[h][i] * xt[h][i];
            wx[h][i] = w[h][i] * xt[h][i];
            vf lf = __builtin_convertvector(L[h][i], vf);
            sumlx[h] = sumlx[h] + wx[h][i] * lf;
            suml2[h] = suml2[h] + (w[h][i] * lf) * lf;
        }
    }
    for (int it = 0; it < 5; it++) {
        for (int i = 0; i < n; i++) {
            for (int h = 0; h < 2; h++) {
                vf li = __builtin_convertvector(L[h][i], vf);
                vf slx = sumlx[h] - wx[h][i] * li;
                vf sl2 = suml2[h] - (w[h][i] * li) * li;
                vi nl = vnearest((xt[h][i] * sl2) / slx, -nmax, nmax - 1);
                vf nf = __builtin_convertvector(nl, vf);
                vf slx2 = slx + wx[h][i] * nf;
                vf sl22 = sl2 + (w[h][i] * nf) * nf;
                vi take = (slx > 0.0f) & (nl != L[h][i]) & (sl22 > 0.0f) &
                          ((slx2 * slx2) * suml2[h] > (sumlx[h] * sumlx[h]) * sl22);
                L[h][i] = (nl & take) | (L[h][i] & ~take);
                sumlx[h] = vsel(take, slx2, sumlx[h]);
                suml2[h] = vsel(take, sl22, suml2[h]);
            }
        }
    }
    for (int h = 0; h < 2; h++) {
        vf scale = vsel(suml2[h] > 0.0f, sumlx[h] / suml2[h], vsplat(0.0f));
        int32_t a_L[32][NL];
        float a_sc[NL];
        memcpy(a_L, L[h], sizeof(vi) * n);
        memcpy(a_sc, &scale, sizeof a_sc);
        for (int kk = 0; kk < NL; kk++) {
            int k = h * NL + kk;
            for (int i = 0; i < n; i++) Lout[k * n + i] = zero[k] ? 0 : (uint8_t)(a_L[i][kk] + nmax);
            scale_out[k] = zero[k] ? 0.0f : a_sc[kk];
        }
    }
}

/* _blockops.make_qkx (affine scale/min search) on NL blocks side by side, like the torch code
 * does over all blocks: block k is x + k*n, w + k*n, L + k*n (n <= 32). Lanes past nblk repeat
 * block 0 and are dropped. Writes scale[k], the_min[k] (= -min) and L in [0, nmax]. */
SEARCH static void make_qkx(int nblk, int n, const float *x, const float *w, int nmax, float rmin, float rdelta, int nstep,
                     int use_mad, float *scale_out, float *min_out, uint8_t *L) {
    float xs[32][NL], ws[32][NL], a_mn[NL], a_mx[NL], a_sw[NL], a_sx[NL];
    int32_t a_flat[NL];
    for (int k = 0; k < NL; k++) {
        const float *xb = x + (k < nblk ? k : 0) * n, *wb = w + (k < nblk ? k : 0) * n;
        float m = seq_min(xb, n), M = max_val(xb, n);
        if (m > 0.0f) m = 0.0f;
        a_flat[k] = M <= m ? -1 : 0;
        a_mx[k] = M <= m ? m + 1.0f : M;
        a_mn[k] = m;
        float sw = wb[0], sx = wb[0] * xb[0];
        for (int i = 1; i < n; i++) {
            sw = sw + wb[i];
            sx = sx + wb[i] * xb[i];
        }
        a_sw[k] = sw;
        a_sx[k] = sx;
        for (int i = 0; i < n; i++) {
            xs[i][k] = xb[i];
            ws[i][k] = wb[i];
        }
    }
    vf xt[32], wt[32], lt[32], mn, mx, sum_w, sum_x;
    vi flat;
    memcpy(xt, xs, sizeof(vf) * n);
    memcpy(wt, ws, sizeof(vf) * n);
    memcpy(&mn, a_mn, sizeof mn);
    memcpy(&mx, a_mx, sizeof mx);
    memcpy(&sum_w, a_sw, sizeof sum_w);
    memcpy(&sum_x, a_sx, sizeof sum_x);
    memcpy(&flat, a_flat, sizeof flat);
    vf isc = vsplat((float)nmax) / (mx - mn);
    vf scale = vsplat(1.0f) / isc, best = vsplat(0.0f), win_isc = isc, win_off = mn;
    for (int i = 0; i < n; i++) {
        vf l = vcodes(isc * (xt[i] - mn), 0, nmax);
        vf diff = (scale * l + mn) - xt[i];
        diff = use_mad ? vabs(diff) : diff * diff;
        best = best + wt[i] * diff;
    }
    for (int s = 0; s <= nstep; s++) {
        isc = vsplat((rmin + rdelta * (float)s) + (float)nmax) / (mx - mn);
        vf sl = vsplat(0.0f), sl2 = sl, sxl = sl, cur = sl;
        for (int i = 0; i < n; i++) {
            vf l = vcodes(isc * (xt[i] - mn), 0, nmax);
            vf wl = wt[i] * l;
            lt[i] = l;
            sl = sl + wl;
            sl2 = sl2 + wl * l;
            sxl = sxl + wl * xt[i];
        }
        vf D = sum_w * sl2 - sl * sl;
        vf ts = (sum_w * sxl - sum_x * sl) / D;
        vf tm = (sl2 * sum_x - sl * sxl) / D;
        vi clip = tm > 0.0f;
        tm = vsel(clip, vsplat(0.0f), tm);
        ts = vsel(clip, sxl / sl2, ts);
        for (int i = 0; i < n; i++) {
            vf diff = (ts * lt[i] + tm) - xt[i];
            diff = use_mad ? vabs(diff) : diff * diff;
            cur = cur + wt[i] * diff;
        }
        vi take = (D > 0.0f) & (cur < best) & ~flat;
        best = vsel(take, cur, best);
        win_isc = vsel(take, isc, win_isc);
        win_off = vsel(take, mn, win_off);
        scale = vsel(take, ts, scale);
        mn = vsel(take, tm, mn);
    }
    float a_isc[NL], a_off[NL], a_scale[NL];
    memcpy(a_isc, &win_isc, sizeof a_isc);
    memcpy(a_off, &win_off, sizeof a_off);
    memcpy(a_scale, &scale, sizeof a_scale);
    memcpy(a_mn, &mn, sizeof a_mn);
    for (int k = 0; k < nblk; k++) {
        const float *xb = x + k * n;
        for (int i = 0; i < n; i++)
            L[k * n + i] = a_flat[k] ? 0 : (uint8_t)iclamp(nearest_int(a_isc[k] * (xb[i] - a_off[k])), 0, nmax);
        scale_out[k] = a_flat[k] ? 0.0f : a_scale[k];
        min_out[k] = -a_mn[k];
    }
}

/* _blockops.make_qp_quants: non-negative scales to [0, nmax]; L wraps like uint8. */
static float make_qp_quants(int n, int nmax, const float *x, const float *qw, uint8_t *Lout) {
    float mx = max_val(x, n);
    if (!(mx > 0.0f)) mx = 0.0f;
    if (mx < GROUP_MAX_EPS) {
        memset(Lout, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = (float)nmax / mx;
    float scale = 1.0f / iscale;
    float best = 0.0f;
    for (int i = 0; i < n; i++) {
        float d = x[i] - scale * (float)(nearest_int(iscale * x[i]) & 0xFF);
        best = best + (qw[i] * d) * d;
    }
    float isc[8], ssc[8], mse[8];
    for (int k = 0; k < 8; k++) {
        int s = k < 4 ? k - 4 : k - 3;
        isc[k] = (0.1f * (float)s + (float)nmax) / mx;
        ssc[k] = 1.0f / isc[k];
        mse[k] = 0.0f;
    }
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 8; k++) {
            float l = (float)imin(nearest_int(isc[k] * x[i]), nmax);
            float di = x[i] - ssc[k] * l;
            mse[k] = mse[k] + (qw[i] * di) * di;
        }
    for (int k = 0; k < 8; k++) {
        if (mse[k] < best) {
            best = mse[k];
            iscale = isc[k];
        }
    }
    int L[QK_K];
    float wx[QK_K];
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = imin(nearest_int(iscale * x[i]), nmax);
        float lf = (float)l;
        wx[i] = qw[i] * x[i];
        sumlx = sumlx + wx[i] * lf;
        suml2 = suml2 + (qw[i] * lf) * lf;
        L[i] = l & 0xFF;
    }
    for (int it = 0; it < 5; it++) {
        for (int i = 0; i < n; i++) {
            float li = (float)L[i];
            float slx = sumlx - wx[i] * li;
            float sl2 = suml2 - (qw[i] * li) * li;
            if (!(slx > 0.0f && sl2 > 0.0f)) continue;
            int nl = imin(nearest_int((x[i] * sl2) / slx), nmax);
            if (nl == L[i]) continue;
            float nf = (float)nl;
            float slx2 = slx + wx[i] * nf;
            float sl22 = sl2 + (qw[i] * nf) * nf;
            if ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22) {
                L[i] = nl & 0xFF;
                sumlx = slx2;
                suml2 = sl22;
            }
        }
    }
    for (int i = 0; i < n; i++) Lout[i] = (uint8_t)L[i];
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* ------------------------------------------------------------------ legacy types (32 values) */

/* quants._row_weights: qw * sqrt(sigma2 + x*x), sigma2 = mean of x*x over the row. */
static void row_weights(const float *x, int64_t n, const float *qw, float *w) {
    float sigma2 = sum_sq(x, (int)n) / (float)n;
    for (int64_t i = 0; i < n; i++) w[i] = qw[i] * sqrt_f(sigma2 + x[i] * x[i]);
}

static void pack_nibbles(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)(L[j] | (L[j + 16] << 4));
}

static void pack_q5(const uint8_t *L, uint8_t *qh, uint8_t *qs) {
    uint32_t h = 0;
    for (int j = 0; j < 32; j++) h |= (uint32_t)((L[j] >> 4) & 1) << j;
    for (int k = 0; k < 4; k++) qh[k] = (uint8_t)(h >> (8 * k));
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4));
}

/* quants._symmetric_levels without importance: scale d and levels in [0, 2*half). */
static float symmetric_levels(const float *x, int half, uint8_t *L) {
    float mx = first_abs_max(x, QK, NULL);
    float d = mx / -(float)half;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < QK; j++)
        L[j] = (uint8_t)(imin(c_int8_cast(x[j] * id + ((float)half + 0.5f)), 2 * half - 1) & 0xFF);
    return d;
}

/* Q4_1 / Q5_1 without importance: d, m and levels in [0, nmax]. */
static void affine_levels(const float *x, int nmax, int clamp, float *d_out, float *m_out, uint8_t *L) {
    float m = seq_min(x, QK), mx = seq_max(x, QK);
    float d = (mx - m) / (float)nmax;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < QK; j++) {
        int v = c_int8_cast((x[j] - m) * id + 0.5f);
        L[j] = (uint8_t)((clamp ? imin(v, nmax) : v) & 0xFF);
    }
    *d_out = d;
    *m_out = m;
}

/* Q4_0 (half 8, 18-byte blocks) and Q5_0 (half 16, 22-byte blocks). */
SEARCH static void row_symmetric(const float *x, const float *w, int64_t nb, int half, uint8_t *y) {
    uint8_t L[QK * NL];
    float d[NL];
    int ts = half == 8 ? 18 : 22;
    for (int64_t b0 = 0; b0 < nb; b0 += NL) {
        int nblk = nb - b0 < NL ? (int)(nb - b0) : NL;
        if (w) make_qx_lanes(nblk, QK, half, x + b0 * QK, w + b0 * QK, d, L);
        else
            for (int k = 0; k < nblk; k++) d[k] = symmetric_levels(x + (b0 + k) * QK, half, L + k * QK);
        for (int k = 0; k < nblk; k++) {
            uint8_t *yb = y + (b0 + k) * ts;
            put_f16(yb, d[k]);
            if (half == 8) pack_nibbles(L + k * QK, yb + 2);
            else pack_q5(L + k * QK, yb + 2, yb + 6);
        }
    }
}

/* Q4_1 (nmax 15, 20-byte blocks) and Q5_1 (nmax 31, 24-byte blocks). */
SEARCH static void row_affine(const float *x, const float *w, int64_t nb, int nmax, uint8_t *y) {
    uint8_t L[QK * NL];
    float d[NL], m[NL];
    int ts = nmax == 15 ? 20 : 24;
    for (int64_t b0 = 0; b0 < nb; b0 += NL) {
        int nblk = nb - b0 < NL ? (int)(nb - b0) : NL;
        if (w) {
            make_qkx(nblk, QK, x + b0 * QK, w + b0 * QK, nmax, -0.9f, 0.05f, 36, 0, d, m, L);
            for (int k = 0; k < nblk; k++) m[k] = -m[k];
        } else {
            for (int k = 0; k < nblk; k++) affine_levels(x + (b0 + k) * QK, nmax, nmax == 15, &d[k], &m[k], L + k * QK);
        }
        for (int k = 0; k < nblk; k++) {
            uint8_t *yb = y + (b0 + k) * ts;
            put_f16(yb, d[k]);
            put_f16(yb + 2, m[k]);
            if (nmax == 15) pack_nibbles(L + k * QK, yb + 4);
            else pack_q5(L + k * QK, yb + 4, yb + 8);
        }
    }
}

SEARCH static void row_q8_0(const float *x, int64_t nb, uint8_t *y) {
    for (int64_t b = 0; b < nb; b++, y += 34) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        put_f16(y, d);
        for (int j = 0; j < QK; j++) y[2 + j] = (uint8_t)round_int8(xb[j] * id);
    }
}

/* ------------------------------------------------------------------ K-quants (256 values) */

/* kquants weights with an importance matrix: qw * sqrt(sigma2 + x*x), sigma2 = f * sum x*x / 256. */
static void kq_weights(const float *x, const float *qw, float factor, float *w) {
    float sigma2 = factor * sum_sq(x, QK_K) / 256.0f;
    for (int i = 0; i < QK_K; i++) w[i] = qw[i] * sqrt_f(sigma2 + x[i] * x[i]);
}

/* kquants._pack_2bit: byte 32h+l = elements 128h+32k+l at bits 2k. */
static void pack_2bit(const uint8_t *L, uint8_t *q) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *p = L + 128 * h + l;
            q[32 * h + l] = (uint8_t)(p[0] | (p[32] << 2) | (p[64] << 4) | (p[96] << 6));
        }
}

/* kquants._requant over one sub-block: L = clamp(nearest_int((x + dm) / d)) where d != 0. */
VINLINE void requant(const float *x, int n, float d, float dm, int lo, int hi, int *L) {
    if (d == 0.0f) return;
    for (int i = 0; i < n; i += NL) { /* n is a multiple of NL */
        vf v;
        memcpy(&v, x + i, sizeof v);
        vi q = vnearest((v + dm) / d, lo, hi);
        memcpy(L + i, &q, sizeof q);
    }
}

SEARCH static void block_q2_k(const float *x, const float *qw, uint8_t *y) {
    uint8_t Lb[QK_K], byte[16];
    float sc[16], mn[16], d, dmin;
    if (!qw) {
        float ax[QK_K];
        for (int i = 0; i < QK_K; i++) ax[i] = fabsf(x[i]);
        for (int j = 0; j < 16; j += NL) make_qkx(NL, 16, x + 16 * j, ax + 16 * j, 3, -0.5f, 0.1f, 15, 1, sc + j, mn + j, Lb + 16 * j);
        float max_scale = pos_max(sc, 16), max_min = pos_max(mn, 16);
        int has_s = max_scale > 0.0f, has_m = max_min > 0.0f;
        float iscale = has_s ? 15.0f / max_scale : 0.0f;
        float imn = 15.0f / (has_m ? max_min : 1.0f);
        for (int j = 0; j < 16; j++) {
            int ls = has_s ? (nearest_int(iscale * sc[j]) & 0xFF) : 0;
            int lm = has_m ? nearest_int(imn * mn[j]) : 0;
            byte[j] = (uint8_t)((ls | (((unsigned)lm << 4) & 0xFF)) & 0xFF);
        }
        d = has_s ? max_scale / 15.0f : 0.0f;
        dmin = has_m ? max_min / 15.0f : 0.0f;
    } else {
        float w[QK_K], sw[16];
        uint8_t Ls[16], Lm[16];
        kq_weights(x, qw, 1.0f, w);
        for (int j = 0; j < 16; j++) {
            float s = 0.0f;
            for (int i = 0; i < 16; i++) s = s + w[16 * j + i];
            sw[j] = s;
        }
        for (int j = 0; j < 16; j += NL) make_qkx(NL, 16, x + 16 * j, w + 16 * j, 3, -0.9f, 0.05f, 36, 0, sc + j, mn + j, Lb + 16 * j);
        d = make_qp_quants(16, 15, sc, sw, Ls);
        dmin = make_qp_quants(16, 15, mn, sw, Lm);
        for (int j = 0; j < 16; j++) byte[j] = (uint8_t)((Ls[j] | ((Lm[j] << 4) & 0xFF)) & 0xFF);
    }
    float d16 = fp16_round(d), m16 = fp16_round(dmin);
    int L[QK_K];
    uint8_t Lq[QK_K];
    for (int i = 0; i < QK_K; i++) L[i] = Lb[i];
    for (int j = 0; j < 16; j++)
        requant(x + 16 * j, 16, d16 * (float)(byte[j] & 0xF), m16 * (float)(byte[j] >> 4), 0, 3, L + 16 * j);
    for (int i = 0; i < QK_K; i++) Lq[i] = (uint8_t)L[i];
    memcpy(y, byte, 16);
    pack_2bit(Lq, y + 16);
    put_f16(y + 80, d);
    put_f16(y + 82, dmin);
}

/* kquants._pack_scales_q3: sixteen 6-bit values -> 12 bytes. */
static void pack_scales_q3(const int *l, uint8_t *p) {
    for (int j = 0; j < 8; j++) p[j] = (uint8_t)((l[j] & 0xF) | ((l[j + 8] & 0xF) << 4));
    for (int m = 0; m < 4; m++) {
        int v = 0;
        for (int g = 0; g < 4; g++) v |= ((l[4 * g + m] >> 4) & 3) << (2 * g);
        p[8 + m] = (uint8_t)v;
    }
}

SEARCH static void block_q3_k(const float *x, const float *qw, uint8_t *y) {
    uint8_t Lb[QK_K], packed[12];
    float sc[16], d;
    int l[16];
    if (!qw) {
        make_q3_lanes(16, 4, x, sc, Lb);
        float max_scale = first_abs_max(sc, 16, NULL);
        int nz = max_scale != 0.0f;
        float iscale = -32.0f / (nz ? max_scale : 1.0f);
        for (int j = 0; j < 16; j++) l[j] = nz ? iclamp(nearest_int(iscale * sc[j]), -32, 31) + 32 : 0;
        pack_scales_q3(l, packed);
        if (!nz) memset(packed, 0, 12);
        d = nz ? 1.0f / iscale : 0.0f;
    } else {
        float w[QK_K], sw[16];
        uint8_t Ls[16];
        kq_weights(x, qw, 2.0f, w);
        for (int j = 0; j < 16; j++) {
            float s = 0.0f;
            for (int i = 0; i < 16; i++) s = s + w[16 * j + i];
            sw[j] = s;
        }
        for (int j = 0; j < 16; j += NL) make_qx_lanes(NL, 16, 4, x + 16 * j, w + 16 * j, sc + j, Lb + 16 * j);
        d = make_qx_quants(16, 32, sc, sw, Ls);
        for (int j = 0; j < 16; j++) l[j] = Ls[j];
        pack_scales_q3(l, packed);
    }
    /* scales as decoded from the packed bytes */
    float d16 = fp16_round(d);
    int L[QK_K];
    for (int i = 0; i < QK_K; i++) L[i] = (int)Lb[i] - 4;
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? (packed[j] & 0xF) : (packed[j - 8] >> 4);
        int hi = (packed[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        requant(x + 16 * j, 16, d16 * (float)((lo | (hi << 4)) - 32), 0.0f, -4, 3, L + 16 * j);
    }
    uint8_t Lq[QK_K];
    for (int l = 0; l < 32; l++) { /* hmask bit k of byte l: code of element 32k+l > 3 (branch-free) */
        int m = 0;
        for (int k = 0; k < 8; k++) {
            int v = L[32 * k + l] + 4, h = v > 3;
            m |= h << k;
            Lq[32 * k + l] = (uint8_t)(v - 4 * h);
        }
        y[l] = (uint8_t)m;
    }
    pack_2bit(Lq, y + 32);
    memcpy(y + 96, packed, 12);
    put_f16(y + 108, d);
}

/* Q4_K / Q5_K shared part (kquants._q45_scales): writes d, dmin, packed scales; returns codes in L. */
SEARCH static void q45_scales(const float *x, const float *qw, int nmax, float rmin, float rdelta, int nstep, uint8_t *y, int *L) {
    uint8_t Lb[QK_K];
    float sc[8], mn[8], d, dmin;
    int ls[8], lm[8];
    if (!qw) {
        float w[QK_K];
        for (int j = 0; j < 8; j++) {
            const float *xs = x + 32 * j;
            float av = sqrt_f(sum_sq(xs, 32) / 32.0f);
            for (int i = 0; i < 32; i++) w[32 * j + i] = av + fabsf(xs[i]);
        }
        make_qkx(8, 32, x, w, nmax, rmin, rdelta, nstep, 0, sc, mn, Lb);
        float max_scale = pos_max(sc, 8), max_min = pos_max(mn, 8);
        float inv_s = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
        float inv_m = max_min > 0.0f ? 63.0f / max_min : 0.0f;
        for (int j = 0; j < 8; j++) {
            ls[j] = imin(nearest_int(inv_s * sc[j]) & 0xFF, 63);
            lm[j] = imin(nearest_int(inv_m * mn[j]) & 0xFF, 63);
        }
        d = max_scale / 63.0f;
        dmin = max_min / 63.0f;
    } else {
        float w[QK_K], sw[8];
        uint8_t Ls[8], Lm[8];
        kq_weights(x, qw, 2.0f, w);
        for (int j = 0; j < 8; j++) {
            float s = 0.0f;
            for (int i = 0; i < 32; i++) s = s + w[32 * j + i];
            sw[j] = s;
        }
        make_qkx(8, 32, x, w, nmax, -0.9f, 0.05f, 36, 0, sc, mn, Lb);
        d = make_qp_quants(8, 63, sc, sw, Ls);
        dmin = make_qp_quants(8, 63, mn, sw, Lm);
        for (int j = 0; j < 8; j++) {
            ls[j] = nmax == 31 ? imin(Ls[j], 63) : Ls[j];
            lm[j] = nmax == 31 ? imin(Lm[j], 63) : Lm[j];
        }
    }
    uint8_t *p = y + 4;
    for (int j = 0; j < 4; j++) {
        p[j] = (uint8_t)((ls[j] | ((ls[j + 4] >> 4) << 6)) & 0xFF);
        p[j + 4] = (uint8_t)((lm[j] | ((lm[j + 4] >> 4) << 6)) & 0xFF);
        p[j + 8] = (uint8_t)(((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4)) & 0xFF);
    }
    put_f16(y, d);
    put_f16(y + 2, dmin);
    float d16 = fp16_round(d), m16 = fp16_round(dmin);
    for (int i = 0; i < QK_K; i++) L[i] = Lb[i];
    for (int j = 0; j < 8; j++) {
        int s6, m6;
        if (j < 4) {
            s6 = p[j] & 63;
            m6 = p[j + 4] & 63;
        } else {
            s6 = (p[j + 4] & 0xF) | ((p[j - 4] >> 6) << 4);
            m6 = (p[j + 4] >> 4) | ((p[j] >> 6) << 4);
        }
        requant(x + 32 * j, 32, d16 * (float)s6, m16 * (float)m6, 0, nmax, L + 32 * j);
    }
}

static void pack_4bit_pairs(const int *L, uint8_t *q) {
    for (int g = 0; g < 4; g++)
        for (int l = 0; l < 32; l++) q[32 * g + l] = (uint8_t)((L[64 * g + l] & 0xF) | ((L[64 * g + 32 + l] & 0xF) << 4));
}

static void block_q4_k(const float *x, const float *qw, uint8_t *y) {
    int L[QK_K];
    q45_scales(x, qw, 15, -1.0f, 0.1f, 20, y, L);
    pack_4bit_pairs(L, y + 16);
}

static void block_q5_k(const float *x, const float *qw, uint8_t *y) {
    int L[QK_K];
    q45_scales(x, qw, 31, -0.5f, 0.1f, 15, y, L);
    uint8_t *qh = y + 16;
    memset(qh, 0, 32);
    for (int i = 0; i < QK_K; i++) qh[i & 31] |= (uint8_t)(((L[i] >> 4) & 1) << (i >> 5));
    pack_4bit_pairs(L, y + 48);
}

SEARCH static void block_q6_k(const float *x, const float *qw, uint8_t *y) {
    uint8_t Lb[QK_K];
    float sc[16];
    for (int j = 0; j < 16; j += NL) make_qx_lanes(NL, 16, 32, x + 16 * j, qw ? qw + 16 * j : NULL, sc + j, Lb + 16 * j);
    float amax, max_scale = first_abs_max(sc, 16, &amax);
    if (amax < GROUP_MAX_EPS) {
        memset(y, 0, 210);
        return;
    }
    float iscale = -128.0f / max_scale;
    float d = 1.0f / iscale, d16 = fp16_round(d);
    int L[QK_K], s8[16];
    for (int i = 0; i < QK_K; i++) L[i] = (int)Lb[i] - 32;
    for (int j = 0; j < 16; j++) {
        s8[j] = imin(nearest_int(iscale * sc[j]), 127);
        requant(x + 16 * j, 16, d16 * (float)s8[j], 0.0f, -32, 31, L + 16 * j);
    }
    for (int i = 0; i < QK_K; i++) L[i] += 32;
    for (int h = 0; h < 2; h++) {
        const int *Lh = L + 128 * h;
        for (int l = 0; l < 32; l++) {
            y[64 * h + l] = (uint8_t)((Lh[l] & 0xF) | ((Lh[64 + l] & 0xF) << 4));
            y[64 * h + 32 + l] = (uint8_t)((Lh[32 + l] & 0xF) | ((Lh[96 + l] & 0xF) << 4));
            y[128 + 32 * h + l] =
                (uint8_t)((Lh[l] >> 4) | ((Lh[32 + l] >> 4) << 2) | ((Lh[64 + l] >> 4) << 4) | ((Lh[96 + l] >> 4) << 6));
        }
    }
    for (int j = 0; j < 16; j++) y[192 + j] = (uint8_t)(s8[j] & 0xFF);
    put_f16(y + 208, d);
}

/* ------------------------------------------------------------------ IQ4_NL / IQ4_XS */

static const float KVALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const float MIDS[15] = {-231, -187, -148, -114, -84, -57, -32, -9, 14, 38, 63, 91, 122, 158, 202};

/* iquants.best_index: number of doubled midpoints not above v + v (NaN -> 0). */
static inline int best_index(float v) {
    float v2 = v + v; /* branch-free binary search: NaN compares false everywhere -> 0 */
    int i = (MIDS[7] <= v2) << 3;
    i += (MIDS[i + 3] <= v2) << 2;
    i += (MIDS[i + 1] <= v2) << 1;
    return i + (MIDS[i] <= v2);
}

/* iquants._block_scales for one block of 32. */
static float iq4_block_scale(const float *x, const float *w) {
    float amax, mx = first_abs_max(x, 32, &amax);
    if (amax < GROUP_MAX_EPS) return 0.0f;
    float d = -mx / -127.0f;
    float isc[16];
    isc[0] = 1.0f / d;
    for (int t = -7; t <= 7; t++) isc[t + 8] = (float)(t - 127) / mx;
    float best = 0.0f, sa[16] = {0}, sb[16] = {0};
    for (int j = 0; j < 32; j++) /* candidates side by side: same sums, more ILP */
        for (int k = 0; k < 16; k++) {
            float q = KVALUES[best_index(isc[k] * x[j])];
            float wq = w[j] * q;
            sa[k] = sa[k] + wq * x[j];
            sb[k] = sb[k] + wq * q;
        }
    for (int k = 0; k < 16; k++) {
        float a = sa[k], b = sb[k];
        if (k == 0) {
            d = b > 0.0f ? a / b : 0.0f;
            best = d * a;
        } else if (b > 0.0f && a * a > best * b) {
            d = a / b;
            best = d * a;
        }
    }
    return d;
}

static void iq4_weights(const float *x, const float *qw, int n, float *w) {
    if (!qw) {
        for (int i = 0; i < n; i++) w[i] = x[i] * x[i];
        return;
    }
    float sigma2 = sum_sq(x, n) * (2.0f / (float)n);
    for (int i = 0; i < n; i++) w[i] = qw[i] * sqrt_f(sigma2 + x[i] * x[i]);
}

static void iq4_pack(const float *x, float id, uint8_t *q) {
    for (int j = 0; j < 16; j++) q[j] = (uint8_t)(best_index(id * x[j]) | (best_index(id * x[j + 16]) << 4));
}

static void block_iq4_nl(const float *x, const float *qw, uint8_t *y) {
    float w[32];
    iq4_weights(x, qw, 32, w);
    float d = iq4_block_scale(x, w);
    put_f16(y, d);
    iq4_pack(x, d != 0.0f ? 1.0f / d : 0.0f, y + 2);
}

static void block_iq4_xs(const float *x, const float *qw, uint8_t *y) {
    float w[QK_K], sc[8];
    iq4_weights(x, qw, QK_K, w);
    for (int j = 0; j < 8; j++) sc[j] = iq4_block_scale(x + 32 * j, w + 32 * j);
    float max_scale = first_abs_max(sc, 8, NULL);
    float d = -max_scale / 32.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    unsigned sh = 0;
    memset(y + 4, 0, 4);
    for (int j = 0; j < 8; j++) {
        int l = iclamp(nearest_int(id * sc[j]), -32, 31);
        float dl = d * (float)l;
        iq4_pack(x + 32 * j, dl != 0.0f ? 1.0f / dl : 0.0f, y + 8 + 16 * j);
        l += 32;
        y[4 + j / 2] |= (uint8_t)((l & 0xF) << (4 * (j & 1)));
        sh |= (unsigned)(l >> 4) << (2 * j);
    }
    put_f16(y, d);
    y[2] = (uint8_t)(sh & 0xFF);
    y[3] = (uint8_t)((sh >> 8) & 0xFF);
}

/* ------------------------------------------------------------------ IQ2_XXS / IQ2_XS / IQ2_S
 * A port of iq2quants.py. Grids of 8 values with 3 levels per value (256, 512 or 1024 points)
 * are given by native.py (gguf-py's tables, as levels 0..2) through lowbit_set_grid(); the
 * neighbour lists of off-grid level combinations are built here as iq2quants._tables_np builds
 * them: the points at the nwant smallest squared distances, in (distance, index) order. */

#define IQ2_KMAXQ 3

typedef struct {
    int ready, size;
    float pos[2048][8];     /* odd positions 2 * level + 1 */
    int16_t kmap[1 << 16];  /* level code -> point, or -1 */
    int32_t nb_start[1 << 16];
    uint16_t nb_len[1 << 16];
    uint16_t *nb;           /* neighbour lists, concatenated */
} iq_grid;

static iq_grid IQ_GRIDS[4]; /* 256, 512, 1024, 2048 points */
static uint16_t IQ_NB_STORE[4][6561 * 64];

static iq_grid *grid_of(int size) {
    switch (size) {
    case 256: return &IQ_GRIDS[0];
    case 512: return &IQ_GRIDS[1];
    case 1024: return &IQ_GRIDS[2];
    case 2048: return &IQ_GRIDS[3];
    default: return NULL;
    }
}

/* Build a grid from its points' levels (size x 8 values in 0..2); nwant distinct distances per list.
 * Returns 0, or -1 (bad size, or lists too long for the store). Call before quantizing (not thread-safe). */
int lowbit_set_grid(int size, const uint8_t *levels, int nwant) {
    iq_grid *g = grid_of(size);
    if (!g || nwant < 1) return -1;
    if (g->ready) return 0;
    g->size = size;
    g->nb = IQ_NB_STORE[g - IQ_GRIDS];
    for (int u = 0; u < (1 << 16); u++) g->kmap[u] = -1, g->nb_len[u] = 0, g->nb_start[u] = 0;
    for (int k = 0; k < size; k++) {
        int code = 0;
        for (int i = 0; i < 8; i++) {
            code |= levels[8 * k + i] << (2 * i);
            g->pos[k][i] = (float)(2 * levels[8 * k + i] + 1);
        }
        g->kmap[code] = (int16_t)k;
    }
    static int d2[2048]; /* under the caller's one-time initialisation */
    int32_t used = 0;
    for (int c = 0; c < 6561; c++) {
        int l[8], u = 0, rest = c;
        for (int i = 0; i < 8; i++) l[i] = rest % 3, rest /= 3, u |= l[i] << (2 * i);
        if (g->kmap[u] >= 0) continue;
        for (int k = 0; k < size; k++) {
            int s = 0;
            for (int i = 0; i < 8; i++) {
                int d = (int)g->pos[k][i] - (2 * l[i] + 1);
                s += d * d;
            }
            d2[k] = s;
        }
        g->nb_start[u] = used;
        int prev = -1;
        for (int t = 0; t < nwant; t++) { /* the next distinct distance, then its points in index order */
            int next = 1 << 30;
            for (int k = 0; k < size; k++)
                if (d2[k] > prev && d2[k] < next) next = d2[k];
            if (next == 1 << 30) break;
            for (int k = 0; k < size; k++)
                if (d2[k] == next) {
                    if (used >= 6561 * 64) return -1;
                    g->nb[used++] = (uint16_t)k;
                }
            prev = next;
        }
        g->nb_len[u] = (uint16_t)(used - g->nb_start[u]);
    }
    g->ready = 1;
    return 0;
}

/* The grid point of one group of 8 (iq2quants._snap): levels from id * x, an off-grid combination
 * snapped to the neighbour of least sum (w (s p - x))^2 (first of equals; none: the last point). */
static int iq2_snap(const iq_grid *g, const float *x, const float *w, float scale, float id, int *on) {
    int u = 0;
    for (int i = 0; i < 8; i++) u |= iclamp(nearest_int(0.5f * (id * x[i] - 1.0f)), 0, IQ2_KMAXQ - 1) << (2 * i);
    int k = g->kmap[u];
    *on = k >= 0;
    if (k >= 0) return k;
    int best = -1;
    float bestd = INFINITY;
    const uint16_t *nb = g->nb + g->nb_start[u];
    for (int j = 0; j < g->nb_len[u]; j++) {
        const float *p = g->pos[nb[j]];
        float diff = scale * p[0] - x[0];
        float d2 = (w[0] * diff) * diff;
        for (int i = 1; i < 8; i++) {
            diff = scale * p[i] - x[i];
            d2 = d2 + (w[i] * diff) * diff;
        }
        if (d2 < bestd) bestd = d2, best = nb[j];
    }
    return best >= 0 ? best : g->size - 1;
}

#define IQ_ONES (-2) /* no scale was picked: every position 1 (iq2quants._search's ones) */

static inline float iq_pos(const iq_grid *g, int idx, int i) { return idx == IQ_ONES ? 1.0f : g->pos[idx][i]; }

/* iq2quants._search for one sub-block of n values (n / 8 groups): scale candidates
 * (2 kMaxQ - 1 + s / 10) / denom for s in [smin, smax], then a re-snap with the chosen scale
 * (every group when redo_all, else the off-grid ones if any). P: grid index per group. */
SEARCH static float iq2_search(const iq_grid *g, int n, const float *xv, const float *wv, const float *wav, int smin,
                               int smax, float denom, float scale0, int redo_all, int *P, int *flipped) {
    int G = n / 8, idx[4], on[4], ong[4];
    float best = 0.0f, scale = scale0;
    for (int k = 0; k < G; k++) P[k] = IQ_ONES, ong[k] = 1;
    for (int s = smin; s <= smax; s++) {
        float id = (5.0f + (float)s * 0.1f) / denom;
        float ts = 1.0f / id;
        for (int k = 0; k < G; k++) idx[k] = iq2_snap(g, xv + 8 * k, wav + 8 * k, ts, id, &on[k]);
        float a = 0.0f, c = 0.0f;
        for (int i = 0; i < n; i++) {
            float q = g->pos[idx[i / 8]][i % 8];
            a = a + (wv[i] * xv[i]) * q;
            c = c + (wv[i] * q) * q;
        }
        if (c > 0.0f && a * a > best * c) {
            float sc = a / c;
            scale = sc;
            best = sc * a;
            for (int k = 0; k < G; k++) P[k] = idx[k], ong[k] = on[k];
        }
    }
    int off = 0;
    for (int k = 0; k < G; k++) off |= !ong[k];
    if (scale > 0.0f && (redo_all || off)) {
        float id = 1.0f / scale;
        int dummy;
        for (int k = 0; k < G; k++)
            if (redo_all || !ong[k]) P[k] = iq2_snap(g, xv + 8 * k, wav + 8 * k, scale, id, &dummy);
        float a = 0.0f, c = 0.0f;
        for (int i = 0; i < n; i++) {
            float q = iq_pos(g, P[i / 8], i % 8);
            a = a + (wv[i] * xv[i]) * q;
            c = c + (wv[i] * q) * q;
        }
        if (c > 0.0f) scale = a / c;
    }
    *flipped = scale < 0.0f;
    return *flipped ? -scale : scale;
}

/* grid index written for a group (the all-ones positions of an unpicked search: kmap[0]) */
static inline int64_t iq_index(const iq_grid *g, int P) { return P == IQ_ONES ? g->kmap[0] : P; }

/* |x| per group of 8 with its sign bits (iq2quants._signs); parity: an even number of negatives,
 * the value of least (w x) x flipped (the first of equals), 7 bits kept. */
static void iq2_signs(const float *x, const float *w, int parity, float *xval, int *signs) {
    for (int k = 0; k < QK_K / 8; k++) {
        const float *xk = x + 8 * k;
        int s = 0, nneg = 0;
        for (int i = 0; i < 8; i++) {
            int neg = xk[i] < 0.0f;
            xval[8 * k + i] = neg ? -xk[i] : xk[i];
            s |= neg << i;
            nneg += neg;
        }
        if (parity && (nneg & 1)) {
            int im = 0;
            float mn = (w[8 * k] * xk[0]) * xk[0];
            for (int i = 1; i < 8; i++) {
                float v = (w[8 * k + i] * xk[i]) * xk[i];
                if (v < mn) mn = v, im = i;
            }
            xval[8 * k + im] = -xval[8 * k + im];
            s ^= 1 << im;
        }
        signs[k] = parity ? s & 127 : s;
    }
}

/* iq2quants._common: weights qw * sqrt(sigma2 + x^2) (sigma2 = sum x^2 * factor / 256; NULL qw:
 * sigma2 / 4 + x^2, IQ2_S), their roots, and the signs (iq2_signs). */
static void iq2_prepare(const float *x, const float *qw, float factor, int parity, float *w, float *wa, float *xval,
                        int *signs) {
    float sigma2 = (factor * sum_sq(x, QK_K)) / 256.0f;
    for (int i = 0; i < QK_K; i++) {
        w[i] = qw ? qw[i] * sqrt_f(sigma2 + x[i] * x[i]) : sigma2 * 0.25f + x[i] * x[i];
        wa[i] = sqrt_f(w[i]);
    }
    iq2_signs(x, w, parity, xval, signs);
}

static inline float amax_of(const float *v, int n) {
    float m = v[0];
    for (int i = 1; i < n; i++)
        if (v[i] > m) m = v[i];
    return m;
}

/* iq2quants._scale_codes: super-block scale d = max / 31 and 4-bit codes; returns whether max > 0. */
static int iq2_scale_codes(const float *scale, int n, float *d_out, int *ls) {
    float mx = amax_of(scale, n);
    if (!(mx > 0.0f)) mx = 0.0f;
    float d = mx / 31.0f;
    *d_out = d;
    if (!(mx > 0.0f)) {
        for (int i = 0; i < n; i++) ls[i] = 0;
        return 0;
    }
    float idd = 1.0f / d;
    for (int i = 0; i < n; i++) ls[i] = iclamp(nearest_int(0.5f * (idd * scale[i] - 1.0f)), 0, 15);
    return 1;
}

static inline void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void block_iq2_xxs(const float *x, const float *qw, uint8_t *y) {
    const iq_grid *g = &IQ_GRIDS[0];
    float w[QK_K], wa[QK_K], xval[QK_K], scale[8];
    int signs[32], ls[8], P[4];
    int64_t w0[8], w1[8];
    uint8_t L[32];
    iq2_prepare(x, qw, 1.0f, 1, w, wa, xval, signs);
    for (int ib = 0; ib < 8; ib++) {
        const float *xv = xval + 32 * ib, *wv = w + 32 * ib, *wav = wa + 32 * ib;
        w0[ib] = w1[ib] = 0;
        scale[ib] = 0.0f;
        if (amax_of(xv, 32) < GROUP_MAX_EPS) continue;
        float scale0 = make_qp_quants(32, IQ2_KMAXQ + 1, xv, wv, L);
        float eff = scale0 * (float)IQ2_KMAXQ;
        if (eff <= 0.0f) continue;
        int flipped;
        scale[ib] = iq2_search(g, 32, xv, wv, wav, -6, 6, eff, scale0, 1, P, &flipped);
        for (int k = 0; k < 4; k++) {
            int64_t sg = flipped ? (~signs[4 * ib + k]) & 127 : signs[4 * ib + k];
            w0[ib] |= iq_index(g, P[k]) << (8 * k);
            w1[ib] |= sg << (7 * k);
        }
    }
    float d;
    memset(y, 0, 66);
    if (!iq2_scale_codes(scale, 8, &d, ls)) return;
    put_f16(y, d);
    for (int ib = 0; ib < 8; ib++) {
        put_u32(y + 2 + 8 * ib, (uint32_t)w0[ib]);
        put_u32(y + 6 + 8 * ib, (uint32_t)(w1[ib] | ((int64_t)ls[ib] << 28)));
    }
}

static void block_iq2_xs(const float *x, const float *qw, uint8_t *y) {
    const iq_grid *g = &IQ_GRIDS[1];
    float w[QK_K], wa[QK_K], xval[QK_K], scale[16];
    int signs[32], ls[16], P[2];
    int64_t q2[32];
    iq2_prepare(x, qw, 1.0f, 1, w, wa, xval, signs);
    for (int ib = 0; ib < 16; ib++) {
        const float *xv = xval + 16 * ib, *wv = w + 16 * ib, *wav = wa + 16 * ib;
        q2[2 * ib] = q2[2 * ib + 1] = 0;
        scale[ib] = 0.0f;
        float mx = amax_of(xv, 16);
        if (mx < GROUP_MAX_EPS) continue;
        int flipped;
        scale[ib] = iq2_search(g, 16, xv, wv, wav, -9, 9, mx, mx / (float)(2 * IQ2_KMAXQ - 1), 0, P, &flipped);
        for (int k = 0; k < 2; k++) {
            int64_t sg = flipped ? (~signs[2 * ib + k]) & 127 : signs[2 * ib + k];
            q2[2 * ib + k] = iq_index(g, P[k]) | (sg << 9);
        }
    }
    float d;
    memset(y, 0, 74);
    if (!iq2_scale_codes(scale, 16, &d, ls)) return;
    put_f16(y, d);
    for (int k = 0; k < 32; k++) y[2 + 2 * k] = (uint8_t)q2[k], y[3 + 2 * k] = (uint8_t)(q2[k] >> 8);
    for (int j = 0; j < 8; j++) y[66 + j] = (uint8_t)(ls[2 * j] | (ls[2 * j + 1] << 4));
}

static void block_iq2_s(const float *x, const float *qw, uint8_t *y) {
    const iq_grid *g = &IQ_GRIDS[2];
    float w[QK_K], wa[QK_K], xval[QK_K], scale[16];
    int signs[32], ls[16], P[2];
    int64_t gidx[32], sg[32];
    iq2_prepare(x, qw, 2.0f, 0, w, wa, xval, signs);
    for (int ib = 0; ib < 16; ib++) {
        const float *xv = xval + 16 * ib, *wv = w + 16 * ib, *wav = wa + 16 * ib;
        gidx[2 * ib] = gidx[2 * ib + 1] = sg[2 * ib] = sg[2 * ib + 1] = 0;
        scale[ib] = 0.0f;
        float mx = amax_of(xv, 16);
        if (mx < 1e-8f) continue;
        int flipped;
        scale[ib] = iq2_search(g, 16, xv, wv, wav, -9, 9, mx, mx / (float)(2 * IQ2_KMAXQ - 1), 0, P, &flipped);
        for (int k = 0; k < 2; k++) {
            sg[2 * ib + k] = flipped ? (~signs[2 * ib + k]) & 255 : signs[2 * ib + k];
            gidx[2 * ib + k] = iq_index(g, P[k]);
        }
    }
    float d;
    int has = iq2_scale_codes(scale, 16, &d, ls);
    put_f16(y, d * 0.9875f);
    for (int k = 0; k < 32; k++) y[2 + k] = (uint8_t)gidx[k], y[34 + k] = (uint8_t)sg[k];
    for (int j = 0; j < 8; j++) {
        int64_t h = 0;
        for (int t = 0; t < 4; t++) h |= (gidx[4 * j + t] >> 8) << (2 * t);
        y[66 + j] = (uint8_t)h;
        y[74 + j] = has ? (uint8_t)(ls[2 * j] | (ls[2 * j + 1] << 4)) : 0;
    }
}

/* ------------------------------------------------------------------ IQ3_XXS / IQ3_S
 * A port of iq3quants.py: grids of 4 values with 8 levels (256 or 512 points), given by native.py
 * through lowbit_set_grid3(); neighbour lists for every off-grid 12-bit level code, built as
 * iq3quants._tables_np builds them. */

#define IQ3_KMAXQ 8

typedef struct {
    int ready, size;
    float pos[512][4];
    int16_t kmap[4096];
    int32_t nb_start[4096];
    uint16_t nb_len[4096];
    uint16_t nb[4096 * 64];
} iq3_grid;

static iq3_grid IQ3_GRIDS[2]; /* 256, 512 points */

/* Build a grid from its points' levels (size x 4 values in 0..7). Returns 0 or -1. Not thread-safe. */
int lowbit_set_grid3(int size, const uint8_t *levels, int nwant) {
    iq3_grid *g = size == 256 ? &IQ3_GRIDS[0] : size == 512 ? &IQ3_GRIDS[1] : NULL;
    if (!g || nwant < 1) return -1;
    if (g->ready) return 0;
    g->size = size;
    for (int u = 0; u < 4096; u++) g->kmap[u] = -1, g->nb_len[u] = 0, g->nb_start[u] = 0;
    for (int k = 0; k < size; k++) {
        int code = 0;
        for (int i = 0; i < 4; i++) {
            code |= levels[4 * k + i] << (3 * i);
            g->pos[k][i] = (float)(2 * levels[4 * k + i] + 1);
        }
        g->kmap[code] = (int16_t)k;
    }
    int d2[512];
    int32_t used = 0;
    for (int u = 0; u < 4096; u++) {
        if (g->kmap[u] >= 0) continue;
        for (int k = 0; k < size; k++) {
            int s = 0;
            for (int i = 0; i < 4; i++) {
                int d = (int)g->pos[k][i] - (2 * ((u >> (3 * i)) & 7) + 1);
                s += d * d;
            }
            d2[k] = s;
        }
        g->nb_start[u] = used;
        int prev = -1;
        for (int t = 0; t < nwant; t++) {
            int next = 1 << 30;
            for (int k = 0; k < size; k++)
                if (d2[k] > prev && d2[k] < next) next = d2[k];
            if (next == 1 << 30) break;
            for (int k = 0; k < size; k++)
                if (d2[k] == next) {
                    if (used >= 4096 * 64) return -1;
                    g->nb[used++] = (uint16_t)k;
                }
            prev = next;
        }
        g->nb_len[u] = (uint16_t)(used - g->nb_start[u]);
    }
    g->ready = 1;
    return 0;
}

static int iq3_snap(const iq3_grid *g, const float *x, const float *w, float scale, float id, int *on) {
    int u = 0;
    for (int i = 0; i < 4; i++) u |= iclamp(nearest_int(0.5f * (id * x[i] - 1.0f)), 0, IQ3_KMAXQ - 1) << (3 * i);
    int k = g->kmap[u];
    *on = k >= 0;
    if (k >= 0) return k;
    int best = -1;
    float bestd = INFINITY;
    const uint16_t *nb = g->nb + g->nb_start[u];
    for (int j = 0; j < g->nb_len[u]; j++) {
        const float *p = g->pos[nb[j]];
        float diff = scale * p[0] - x[0];
        float d2 = (w[0] * diff) * diff;
        for (int i = 1; i < 4; i++) {
            diff = scale * p[i] - x[i];
            d2 = d2 + (w[i] * diff) * diff;
        }
        if (d2 < bestd) bestd = d2, best = nb[j];
    }
    return best >= 0 ? best : g->size - 1;
}

static inline float iq3_pos(const iq3_grid *g, int idx, int i) { return idx == IQ_ONES ? 1.0f : g->pos[idx][i]; }

/* iq3quants._search for one sub-block of 32 (8 groups of 4). zero: the sub-block is empty
 * (its scale search still runs, on max 1, as in torch; the caller drops the result). */
SEARCH static float iq3_search(const iq3_grid *g, const float *xv, const float *wv, const float *wav, int zero,
                               int smin, int smax, int on_grid_init, int redo_all, int *P, int *flipped) {
    int idx[8], on[8], ong[8];
    float mx = amax_of(xv, 32);
    float mxs = zero ? 1.0f : mx;
    float best = 0.0f, scale = mxs / (float)(2 * IQ3_KMAXQ - 1);
    for (int k = 0; k < 8; k++) P[k] = IQ_ONES, ong[k] = on_grid_init;
    for (int s = smin; s <= smax; s++) {
        float id = (15.0f + (float)s * 0.2f) / mxs;
        float ts = 1.0f / id;
        for (int k = 0; k < 8; k++) idx[k] = iq3_snap(g, xv + 4 * k, wav + 4 * k, ts, id, &on[k]);
        float a = 0.0f, c = 0.0f;
        for (int i = 0; i < 32; i++) {
            float q = g->pos[idx[i / 4]][i % 4];
            a = a + (wv[i] * xv[i]) * q;
            c = c + (wv[i] * q) * q;
        }
        if (c > 0.0f && a * a > best * c) {
            float sc = a / c;
            scale = sc;
            best = sc * a;
            for (int k = 0; k < 8; k++) P[k] = idx[k], ong[k] = on[k];
        }
    }
    int off = 0;
    for (int k = 0; k < 8; k++) off |= !ong[k];
    if (off && scale > 0.0f) {
        float id = 1.0f / scale;
        int dummy;
        for (int k = 0; k < 8; k++)
            if (redo_all || !ong[k]) P[k] = iq3_snap(g, xv + 4 * k, wav + 4 * k, scale, id, &dummy);
        float a = 0.0f, c = 0.0f;
        for (int i = 0; i < 32; i++) {
            float q = iq3_pos(g, P[i / 4], i % 4);
            a = a + (wv[i] * xv[i]) * q;
            c = c + (wv[i] * q) * q;
        }
        if (c > 0.0f) scale = a / c;
    }
    *flipped = scale < 0.0f;
    return *flipped ? -scale : scale;
}

static inline int64_t iq3_index(const iq3_grid *g, int P) { return P == IQ_ONES ? g->kmap[0] : P; }

/* iq3quants._weights and their roots */
static void iq3_weights(const float *x, const float *qw, float *w, float *wa) {
    float sigma2 = qw ? (2.0f * sum_sq(x, QK_K)) / 256.0f : 0.0f;
    for (int i = 0; i < QK_K; i++) {
        w[i] = qw ? qw[i] * sqrt_f(sigma2 + x[i] * x[i]) : x[i] * x[i];
        wa[i] = sqrt_f(w[i]);
    }
}

static void block_iq3_xxs(const float *x, const float *qw, uint8_t *y) {
    const iq3_grid *g = &IQ3_GRIDS[0];
    float w[QK_K], wa[QK_K], xval[QK_K], scale[8];
    int signs[32], ls[8], P[8];
    int64_t word[8], gidx[64];
    iq3_weights(x, qw, w, wa);
    iq2_signs(x, w, 1, xval, signs);
    for (int ib = 0; ib < 8; ib++) {
        const float *xv = xval + 32 * ib;
        word[ib] = 0;
        scale[ib] = 0.0f;
        for (int k = 0; k < 8; k++) gidx[8 * ib + k] = 0;
        if (amax_of(xv, 32) < 1e-8f) continue; /* empty: zeros */
        int flipped;
        scale[ib] = iq3_search(g, xv, w + 32 * ib, wa + 32 * ib, 0, -15, 15, 1, 0, P, &flipped);
        for (int k = 0; k < 8; k++) gidx[8 * ib + k] = iq3_index(g, P[k]);
        for (int k = 0; k < 4; k++) {
            int64_t sg = flipped ? (~signs[4 * ib + k]) & 127 : signs[4 * ib + k];
            word[ib] |= sg << (7 * k);
        }
    }
    float d;
    memset(y, 0, 98);
    if (!iq2_scale_codes(scale, 8, &d, ls)) return;
    put_f16(y, d * 1.0125f);
    for (int k = 0; k < 64; k++) y[2 + k] = (uint8_t)gidx[k];
    for (int ib = 0; ib < 8; ib++) put_u32(y + 66 + 4 * ib, (uint32_t)(word[ib] | ((int64_t)ls[ib] << 28)));
}

static void block_iq3_s(const float *x, const float *qw, uint8_t *y) {
    const iq3_grid *g = &IQ3_GRIDS[1];
    float w[QK_K], wa[QK_K], xval[QK_K], scale[8];
    int signs[32], ls[8], P[8];
    iq3_weights(x, qw, w, wa);
    iq2_signs(x, w, 0, xval, signs);
    memset(y, 0, 110);
    int slot = 0;
    for (int ib = 0; ib < 8; ib++) {
        const float *xv = xval + 32 * ib;
        scale[ib] = 0.0f;
        if (amax_of(xv, 32) == 0.0f) continue; /* llama.cpp moves its qs / signs position only after a non-empty sub-block */
        int flipped;
        scale[ib] = iq3_search(g, xv, w + 32 * ib, wa + 32 * ib, 0, -9, 9, 0, 1, P, &flipped);
        int64_t qh = 0;
        for (int k = 0; k < 8; k++) {
            int64_t gi = iq3_index(g, P[k]);
            y[2 + 8 * slot + k] = (uint8_t)gi;
            qh += (gi >> 8) << k;
        }
        y[66 + ib] = (uint8_t)qh;
        for (int k = 0; k < 4; k++) y[74 + 4 * slot + k] = (uint8_t)(flipped ? (~signs[4 * ib + k]) & 255 : signs[4 * ib + k]);
        slot++;
    }
    float d;
    int has = iq2_scale_codes(scale, 8, &d, ls);
    put_f16(y, d * 1.033f);
    for (int j = 0; j < 4; j++) y[106 + j] = has ? (uint8_t)(ls[2 * j] | (ls[2 * j + 1] << 4)) : 0;
}

/* ------------------------------------------------------------------ IQ1_S / IQ1_M
 * A port of iq1quants.py: the 2048-point ternary grid (IQ_GRIDS[3], neighbours at the three
 * smallest distances), each block of 32 (IQ1_S) or 16 (IQ1_M) values sorted (stably), every split
 * of the sorted values into the three levels scored for each shift, off-grid groups snapped. */

static const float IQ1_XP[3] = {-1.0f + 0.125f, 0.125f, 1.0f + 0.125f};
static const float IQ1_XM[3] = {-1.0f - 0.125f, -0.125f, 1.0f - 0.125f};

/* order of n values by a stable ascending sort (ties keep their order) */
static void stable_order(const float *x, int n, int *order) {
    for (int i = 0; i < n; i++) {
        int j = i;
        while (j > 0 && x[i] < x[order[j - 1]]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
}

/* iq1 snap of one group of 8 with levels L (0..2): the grid point, or the neighbour of least
 * sum (w (s v - x))^2 with v the level values xx of the candidate (iq1_find_best_neighbour2). */
static int iq1_snap(const iq_grid *g, const int *L, const float *x, const float *w, float scale, const float *xx,
                    int *on) {
    int u = 0;
    for (int i = 0; i < 8; i++) u |= L[i] << (2 * i);
    int k = g->kmap[u];
    *on = k >= 0;
    if (k >= 0) return k;
    int best = -1;
    float bestd = INFINITY;
    const uint16_t *nb = g->nb + g->nb_start[u];
    for (int j = 0; j < g->nb_len[u]; j++) {
        const float *p = g->pos[nb[j]];
        float diff = scale * xx[(int)((p[0] - 1.0f) * 0.5f)] - x[0];
        float d2 = (w[0] * diff) * diff;
        for (int i = 1; i < 8; i++) {
            diff = scale * xx[(int)((p[i] - 1.0f) * 0.5f)] - x[i];
            d2 = d2 + (w[i] * diff) * diff;
        }
        if (d2 < bestd) bestd = d2, best = nb[j];
    }
    return best; /* -1: none (torch keeps -1 and reads the levels of point 0) */
}

static inline int iq1_level(const iq_grid *g, int idx, int i) { return (int)((g->pos[idx < 0 ? 0 : idx][i] - 1.0f) * 0.5f); }

SEARCH static void block_iq1_s(const float *x, const float *qw, uint8_t *y) {
    const iq_grid *g = &IQ_GRIDS[3];
    float w[QK_K], scale[8];
    int64_t index[32];
    int shift[8], ls[8];
    float sigma2 = (2.0f * sum_sq(x, QK_K)) / 256.0f;
    for (int i = 0; i < QK_K; i++) w[i] = qw[i] * sqrt_f(sigma2 + x[i] * x[i]);
    for (int ib = 0; ib < 8; ib++) {
        const float *xb = x + 32 * ib, *wb = w + 32 * ib;
        float mx = 0.0f;
        for (int i = 0; i < 32; i++) mx = fabsf(xb[i]) > mx ? fabsf(xb[i]) : mx;
        int order[32], L[32];
        stable_order(xb, 32, order);
        float sx[33], sw[33];
        sx[0] = sw[0] = 0.0f;
        for (int j = 0; j < 32; j++) {
            sx[j + 1] = sx[j] + wb[order[j]] * xb[order[j]];
            sw[j + 1] = sw[j] + wb[order[j]];
        }
        float best = -3.4028234663852886e38f, sc = mx;
        int p1 = -1, p2 = -1, sh = 0;
        for (int i1 = 0; i1 <= 32; i1++)
            for (int i2 = i1; i2 <= 32; i2++)
                for (int t = 0; t < 2; t++) {
                    const float *xs = t == 0 ? IQ1_XP : IQ1_XM;
                    float a = sx[i1] - sx[0], b = sx[i2] - sx[i1], c = sx[32] - sx[i2];
                    float qx = (a * xs[0] + b * xs[1]) + c * xs[2];
                    float aw = sw[i1] - sw[0], bw = sw[i2] - sw[i1], cw = sw[32] - sw[i2];
                    float q2 = ((aw * xs[0]) * xs[0] + (bw * xs[1]) * xs[1]) + (cw * xs[2]) * xs[2];
                    if (q2 > 0.0f && qx * qx > best * q2) {
                        float s = qx / q2;
                        sc = s;
                        best = s * qx;
                        p1 = i1, p2 = i2, sh = t == 0 ? 1 : -1;
                    }
                }
        int empty = mx < 1e-12f || p1 < 0;
        if (p1 < 0) p1 = p2 = 0, sh = 0; /* torch: pick 0's split, shift 0 */
        for (int r = 0; r < 32; r++) L[order[r]] = r < p1 ? 0 : (r < p2 ? 1 : 2);
        if (sc < 0.0f) {
            for (int i = 0; i < 32; i++) L[i] = 2 - L[i];
            sc = -sc;
            sh = -sh;
        }
        const float *xx = sh == 1 ? IQ1_XP : IQ1_XM;
        int idx[4], on[4], off = 0;
        for (int k = 0; k < 4; k++) {
            idx[k] = iq1_snap(g, L + 8 * k, xb + 8 * k, wb + 8 * k, sc, xx, &on[k]);
            off |= !on[k];
        }
        float sqx = 0.0f, sq2 = 0.0f;
        for (int i = 0; i < 32; i++) {
            float q = xx[iq1_level(g, idx[i / 8], i % 8)];
            sqx = sqx + (wb[i] * q) * xb[i];
            sq2 = sq2 + (wb[i] * q) * q;
        }
        if (off && sqx > 0.0f && sq2 > 0.0f) sc = sqx / sq2;
        for (int k = 0; k < 4; k++) index[4 * ib + k] = empty ? 0 : idx[k];
        scale[ib] = empty ? 0.0f : sc;
        shift[ib] = empty ? 1 : sh;
    }
    float mxs = amax_of(scale, 8);
    if (!(mxs > 0.0f)) mxs = 0.0f;
    int has = mxs > 0.0f;
    float d = mxs / 15.0f, idd = has ? 1.0f / d : 1.0f;
    for (int ib = 0; ib < 8; ib++) {
        ls[ib] = iclamp(nearest_int(0.5f * (idd * scale[ib] - 1.0f)), 0, 7);
        if (shift[ib] == -1) ls[ib] |= 8;
        if (!has) ls[ib] = 0;
    }
    put_f16(y, d * 1.125f);
    for (int k = 0; k < 32; k++) y[2 + k] = (uint8_t)index[k];
    for (int ib = 0; ib < 8; ib++) {
        int64_t h = 0;
        for (int k = 0; k < 4; k++) h |= (index[4 * ib + k] >> 8) << (3 * k);
        int64_t qh = h | ((int64_t)ls[ib] << 12);
        y[34 + 2 * ib] = (uint8_t)(qh & 0xFF);
        y[35 + 2 * ib] = (uint8_t)((qh >> 8) & 0xFF);
    }
}


SEARCH static void block_iq1_m(const float *x, const float *qw, uint8_t *y) {
    const iq_grid *g = &IQ_GRIDS[3];
    float w[QK_K], scale[16];
    int64_t index[32];
    int shifts[16], ls[16], lvs[QK_K];
    const float *xxs[32];
    const float cp1 = 0.75f, cp2 = -1.25f, cm1 = 1.25f, cm2 = -0.75f, p2c = 1.125f, m2c = 0.875f;
    float sigma2 = (2.0f * sum_sq(x, QK_K)) / 256.0f;
    for (int i = 0; i < QK_K; i++) w[i] = qw ? qw[i] * sqrt_f(sigma2 + x[i] * x[i]) : x[i] * x[i];
    for (int ib = 0; ib < 16; ib++) {
        const float *xb = x + 16 * ib, *wb = w + 16 * ib;
        float mx = 0.0f;
        for (int i = 0; i < 16; i++) mx = fabsf(xb[i]) > mx ? fabsf(xb[i]) : mx;
        int order[16], L[16];
        stable_order(xb, 16, order);
        float px[2][17], pw[2][17];
        px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0.0f;
        for (int j = 0; j < 16; j++) {
            int o = order[j], h = o >= 8;
            px[h][j + 1] = px[h][j] + wb[o] * xb[o];
            pw[h][j + 1] = pw[h][j] + wb[o];
            px[1 - h][j + 1] = px[1 - h][j];
            pw[1 - h][j + 1] = pw[1 - h][j];
        }
        float best = -3.4028234663852886e38f, sc = mx;
        int p1 = -1, p2 = -1, bk = -1;
        for (int i1 = 0; i1 <= 16; i1++)
            for (int i2 = i1; i2 <= 16; i2++) {
                float hx[2][2], hq[2][2]; /* [half][p, m] */
                for (int h = 0; h < 2; h++) {
                    float sx = px[h][i1] + px[h][i2], t = pw[h][16];
                    hx[h][0] = px[h][16] * p2c - sx;
                    hx[h][1] = px[h][16] * m2c - sx;
                    hq[h][0] = ((t * p2c) * p2c + pw[h][i1] * cp1) + pw[h][i2] * cp2;
                    hq[h][1] = ((t * m2c) * m2c + pw[h][i1] * cm1) + pw[h][i2] * cm2;
                }
                for (int k = 0; k < 4; k++) {
                    float a = hx[0][k >> 1] + hx[1][k & 1], c = hq[0][k >> 1] + hq[1][k & 1];
                    if (c > 0.0f && a * a > best * c) {
                        float s = a / c;
                        sc = s;
                        best = s * a;
                        p1 = i1, p2 = i2, bk = k;
                    }
                }
            }
        int empty = mx < 1e-7f || p1 < 0;
        if (p1 < 0) p1 = p2 = 0;
        for (int r = 0; r < 16; r++) L[order[r]] = r < p1 ? 0 : (r < p2 ? 1 : 2);
        if (sc < 0.0f) {
            for (int i = 0; i < 16; i++) L[i] = 2 - L[i];
            sc = -sc;
            bk = 3 - bk;
        }
        const float *xx[2] = {bk < 2 ? IQ1_XP : IQ1_XM, bk % 2 == 0 ? IQ1_XP : IQ1_XM};
        int idx[2], on[2];
        for (int k = 0; k < 2; k++) idx[k] = iq1_snap(g, L + 8 * k, xb + 8 * k, wb + 8 * k, sc, xx[k], &on[k]);
        float sqx = 0.0f, sq2 = 0.0f;
        for (int i = 0; i < 16; i++) {
            int lv = iq1_level(g, idx[i / 8], i % 8);
            float q = xx[i / 8][lv];
            sqx = sqx + (wb[i] * q) * xb[i];
            sq2 = sq2 + (wb[i] * q) * q;
            lvs[16 * ib + i] = empty ? iq1_level(g, 0, i % 8) : lv;
        }
        if ((!on[0] || !on[1]) && sqx > 0.0f && sq2 > 0.0f) sc = sqx / sq2;
        for (int k = 0; k < 2; k++) {
            index[2 * ib + k] = empty ? 0 : idx[k];
            xxs[2 * ib + k] = empty ? IQ1_XP : xx[k];
        }
        shifts[ib] = empty ? 0 : bk;
        scale[ib] = empty ? 0.0f : sc;
    }
    float mxs = amax_of(scale, 16);
    if (!(mxs > 0.0f)) mxs = 0.0f;
    int has = mxs > 0.0f;
    float d = mxs / 15.0f, idd = has ? 1.0f / d : 1.0f;
    static const int masks[4] = {0x00, 0x80, 0x08, 0x88};
    for (int ib = 0; ib < 16; ib++) {
        ls[ib] = iclamp(nearest_int(0.5f * (idd * scale[ib] - 1.0f)), 0, 7);
        int64_t qh = (index[2 * ib] >> 8) | ((index[2 * ib + 1] >> 8) << 4);
        if (has) qh |= masks[shifts[ib]];
        y[32 + ib] = (uint8_t)qh;
    }
    float fx = 0.0f, f2 = 0.0f;
    for (int i = 0; i < QK_K; i++) {
        float q = xxs[i / 8][lvs[i]] * (float)(2 * ls[i / 16] + 1);
        fx = fx + (w[i] * q) * x[i];
        f2 = f2 + (w[i] * q) * q;
    }
    float dfin = f2 > 0.0f ? fx / f2 : d;
    int64_t dbits = fp32_to_fp16(dfin * 1.1125f);
    for (int k = 0; k < 32; k++) y[k] = (uint8_t)index[k];
    for (int j = 0; j < 4; j++) {
        int64_t sc = ls[4 * j] | (ls[4 * j + 1] << 3) | (ls[4 * j + 2] << 6) | (ls[4 * j + 3] << 9);
        sc |= j == 0 ? (dbits & 0x000F) << 12 : j == 1 ? (dbits & 0x00F0) << 8 : j == 2 ? (dbits & 0x0F00) << 4 : dbits & 0xF000;
        if (!has) sc = 0;
        y[48 + 2 * j] = (uint8_t)(sc & 0xFF);
        y[49 + 2 * j] = (uint8_t)((sc >> 8) & 0xFF);
    }
}

/* ------------------------------------------------------------------ entry point */

/* GGML type ids (gguf.GGMLQuantizationType) */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q2_K = 10, T_Q3_K = 11,
       T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ2_XXS = 16, T_IQ2_XS = 17, T_IQ3_XXS = 18, T_IQ1_S = 19, T_IQ4_NL = 20, T_IQ3_S = 21, T_IQ2_S = 22,
       T_IQ4_XS = 23, T_IQ1_M = 29 };

typedef void (*block_fn)(const float *, const float *, uint8_t *);

/* max |x| as float bits (|x| bit patterns order like their values, NaN above inf) */
static uint32_t absmax_bits(const float *x, int64_t n) {
    uint32_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t a;
        memcpy(&a, x + i, 4);
        a &= 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    return m;
}

/* Every type implemented here: block function (NULL: the legacy row functions below), values per
 * block, bytes per block. */
typedef struct {
    int type;
    block_fn fn;
    int bs, ts;
} type_layout;

static const type_layout LAYOUTS[] = {
    {T_Q4_0, NULL, QK, 18},           {T_Q4_1, NULL, QK, 20},          {T_Q5_0, NULL, QK, 22},
    {T_Q5_1, NULL, QK, 24},           {T_Q8_0, NULL, QK, 34},          {T_Q2_K, block_q2_k, QK_K, 84},
    {T_Q3_K, block_q3_k, QK_K, 110},  {T_Q4_K, block_q4_k, QK_K, 144}, {T_Q5_K, block_q5_k, QK_K, 176},
    {T_Q6_K, block_q6_k, QK_K, 210},  {T_IQ4_NL, block_iq4_nl, QK, 18}, {T_IQ4_XS, block_iq4_xs, QK_K, 136},
    {T_IQ2_XXS, block_iq2_xxs, QK_K, 66}, {T_IQ2_XS, block_iq2_xs, QK_K, 74}, {T_IQ2_S, block_iq2_s, QK_K, 82},
    {T_IQ3_XXS, block_iq3_xxs, QK_K, 98}, {T_IQ3_S, block_iq3_s, QK_K, 110},
    {T_IQ1_S, block_iq1_s, QK_K, 50},     {T_IQ1_M, block_iq1_m, QK_K, 56},
};

/* Whether the grid a type needs is set (lowbit_set_grid / lowbit_set_grid3); whether it needs an importance matrix. */
static int grid_ready(int type) {
    switch (type) {
    case T_IQ2_XXS: return IQ_GRIDS[0].ready;
    case T_IQ2_XS: return IQ_GRIDS[1].ready;
    case T_IQ2_S: return IQ_GRIDS[2].ready;
    case T_IQ3_XXS: return IQ3_GRIDS[0].ready;
    case T_IQ3_S: return IQ3_GRIDS[1].ready;
    case T_IQ1_S:
    case T_IQ1_M: return IQ_GRIDS[3].ready;
    default: return 1;
    }
}

static int needs_imatrix(int type) { return type == T_IQ2_XXS || type == T_IQ2_XS || type == T_IQ1_S; }

static const type_layout *layout_of(int type) {
    for (size_t i = 0; i < sizeof LAYOUTS / sizeof LAYOUTS[0]; i++)
        if (LAYOUTS[i].type == type) return &LAYOUTS[i];
    return NULL;
}

/* float16 -> float32 of one row (exact either way); F16C where the CPU has it. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(LOWBIT_NO_CLONES)
#include <immintrin.h>
__attribute__((target("avx,f16c"))) static void f16_row_f16c(const uint16_t *h, float *f, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) f[i] = fp16_to_fp32(h[i]);
}
#define HAVE_F16C_PATH 1
#endif

static void f16_row(const uint16_t *h, float *f, int64_t n) {
#ifdef HAVE_F16C_PATH
    if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) {
        f16_row_f16c(h, f, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) f[i] = fp16_to_fp32(h[i]);
}

/* Bumped whenever an exported signature or the bytes of a type change (native.py checks it). */
int lowbit_abi_version(void) { return 3; }

/* Whether a type is implemented here (1) or not (0). */
int lowbit_supports(int type) { return layout_of(type) != NULL; }

/* Quantize rows [nrows, ncols] of float32 x (importance qw [ncols] or NULL) into y.
 * work: ncols floats of scratch (legacy types with qw). *absmax: max |x| (NaN if x holds a NaN;
 * such input gives meaningless bytes). Returns 0, -1 for an unknown type, or -2 for an IQ type whose
 * grid was not set (lowbit_set_grid) or that needs an importance matrix and got none. */
int lowbit_quantize(int type, const float *x, int64_t nrows, int64_t ncols, const float *qw, uint8_t *y, float *work,
                    float *absmax) {
    const type_layout *L = layout_of(type);
    if (!L) return -1;
    if (!grid_ready(type) || (!qw && needs_imatrix(type))) return -2; /* the torch path says why */
    uint32_t amax_bits = 0;
    block_fn fn = L->fn;
    int bs = L->bs, ts = L->ts;
    int64_t nb = ncols / bs;
    for (int64_t r = 0; r < nrows; r++) {
        const float *xr = x + r * ncols;
        uint8_t *yr = y + r * nb * ts;
        uint32_t m = absmax_bits(xr, ncols); /* while the row is in cache */
        amax_bits = m > amax_bits ? m : amax_bits;
        if (fn) {
            for (int64_t b = 0; b < nb; b++) fn(xr + b * bs, qw ? qw + b * bs : NULL, yr + b * ts);
            continue;
        }
        const float *w = NULL;
        if (qw && type != T_Q8_0) {
            row_weights(xr, ncols, qw, work);
            w = work;
        }
        switch (type) {
        case T_Q4_0: row_symmetric(xr, w, nb, 8, yr); break;
        case T_Q4_1: row_affine(xr, w, nb, 15, yr); break;
        case T_Q5_0: row_symmetric(xr, w, nb, 16, yr); break;
        case T_Q5_1: row_affine(xr, w, nb, 31, yr); break;
        default: row_q8_0(xr, nb, yr); break;
        }
    }
    memcpy(absmax, &amax_bits, 4);
    return 0;
}

/* lowbit_quantize() for float16 input: each row is widened into xbuf (ncols floats) while it
 * is in cache, so no float32 copy of the tensor is ever made. Same bytes as widening first. */
int lowbit_quantize_f16(int type, const uint16_t *x, int64_t nrows, int64_t ncols, const float *qw, uint8_t *y,
                        float *work, float *xbuf, float *absmax) {
    const type_layout *L = layout_of(type);
    if (!L) return -1;
    int64_t rb = ncols / L->bs * L->ts;
    uint32_t amax_bits = 0;
    for (int64_t r = 0; r < nrows; r++) {
        float m;
        uint32_t mb;
        f16_row(x + r * ncols, xbuf, ncols);
        if (lowbit_quantize(type, xbuf, 1, ncols, qw, y + r * rb, work, &m)) return -1;
        memcpy(&mb, &m, 4);
        amax_bits = mb > amax_bits ? mb : amax_bits;
    }
    memcpy(absmax, &amax_bits, 4);
    return 0;
}
