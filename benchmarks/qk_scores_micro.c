/* Attention's score loop on AVX2 (decoder.c's qk_pairs8), timed alone: where its time goes.

   One call scores 6 query heads (a prompt chunk's 2 tokens x SmolLM2's 3 heads per K/V head) against 1,500
   bf16 keys of 64 channels (in L2), the fastest of 60 rounds of 20 calls:
   v0  decoder.c's qk_pairs8 itself (this file includes decoder.c): per key, 6 fmadd chains over the
       channels, then sums8's horizontal sums;
   v1  two keys per pass, each query load serving both keys' chains (the same bits as v0, checked);
   v2  v0 without the horizontal sums (lanes added plainly: wrong sums, a bound on what the sums cost).
   v0 against v2 is what the horizontal sums cost; v2 is the fmadds, K loads and conversions alone.

       K=src/tachy/kernels; gcc -O3 -march=native -ffp-contract=off -pthread -o /tmp/qk_scores \
           benchmarks/qk_scores_micro.c $K/pool.c $K/gguf_kernels.c $K/q8_matmul.c $K/rows.c -lm && /tmp/qk_scores
*/
#include <stdio.h>

#include "../src/tachy/kernels/decoder.c"   /* qk_pairs8, load_bf16x8, sums8: the engine's own code */

#if !DEC_AVX2
#error "the AVX2 score loop: build on a CPU with AVX2 and without AVX-512 (decoder.c then takes its AVX2 path)"
#endif
#define AI static inline __attribute__((always_inline))
#define qk_v0 qk_pairs8
/* two keys per pass: q loaded once for both */
AI __m256 qk_v1(const int NP, const float *const *q, const int64_t *keys, int64_t n, const uint16_t *K0,
                int64_t C, float scale, float *sc) {
    const __m256 scv = _mm256_set1_ps(scale);
    __m256 mxv = _mm256_set1_ps(-INFINITY), a[8], b[8];
    for (int p = NP; p < 8; p++) a[p] = b[p] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= n; k += 2) {
        const uint16_t *ka = K0 + keys[k] * C * 8, *kb = K0 + keys[k + 1] * C * 8;
        for (int p = 0; p < NP; p++) a[p] = b[p] = _mm256_setzero_ps();
        for (int64_t c = 0; c < C; c++) {
            __m256 ra = load_bf16x8(ka + 8 * c), rb = load_bf16x8(kb + 8 * c);
            for (int p = 0; p < NP; p++) {
                __m256 qq = _mm256_loadu_ps(q[p] + 8 * c);
                a[p] = _mm256_fmadd_ps(qq, ra, a[p]);
                b[p] = _mm256_fmadd_ps(qq, rb, b[p]);
            }
        }
        __m256 s = _mm256_mul_ps(sums8(a), scv), t = _mm256_mul_ps(sums8(b), scv);
        _mm256_storeu_ps(sc + 8 * k, s);
        _mm256_storeu_ps(sc + 8 * k + 8, t);
        mxv = _mm256_max_ps(mxv, _mm256_max_ps(s, t));
    }
    if (k < n) mxv = _mm256_max_ps(mxv, qk_v0(NP, q, keys + k, n - k, K0, C, scale, sc + 8 * k));
    return mxv;
}
/* no horizontal sums: lane sums of the accumulators (wrong, for timing) */
AI __m256 qk_v2(const int NP, const float *const *q, const int64_t *keys, int64_t n, const uint16_t *K0,
                int64_t C, float scale, float *sc) {
    const __m256 scv = _mm256_set1_ps(scale);
    __m256 mxv = _mm256_set1_ps(-INFINITY), acc[8];
    for (int p = NP; p < 8; p++) acc[p] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k++) {
        const uint16_t *kr = K0 + keys[k] * C * 8;
        for (int p = 0; p < NP; p++) acc[p] = _mm256_setzero_ps();
        for (int64_t c = 0; c < C; c++) {
            __m256 r = load_bf16x8(kr + 8 * c);
            for (int p = 0; p < NP; p++) acc[p] = _mm256_fmadd_ps(_mm256_loadu_ps(q[p] + 8 * c), r, acc[p]);
        }
        __m256 s = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])), _mm256_add_ps(acc[4], acc[5])), scv);
        _mm256_storeu_ps(sc + 8 * k, s);
        mxv = _mm256_max_ps(mxv, s);
    }
    return mxv;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
__attribute__((noinline)) float run(int v, const float *const *q, const int64_t *keys, int64_t n, const uint16_t *K0, float *sc) {
    __m256 m;
    if (v == 0) m = qk_v0(6, q, keys, n, K0, 8, 0.125f, sc);
    else if (v == 1) m = qk_v1(6, q, keys, n, K0, 8, 0.125f, sc);
    else m = qk_v2(6, q, keys, n, K0, 8, 0.125f, sc);
    float o[8]; _mm256_storeu_ps(o, m); return o[0];
}
int main(void) {
    int64_t n = 1500, D = 64;
    uint16_t *K = malloc(2 * n * D); float *qs = malloc(4 * 8 * D), *sc = malloc(4 * 8 * n), *sc2 = malloc(4 * 8 * n);
    int64_t *keys = malloc(8 * n);
    srand(1);
    for (int64_t i = 0; i < n * D; i++) { float f = (rand() / (float)RAND_MAX - 0.5f); uint32_t u; memcpy(&u, &f, 4); K[i] = u >> 16; }
    for (int64_t i = 0; i < 8 * D; i++) qs[i] = rand() / (float)RAND_MAX - 0.5f;
    for (int64_t i = 0; i < n; i++) keys[i] = i;
    const float *q[8]; for (int p = 0; p < 8; p++) q[p] = qs + p * D;
    double best[3] = {1e9, 1e9, 1e9};
    for (int r = 0; r < 60; r++)
        for (int v = 0; v < 3; v++) {
            double t = now();
            for (int it = 0; it < 20; it++) run(v, q, keys, n, K, v ? sc2 : sc);
            t = (now() - t) / 20;
            if (t < best[v]) best[v] = t;
            if (v == 1 && memcmp(sc, sc2, 4 * 8 * n)) { printf("bits differ v%d\n", v); return 1; }
        }
    for (int v = 0; v < 3; v++) printf("v%d: %.1f us, %.1f ns/key\n", v, best[v] * 1e6, best[v] * 1e9 / n);
    return 0;
}
