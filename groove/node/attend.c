/* One decode step of grouped-query attention in bfloat16, rounded as torch's CPU flash
 * attention rounds it (SDPA's kernel for one query token with no mask on an AVX-512 CPU).
 *
 * torch computes each head in blocks of 512 keys: q . k through MKL's bf16 gemm, scale,
 * max, exp (ATen's fast Vectorized<float>::fexp_u20, 16 lanes at a time, the rest with
 * expf), the probabilities rounded to bfloat16, then p . v through MKL's gemm again; blocks
 * after the first rescale what came before. On this path MKL's one-column gemm costs far
 * more than the arithmetic (about 0.4 ms a layer for Qwen2.5-0.5B at 512 cached tokens).
 * This file does the same arithmetic in the same order:
 *
 * - q . k: four running sums, over the dimensions d = 4t + r for r = 0..3, then
 *   (s0 + s2) + (s1 + s3);
 * - p . v: groups of four keys, (p0 v0 + p2 v2) + (p1 v1 + p3 v3), added to the running
 *   sum in turn (which starts from the earlier blocks' rescaled sum); the last keys that do
 *   not fill a group are added one at a time, last key first;
 * - the exp sum: two sets of 16 lanes, taking the keys' vectors of 16 in turn (key
 *   i = 16t + l goes to lane l of set t mod 2), the sets added, the lanes folded by halves
 *   (8, 4, 2, 1), then the tail keys one at a time;
 * - across blocks: sum = fma(rescale, sum, block sum).
 *
 * The node checks this against torch's own attention (outputs and log-sum-exps) before it
 * uses it (attention.py), so a CPU or library version that rounds otherwise keeps torch's
 * kernel.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef __AVX512F__
#error "attend.c needs AVX-512"
#endif

#define BLOCK 512  /* torch's kv_split_size */
#define MAX_DIM 256

static inline float bf16_to_float(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as c10 does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0xffff;
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline __m512 bits(uint32_t x) { return _mm512_castsi512_ps(_mm512_set1_epi32((int)x)); }

/* exp(x) for 16 lanes, as ATen's Vectorized<float>::fexp_u20 computes it (Malossi et al.,
 * "Fast exponential computation on SIMD architectures"): x log2(e) split into integer and
 * fraction, 2^fraction by a cubic, and the sum written straight into the float's bits. */
static inline __m512 fexp_u20(__m512 x) {
    const __m512 ln_min = bits(0xc2aeac50), ln_max = bits(0x42b17218);
    __mmask16 below = _mm512_cmp_ps_mask(x, ln_min, _CMP_LT_OS);
    __mmask16 above = _mm512_cmp_ps_mask(x, ln_max, _CMP_GT_OS);
    __m512 src = _mm512_mul_ps(x, bits(0x3fb8aa3b));
    __m512 frac = _mm512_sub_ps(src, _mm512_floor_ps(src));
    __m512 y = _mm512_fmadd_ps(frac, _mm512_set1_ps((float)-0.079204240219773236), _mm512_set1_ps((float)-0.22433836478672356));
    y = _mm512_fmadd_ps(frac, y, _mm512_set1_ps(0.30354260500649682f));
    y = _mm512_fmadd_ps(frac, y, _mm512_set1_ps(0.00010703434948458272f));
    src = _mm512_sub_ps(src, y);
    __m512i n = _mm512_cvttps_epi32(_mm512_fmadd_ps(_mm512_set1_ps(8388608.f), src, _mm512_set1_ps(8388608.f * 127.f)));
    n = _mm512_mask_mov_epi32(n, below, _mm512_setzero_si512());
    n = _mm512_mask_mov_epi32(n, above, _mm512_set1_epi32(0x7F800000));
    return _mm512_castsi512_ps(n);
}

static inline float fold(__m512 v) {  /* ATen's vec_reduce_all for 16 floats */
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
    v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, 0xB1));
    return _mm512_cvtss_f32(v);
}

/* q . k for four keys at once: lane 4i + r holds key i's running sum over the dimensions
 * d = 4t + r (each product is exact, so a fused multiply-add rounds as the add alone), then
 * each 128-bit lane folds to (s0 + s2) + (s1 + s3). */
static inline void scores4(const uint16_t *k, long k_row, const float *qf, long dim, float scale, float *out) {
    __m512 acc = _mm512_setzero_ps();
    for (long d = 0; d < dim; d += 4) {
        long long r[4];
        for (int i = 0; i < 4; i++) memcpy(&r[i], k + i * k_row + d, 8);
        __m256i raw = _mm256_set_epi64x(r[3], r[2], r[1], r[0]);
        __m512 kv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        acc = _mm512_fmadd_ps(kv, _mm512_broadcast_f32x4(_mm_loadu_ps(qf + d)), acc);
    }
    __m512 t = _mm512_add_ps(acc, _mm512_permute_ps(acc, 0x4E));
    t = _mm512_mul_ps(_mm512_add_ps(t, _mm512_permute_ps(t, 0xB1)), _mm512_set1_ps(scale));
    out[0] = t[0];
    out[1] = t[4];
    out[2] = t[8];
    out[3] = t[12];
}

static void head(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, float *lse, long dim,
                 long keys, long k_row, long v_row, float scale) {
    float qf[MAX_DIM], acc[MAX_DIM], scores[BLOCK];
    uint16_t p[BLOCK];
    for (long d = 0; d < dim; d++) qf[d] = bf16_to_float(q[d]);
    float max = -INFINITY, sum = 0.f;
    for (long n0 = 0; n0 < keys; n0 += BLOCK) {
        long size = keys - n0 < BLOCK ? keys - n0 : BLOCK;
        float block_max = -INFINITY;
        long j4 = size - size % 4;
        for (long j = 0; j < j4; j += 4) {
            scores4(k + (n0 + j) * k_row, k_row, qf, dim, scale, scores + j);
            for (int i = 0; i < 4; i++) block_max = scores[j + i] > block_max ? scores[j + i] : block_max;
        }
        for (long j = j4; j < size; j++) {
            const uint16_t *row = k + (n0 + j) * k_row;
            float s[4] = {0.f, 0.f, 0.f, 0.f};
            for (long d = 0; d < dim; d += 4)
                for (int r = 0; r < 4; r++) s[r] += bf16_to_float(row[d + r]) * qf[d + r];
            float score = ((s[0] + s[2]) + (s[1] + s[3])) * scale;
            scores[j] = score;
            block_max = score > block_max ? score : block_max;
        }
        float new_max = max > block_max ? max : block_max;
        __m512 lanes[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, vmax = _mm512_set1_ps(new_max);
        long vec_end = size - size % 16, j = 0;
        for (int set = 0; j < vec_end; j += 16, set ^= 1) {
            __m512 e = fexp_u20(_mm512_sub_ps(_mm512_loadu_ps(scores + j), vmax));
            lanes[set] = _mm512_add_ps(lanes[set], e);
            for (int l = 0; l < 16; l++) p[j + l] = float_to_bf16(e[l]);
        }
        float block_sum = fold(_mm512_add_ps(lanes[0], lanes[1]));
        for (; j < size; j++) {
            float e = expf(scores[j] - new_max);
            block_sum += e;
            p[j] = float_to_bf16(e);
        }
        float rescale = expf(max - new_max);
        sum = fmaf(rescale, sum, block_sum);
        max = new_max;
        if (n0 == 0) {
            for (long d = 0; d < dim; d++) acc[d] = 0.f;
        } else {
            for (long d = 0; d < dim; d++) acc[d] *= rescale;
        }
        const uint16_t *vb = v + n0 * v_row;
        long groups = size - size % 4;
        for (j = 0; j < groups; j += 4) {
            float p0 = bf16_to_float(p[j]), p1 = bf16_to_float(p[j + 1]), p2 = bf16_to_float(p[j + 2]),
                  p3 = bf16_to_float(p[j + 3]);
            const uint16_t *r0 = vb + j * v_row, *r1 = r0 + v_row, *r2 = r1 + v_row, *r3 = r2 + v_row;
            for (long d = 0; d < dim; d++)
                acc[d] += (p0 * bf16_to_float(r0[d]) + p2 * bf16_to_float(r2[d])) +
                          (p1 * bf16_to_float(r1[d]) + p3 * bf16_to_float(r3[d]));
        }
        for (j = size - 1; j >= groups; j--) {
            float pj = bf16_to_float(p[j]);
            const uint16_t *rj = vb + j * v_row;
            for (long d = 0; d < dim; d++) acc[d] += pj * bf16_to_float(rj[d]);
        }
    }
    if (lse) *lse = max + logf(sum);
    float inv = 1.f / sum;
    for (long d = 0; d < dim; d++) out[d] = float_to_bf16(acc[d] * inv);
}

/* q [heads][dim] (rows q_head apart), k and v [kv_heads][keys][dim] (heads and rows at the
 * given strides, in elements), out [heads][dim] contiguous; lse, where not NULL, [heads]:
 * each head's log-sum-exp, as torch's kernel also returns it (the node's check and the tests
 * compare it: it shows an exp sum's rounding that the bfloat16 output mostly hides). Query head h reads
 * key/value head h / (heads / kv_heads). Returns 0, or -1 for a shape it does not take. */
int attend_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, float *lse, long heads,
                long kv_heads, long dim, long keys, long q_head, long k_head, long k_row, long v_head, long v_row,
                float scale) {
    if (dim > MAX_DIM || dim % 4 || keys < 1 || kv_heads < 1 || heads % kv_heads) return -1;
    long group = heads / kv_heads;
#pragma omp parallel for schedule(static)
    for (long h = 0; h < heads; h++)
        head(q + h * q_head, k + (h / group) * k_head, v + (h / group) * v_head, out + h * dim, lse ? lse + h : NULL,
             dim, keys, k_row, v_row, scale);
    return 0;
}
