/* Weight-only int8 linear layer for the CPU, for decode-sized calls (a few rows).

   y[M, N] = (x[M, K] . w[N, K]^T) * scale[N] (+ bias), with w int8 row-major (one row per
   output channel, as Int8Linear stores it) and x, y, bias in float32 or bfloat16 (summed in
   float32, rounded once; see q8_linear at the end). Products of a bfloat16 input and
   an int8 weight are exact in float32; only the order of the sums rounds, and that order is
   fixed per output (64 inputs at a time, then the tail), so a row gets the same result
   whatever else is in the call.

   torch's _weight_int8pack_mm streams int8 weights at 13-15 GB/s here (AMD EPYC, AVX-512);
   this reads 64 weights per load and sums them as a small tree, and streams at 22-28 GB/s
   for 896-wide inputs. On a CPU with AVX-512 BF16, bfloat16 rows take q8_bf16 instead: the
   weights become bfloat16 (exactly) and meet the rows in vdpbf16ps, without converting the
   rows to float32 first; that is 1.0-1.9x as fast for one row and 1.4-1.6x for four
   (Qwen2.5-0.5B's shapes, from memory). groove/node/cpu_kernels.py compiles this file on
   the node's machine (-march=native). The AVX-512 and AVX2 blocks below are the same few
   operations, once per instruction set. */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#if defined(__AVX512F__)
#define W 16
typedef __m512 vf;
static inline vf cvt_w(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }
/* four vectors of weights from 4 * W bytes */
static inline void load_w4(const int8_t *p, vf out[4]) {
    __m512i b = _mm512_loadu_si512((const void *)p);
    out[0] = cvt_w(_mm512_extracti32x4_epi32(b, 0));
    out[1] = cvt_w(_mm512_extracti32x4_epi32(b, 1));
    out[2] = cvt_w(_mm512_extracti32x4_epi32(b, 2));
    out[3] = cvt_w(_mm512_extracti32x4_epi32(b, 3));
}
static inline vf load_w1(const int8_t *p) { return cvt_w(_mm_loadu_si128((const __m128i *)p)); }
static inline vf load_x(const float *p) { return _mm512_loadu_ps(p); }
static inline vf mul_(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf add_(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf fma_(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf zero(void) { return _mm512_setzero_ps(); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define W 8
typedef __m256 vf;
static inline vf cvt_w(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
static inline void load_w4(const int8_t *p, vf out[4]) {
    __m256i b = _mm256_loadu_si256((const __m256i *)p);
    __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
    out[0] = cvt_w(lo);
    out[1] = cvt_w(_mm_srli_si128(lo, 8));
    out[2] = cvt_w(hi);
    out[3] = cvt_w(_mm_srli_si128(hi, 8));
}
static inline vf load_w1(const int8_t *p) { return cvt_w(_mm_loadl_epi64((const __m128i *)p)); }
static inline vf load_x(const float *p) { return _mm256_loadu_ps(p); }
static inline vf mul_(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf add_(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf fma_(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf zero(void) { return _mm256_setzero_ps(); }
static inline float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#error "q8 kernel: needs AVX-512F or AVX2 with FMA"
#endif

/* One output row n against mm input rows from m0 (mm a constant once inlined). Every row's
   sum is taken in the same order whatever mm is, so a row's result does not depend on the
   call's other rows. */
static inline __attribute__((always_inline)) void row(const float *x, const int8_t *w, const float *scale, float *y,
                                                     long N, long K, long n, long m0, const int mm) {
    const long K4 = K - K % (4 * W), K1 = K - K % W;
    const int8_t *wr = w + n * K;
    vf acc[4];
    for (int j = 0; j < mm; j++) acc[j] = zero();
    for (long k = 0; k < K4; k += 4 * W) {
        vf wv[4];
        load_w4(wr + k, wv);
        for (int j = 0; j < mm; j++) {
            const float *xr = x + (m0 + j) * K + k;
            vf a = fma_(wv[1], load_x(xr + W), mul_(wv[0], load_x(xr)));
            vf b = fma_(wv[3], load_x(xr + 3 * W), mul_(wv[2], load_x(xr + 2 * W)));
            acc[j] = add_(acc[j], add_(a, b));
        }
    }
    for (long k = K4; k < K1; k += W) {
        vf wv = load_w1(wr + k);
        for (int j = 0; j < mm; j++) acc[j] = fma_(wv, load_x(x + (m0 + j) * K + k), acc[j]);
    }
    for (int j = 0; j < mm; j++) {
        float s = hsum(acc[j]);
        for (long k = K1; k < K; k++) s += x[(m0 + j) * K + k] * (float)wr[k];
        y[(m0 + j) * N + n] = s * scale[n];
    }
}

static void q8_f32(const float *x, const int8_t *w, const float *scale, float *y, long M, long N, long K) {
    #pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        for (long m0 = 0; m0 < M; m0 += 4) {
            switch (M - m0 < 4 ? M - m0 : 4) {
            case 1: row(x, w, scale, y, N, K, n, m0, 1); break;
            case 2: row(x, w, scale, y, N, K, n, m0, 2); break;
            case 3: row(x, w, scale, y, N, K, n, m0, 3); break;
            default: row(x, w, scale, y, N, K, n, m0, 4); break;
            }
        }
    }
}

static inline float from_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512BF16__)
/* bfloat16 rows on a CPU with AVX-512 BF16: each weight is converted to bfloat16 (exact for
   int8) and multiplied with the bfloat16 inputs as they are by vdpbf16ps, 32 weights per
   instruction. Each output's sum goes in a fixed order (16 lanes, each over pairs of
   inputs, then the lanes as a fixed tree), whatever else is in the call. */
static inline __m512bh w_bf16(__m128i lo, __m128i hi) {
    return _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)));
}

static inline __attribute__((always_inline)) void row_bf16(const uint16_t *x, const int8_t *w, const float *scale,
                                                          const uint16_t *bias, uint16_t *y, long N, long K, long n,
                                                          long m0, const int mm) {
    const long K64 = K - K % 64;
    const int8_t *wr = w + n * K;
    __m512 acc[4];
    for (int j = 0; j < mm; j++) acc[j] = _mm512_setzero_ps();
    for (long k = 0; k < K64; k += 64) {
        __m512i b = _mm512_loadu_si512((const void *)(wr + k));
        __m512bh w0 = w_bf16(_mm512_extracti32x4_epi32(b, 0), _mm512_extracti32x4_epi32(b, 1));
        __m512bh w1 = w_bf16(_mm512_extracti32x4_epi32(b, 2), _mm512_extracti32x4_epi32(b, 3));
        for (int j = 0; j < mm; j++) {
            const uint16_t *xr = x + (m0 + j) * K + k;
            acc[j] = _mm512_dpbf16_ps(acc[j], w0, (__m512bh)_mm512_loadu_si512((const void *)xr));
            acc[j] = _mm512_dpbf16_ps(acc[j], w1, (__m512bh)_mm512_loadu_si512((const void *)(xr + 32)));
        }
    }
    for (int j = 0; j < mm; j++) {
        float s = _mm512_reduce_add_ps(acc[j]);
        for (long k = K64; k < K; k++) s += from_bf16(x[(m0 + j) * K + k]) * (float)wr[k];
        s *= scale[n];
        if (bias) s += from_bf16(bias[n]);
        y[(m0 + j) * N + n] = to_bf16(s);
    }
}

static void q8_bf16(const uint16_t *x, const int8_t *w, const float *scale, const uint16_t *bias, uint16_t *y, long M,
                    long N, long K) {
    #pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        for (long m0 = 0; m0 < M; m0 += 4) {
            switch (M - m0 < 4 ? M - m0 : 4) {
            case 1: row_bf16(x, w, scale, bias, y, N, K, n, m0, 1); break;
            case 2: row_bf16(x, w, scale, bias, y, N, K, n, m0, 2); break;
            case 3: row_bf16(x, w, scale, bias, y, N, K, n, m0, 3); break;
            default: row_bf16(x, w, scale, bias, y, N, K, n, m0, 4); break;
            }
        }
    }
}
#endif

/* y[M, N] = (x[M, K] . w[N, K]^T) * scale[N] (+ bias[N]): w int8 row-major, scale float32.
   dtype 0: x, y and bias float32; dtype 1: bfloat16, with the sum rounded once. The work
   buffer holds M * (K + N) floats. bias may be NULL. */
void q8_linear(const void *x, const int8_t *w, const float *scale, const void *bias, void *y, long M, long N, long K,
               int dtype, float *work) {
#if defined(__AVX512BF16__)
    if (dtype == 1) {
        q8_bf16((const uint16_t *)x, w, scale, (const uint16_t *)bias, (uint16_t *)y, M, N, K);
        return;
    }
#endif
    const float *xf = (const float *)x;
    float *yf = (float *)y;
    if (dtype == 1) {
        float *xw = work;
        for (long i = 0; i < M * K; i++) xw[i] = from_bf16(((const uint16_t *)x)[i]);
        xf = xw;
        yf = work + M * K;
    }
    q8_f32(xf, w, scale, yf, M, N, K);
    if (dtype == 1) {
        uint16_t *yb = (uint16_t *)y;
        const uint16_t *bb = (const uint16_t *)bias;
        for (long m = 0; m < M; m++)
            for (long n = 0; n < N; n++) yb[m * N + n] = to_bf16(yf[m * N + n] + (bb ? from_bf16(bb[n]) : 0.f));
    } else if (bias) {
        const float *bf = (const float *)bias;
        for (long m = 0; m < M; m++)
            for (long n = 0; n < N; n++) yf[m * N + n] += bf[n];
    }
}
