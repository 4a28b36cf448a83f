/* bfloat16 linear layer for the CPU, for decode-sized calls (a few rows), bit for bit what
   nn.Linear (oneDNN) gives on a CPU with AVX-512 BF16.

   y[M, N] = x[M, K] . w[N, K]^T (+ bias), x, w, y and bias in bfloat16. w is read where
   oneDNN packed it for one row (PackedLinear's buffer): blocks of 64 outputs, each holding
   the input pairs (k, k + 1) in turn, 64 outputs side by side ([N/64][K/2][64][2];
   cpu_kernels.reads_packed_layout checks that the buffer is laid out so).

   The sums are taken in the order oneDNN's one-row kernel takes them (found by probing
   nn.Linear with inputs that cancel; see BENCHMARKS.md): inputs in chunks of
   512, each chunk summed from zero one pair at a time with vdpbf16ps (the odd input of a pair
   first, each product added and rounded in float32), the chunks' sums added in order, the
   bias added, and the total rounded once to bfloat16. Each row is summed so whatever else is
   in the call. PackedLinear still compares its results with nn.Linear's before using them,
   so a CPU where oneDNN sums otherwise keeps oneDNN's kernel.

   This reads 256 bytes per input pair (four vectors of 16 outputs); for one row it streams
   the weights from memory 1.2-1.9x as fast as oneDNN's kernel here (28-53 GB/s against
   22-30 on an AMD EPYC whose memory speed drifts). */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#if !defined(__AVX512BF16__) || !defined(__AVX512F__)
#error "bf16 kernel: needs AVX-512 with the BF16 extension"
#endif

#define BLOCK 64        /* outputs per block of the packed layout */
#define CHUNK_PAIRS 256 /* 512 inputs per chunk, as oneDNN's kernel sums them */
#define MAX_ROWS 3      /* rows per pass over a block: 3 x 8 accumulators and 4 weights fit 32 registers */

static inline __m512 widen(const uint16_t *p) { /* 16 bfloat16 values to float32, exactly */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Block nb of outputs (64 of them) for rows m0 .. m0 + mm - 1 (mm a constant once inlined). */
static inline __attribute__((always_inline)) void block(const uint16_t *x, const uint16_t *w, const uint16_t *bias,
                                                        uint16_t *y, long N, long K, long nb, long m0, const int mm) {
    const long pairs = K / 2;
    const uint16_t *wb = w + nb * pairs * 2 * BLOCK;
    __m512 total[MAX_ROWS][4], chunk[MAX_ROWS][4];
    for (int j = 0; j < mm; j++)
        for (int v = 0; v < 4; v++) total[j][v] = _mm512_setzero_ps(); /* stays so only where K is 0 */
    for (long c0 = 0; c0 < pairs; c0 += CHUNK_PAIRS) {
        const long c1 = c0 + CHUNK_PAIRS < pairs ? c0 + CHUNK_PAIRS : pairs;
        for (int j = 0; j < mm; j++)
            for (int v = 0; v < 4; v++) chunk[j][v] = _mm512_setzero_ps();
        for (long p = c0; p < c1; p++) {
            const uint16_t *wp = wb + p * 2 * BLOCK;
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 32),
                           w2 = (__m512bh)_mm512_loadu_si512(wp + 64), w3 = (__m512bh)_mm512_loadu_si512(wp + 96);
            for (int j = 0; j < mm; j++) {
                int32_t pair;
                memcpy(&pair, x + (m0 + j) * K + 2 * p, 4);
                const __m512bh xp = (__m512bh)_mm512_set1_epi32(pair);
                chunk[j][0] = _mm512_dpbf16_ps(chunk[j][0], w0, xp);
                chunk[j][1] = _mm512_dpbf16_ps(chunk[j][1], w1, xp);
                chunk[j][2] = _mm512_dpbf16_ps(chunk[j][2], w2, xp);
                chunk[j][3] = _mm512_dpbf16_ps(chunk[j][3], w3, xp);
            }
        }
        for (int j = 0; j < mm; j++)
            for (int v = 0; v < 4; v++) total[j][v] = c0 == 0 ? chunk[j][v] : _mm512_add_ps(total[j][v], chunk[j][v]);
    }
    for (int j = 0; j < mm; j++)
        for (int v = 0; v < 4; v++) {
            const long n = nb * BLOCK + v * 16;
            __m512 r = total[j][v];
            if (bias) r = _mm512_add_ps(r, widen(bias + n));
            _mm256_storeu_si256((__m256i *)(y + (m0 + j) * N + n), (__m256i)_mm512_cvtneps_pbh(r));
        }
}

/* y[M, N] = x[M, K] . w^T (+ bias[N]), w packed as above; N a multiple of 64, K even.
   bias may be NULL. */
void bf16_linear(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, long M, long N, long K) {
    #pragma omp parallel for schedule(static)
    for (long nb = 0; nb < N / BLOCK; nb++)
        for (long m0 = 0; m0 < M; m0 += MAX_ROWS) {
            switch (M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS) {
            case 1: block(x, w, bias, y, N, K, nb, m0, 1); break;
            case 2: block(x, w, bias, y, N, K, nb, m0, 2); break;
            default: block(x, w, bias, y, N, K, nb, m0, 3); break;
            }
        }
}
