/* Matrix products straight from GGUF's quantized blocks, for decoding on the CPU.
 *
 * tachy keeps a GGUF model's weights as the file stores them (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K,
 * and F16 / BF16 / F32) and multiplies bf16 activations by them here. Each weight row is decoded block by
 * block to float32 exactly as the gguf package's dequantizer computes it (same operations in the same order,
 * no fused multiply-add), rounded to bf16 (round to nearest even, as torch's cast), and multiplied with
 * AVX512-BF16 dot products accumulating in float32. So a product reads 4-8 bits per weight instead of 16,
 * with the very weights tachy's bf16 path holds.
 *
 * Row invariance, which speculative decoding's exactness rests on: output y[t][n] is always computed by the
 * same sequence of operations, one float32 accumulator running over the row's 32-wide blocks in order, then
 * one fixed horizontal sum, whatever the number of rows T, the row's place among them and the number of
 * threads (threads split the output columns n, never the reduction). A verify forward over T tokens therefore
 * gives each row the bits one-token decoding gives it.
 *
 * Compiled at first use for the machine it runs on (tachy/kernels/__init__.py); without AVX512-BF16 the same
 * functions run a portable C path with the same invariance (slower).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

int tq_simd_width(void) { return TQ_AVX512 ? 512 : TQ_AVX2 ? 256 : 0; }
int64_t tq_row_bytes(int fmt, int64_t K) { return row_bytes_of(fmt, K); }
int tq_block_size(int fmt) { return block_size_of(fmt); }

/* Decode 32 consecutive weights of a row, starting at weight 32*b, to float32 exactly as gguf-py does. */
static void decode32_scalar(int fmt, const uint8_t *row, int64_t b, float *out) {
    switch (fmt) {
    case F32: memcpy(out, row + b * 128, 128); return;
    case F16: for (int i = 0; i < 32; i++) out[i] = fp16_to_f32(rd16(row + b * 64 + 2 * i)); return;
    case BF16: for (int i = 0; i < 32; i++) out[i] = bf16_to_f32(rd16(row + b * 64 + 2 * i)); return;
    case Q4_0: {
        const uint8_t *p = row + b * 18;
        float d = fp16_to_f32(rd16(p));
        for (int i = 0; i < 16; i++) {
            out[i] = d * (float)((int)(p[2 + i] & 15) - 8);
            out[i + 16] = d * (float)((int)(p[2 + i] >> 4) - 8);
        }
        return;
    }
    case Q4_1: {
        const uint8_t *p = row + b * 20;
        float d = fp16_to_f32(rd16(p)), m = fp16_to_f32(rd16(p + 2));
        for (int i = 0; i < 16; i++) {
            float lo = d * (float)(p[4 + i] & 15), hi = d * (float)(p[4 + i] >> 4);
            out[i] = lo + m;
            out[i + 16] = hi + m;
        }
        return;
    }
    case Q5_0: {
        const uint8_t *p = row + b * 22;
        float d = fp16_to_f32(rd16(p));
        uint32_t qh = rd32(p + 2);
        for (int i = 0; i < 16; i++) {
            int lo = (p[6 + i] & 15) | ((qh >> i) & 1) << 4, hi = (p[6 + i] >> 4) | ((qh >> (i + 16)) & 1) << 4;
            out[i] = d * (float)(lo - 16);
            out[i + 16] = d * (float)(hi - 16);
        }
        return;
    }
    case Q5_1: {
        const uint8_t *p = row + b * 24;
        float d = fp16_to_f32(rd16(p)), m = fp16_to_f32(rd16(p + 2));
        uint32_t qh = rd32(p + 4);
        for (int i = 0; i < 16; i++) {
            int lo = (p[8 + i] & 15) | ((qh >> i) & 1) << 4, hi = (p[8 + i] >> 4) | ((qh >> (i + 16)) & 1) << 4;
            float a = d * (float)lo, c = d * (float)hi;
            out[i] = a + m;
            out[i + 16] = c + m;
        }
        return;
    }
    case Q8_0: {
        const uint8_t *p = row + b * 34;
        float d = fp16_to_f32(rd16(p));
        for (int i = 0; i < 32; i++) out[i] = (float)(int8_t)p[2 + i] * d;
        return;
    }
    case Q4_K: case Q5_K: {
        int64_t sb = b / 8;
        int j = (int)(b % 8), sc, m;
        const uint8_t *p = row + sb * (fmt == Q4_K ? 144 : 176);
        float d = fp16_to_f32(rd16(p)), dmin = fp16_to_f32(rd16(p + 2));
        k_scale_min(p + 4, j, &sc, &m);
        float dl = d * (float)sc, ml = dmin * (float)m;
        const uint8_t *qs = p + (fmt == Q4_K ? 16 : 48) + (j / 2) * 32;
        const uint8_t *qh = p + 16;
        for (int i = 0; i < 32; i++) {
            int q = (j & 1) ? qs[i] >> 4 : qs[i] & 15;
            if (fmt == Q5_K) q |= ((qh[i] >> j) & 1) << 4;
            out[i] = dl * (float)q - ml;
        }
        return;
    }
    case Q6_K: {
        int64_t sb = b / 8;
        int j = (int)(b % 8), c = j / 4, g = j % 4;
        const uint8_t *p = row + sb * 210, *ql = p + c * 64 + (g & 1) * 32, *qh = p + 128 + c * 32;
        const int8_t *scales = (const int8_t *)(p + 192);
        float d = fp16_to_f32(rd16(p + 208));
        float d0 = d * (float)scales[c * 8 + g * 2], d1 = d * (float)scales[c * 8 + g * 2 + 1];
        for (int i = 0; i < 32; i++) {
            int lo = (g < 2) ? (ql[i] & 15) : (ql[i] >> 4);
            int q = (lo | ((qh[i] >> (2 * g)) & 3) << 4) - 32;
            out[i] = (i < 16 ? d0 : d1) * (float)q;
        }
        return;
    }
    }
}

#if TQ_AVX512
/* ---- AVX512: the same decoding, 32 weights in two registers -------------------------------------------- */
static inline float hf(uint16_t h) { return _cvtsh_ss(h); }              /* F16C: exact, like numpy */
static inline __m512 h2f(uint16_t h) { return _mm512_set1_ps(_cvtsh_ss(h)); }

/* low / high nibbles of 16 bytes as 16 int32 lanes */
static inline void nibbles16(const uint8_t *q, __m512i *lo, __m512i *hi) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    *lo = _mm512_and_si512(v, _mm512_set1_epi32(15));
    *hi = _mm512_srli_epi32(v, 4);
}

/* the 16 bits of ``bits`` (bit i -> lane i) as 0/1 int32 lanes */
static inline __m512i bits16(uint32_t bits) {
    return _mm512_maskz_set1_epi32((__mmask16)(bits & 0xffff), 1);
}

static inline void decode32(int fmt, const uint8_t *row, int64_t b, __m512 *a, __m512 *c) {
    switch (fmt) {
    default:
        *a = *c = _mm512_setzero_ps();
        return;
    case Q4_0: {
        const uint8_t *p = row + b * 18;
        __m512 d = h2f(rd16(p));
        __m512i lo, hi, eight = _mm512_set1_epi32(8);
        nibbles16(p + 2, &lo, &hi);
        *a = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)));
        *c = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)));
        return;
    }
    case Q4_1: {
        const uint8_t *p = row + b * 20;
        __m512 d = h2f(rd16(p)), m = h2f(rd16(p + 2));
        __m512i lo, hi;
        nibbles16(p + 4, &lo, &hi);
        *a = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)), m);
        *c = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)), m);
        return;
    }
    case Q5_0: case Q5_1: {
        int off = fmt == Q5_0 ? 6 : 8;
        const uint8_t *p = row + b * (fmt == Q5_0 ? 22 : 24);
        uint32_t qh = rd32(p + off - 4);
        __m512i lo, hi;
        nibbles16(p + off, &lo, &hi);
        lo = _mm512_or_si512(lo, _mm512_slli_epi32(bits16(qh), 4));
        hi = _mm512_or_si512(hi, _mm512_slli_epi32(bits16(qh >> 16), 4));
        __m512 d = h2f(rd16(p));
        if (fmt == Q5_0) {
            __m512i sixteen = _mm512_set1_epi32(16);
            *a = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, sixteen)));
            *c = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, sixteen)));
        } else {
            __m512 m = h2f(rd16(p + 2));
            *a = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)), m);
            *c = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)), m);
        }
        return;
    }
    case Q8_0: {
        const uint8_t *p = row + b * 34;
        __m512 d = h2f(rd16(p));
        *a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 2)))), d);
        *c = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 18)))), d);
        return;
    }
    case Q4_K: case Q5_K: {
        int64_t sb = b / 8;
        int j = (int)(b % 8), sc, mn;
        const uint8_t *p = row + sb * (fmt == Q4_K ? 144 : 176);
        float d = hf(rd16(p)), dmin = hf(rd16(p + 2));
        k_scale_min(p + 4, j, &sc, &mn);
        __m512 dl = _mm512_set1_ps(d * (float)sc), ml = _mm512_set1_ps(dmin * (float)mn);
        const uint8_t *qs = p + (fmt == Q4_K ? 16 : 48) + (j / 2) * 32;
        __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
        __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16)));
        if (j & 1) {
            q0 = _mm512_srli_epi32(q0, 4);
            q1 = _mm512_srli_epi32(q1, 4);
        } else {
            q0 = _mm512_and_si512(q0, _mm512_set1_epi32(15));
            q1 = _mm512_and_si512(q1, _mm512_set1_epi32(15));
        }
        if (fmt == Q5_K) {
            const uint8_t *qh = p + 16;
            __m512i h0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qh));
            __m512i h1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + 16)));
            __m512i one = _mm512_set1_epi32(1);
            q0 = _mm512_or_si512(q0, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h0, j), one), 4));
            q1 = _mm512_or_si512(q1, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h1, j), one), 4));
        }
        *a = _mm512_sub_ps(_mm512_mul_ps(dl, _mm512_cvtepi32_ps(q0)), ml);
        *c = _mm512_sub_ps(_mm512_mul_ps(dl, _mm512_cvtepi32_ps(q1)), ml);
        return;
    }
    case Q6_K: {
        int64_t sb = b / 8;
        int j = (int)(b % 8), cc = j / 4, g = j % 4;
        const uint8_t *p = row + sb * 210, *ql = p + cc * 64 + (g & 1) * 32, *qh = p + 128 + cc * 32;
        const int8_t *scales = (const int8_t *)(p + 192);
        float d = hf(rd16(p + 208));
        __m512 d0 = _mm512_set1_ps(d * (float)scales[cc * 8 + g * 2]);
        __m512 d1 = _mm512_set1_ps(d * (float)scales[cc * 8 + g * 2 + 1]);
        __m512i l0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)ql));
        __m512i l1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + 16)));
        __m512i h0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qh));
        __m512i h1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + 16)));
        __m512i f = _mm512_set1_epi32(15), three = _mm512_set1_epi32(3), k32 = _mm512_set1_epi32(32);
        if (g < 2) {
            l0 = _mm512_and_si512(l0, f);
            l1 = _mm512_and_si512(l1, f);
        } else {
            l0 = _mm512_srli_epi32(l0, 4);
            l1 = _mm512_srli_epi32(l1, 4);
        }
        h0 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h0, 2 * g), three), 4);
        h1 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h1, 2 * g), three), 4);
        *a = _mm512_mul_ps(d0, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(l0, h0), k32)));
        *c = _mm512_mul_ps(d1, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(l1, h1), k32)));
        return;
    }
    case F32: {
        *a = _mm512_loadu_ps(row + b * 128);
        *c = _mm512_loadu_ps(row + b * 128 + 64);
        return;
    }
    case F16: {
        *a = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + b * 64)));
        *c = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + b * 64 + 32)));
        return;
    }
    case BF16: {
        __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + b * 64)));
        __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + b * 64 + 32)));
        *a = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16));
        *c = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
        return;
    }
    }
}

/* 32 weights as bf16, in order (round to nearest even) */
/* Formats whose weights take 16 or 32 values per block decode through a table: the block's possible weights
   bf16(d * k + m) (or its format's formula) for every k, computed once, then one lookup per weight. The table
   entries are the very values decode32 computes, so the result is the same, for fewer instructions. */
static const float RAMP[32] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                               16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};

/* 32 indices (16 low nibbles, then 16 high nibbles of 16 bytes) as 16-bit lanes */
static inline __m512i nibble_index(const uint8_t *q) {
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
    __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(v, 4);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* the 16-entry table k -> bf16(d * (k - off) [+ m]), duplicated to 32 lanes */
static inline __m512i table16(float d, float m, int off, int add_m, int sub_m) {
    __m512 k = _mm512_loadu_ps(RAMP);
    if (off) k = _mm512_sub_ps(k, _mm512_set1_ps((float)off));
    __m512 t = _mm512_mul_ps(_mm512_set1_ps(d), k);
    if (add_m) t = _mm512_add_ps(t, _mm512_set1_ps(m));
    if (sub_m) t = _mm512_sub_ps(t, _mm512_set1_ps(m));
    return (__m512i)_mm512_cvtne2ps_pbh(t, t);
}

/* the 32-entry table k -> bf16(d * (k - off) [+ m]) */
static inline __m512i table32(float d, float m, int off, int add_m, int sub_m) {
    __m512 k0 = _mm512_loadu_ps(RAMP), k1 = _mm512_loadu_ps(RAMP + 16), dd = _mm512_set1_ps(d);
    if (off) {
        k0 = _mm512_sub_ps(k0, _mm512_set1_ps((float)off));
        k1 = _mm512_sub_ps(k1, _mm512_set1_ps((float)off));
    }
    __m512 t0 = _mm512_mul_ps(dd, k0), t1 = _mm512_mul_ps(dd, k1);
    if (add_m) {
        t0 = _mm512_add_ps(t0, _mm512_set1_ps(m));
        t1 = _mm512_add_ps(t1, _mm512_set1_ps(m));
    }
    if (sub_m) {
        t0 = _mm512_sub_ps(t0, _mm512_set1_ps(m));
        t1 = _mm512_sub_ps(t1, _mm512_set1_ps(m));
    }
    return (__m512i)_mm512_cvtne2ps_pbh(t1, t0);
}

/* the 5th bits of Q5 weights: bit i of qh (i < 32) -> 16 added to index i */
static inline __m512i fifth_bits(uint32_t qh) {
    return _mm512_maskz_set1_epi16((__mmask32)qh, 16);
}

static inline __m512bh decode32_bf16(int fmt, const uint8_t *row, int64_t b) {
    switch (fmt) {
    case BF16:
        return (__m512bh)_mm512_loadu_si512(row + b * 64);
    case Q4_0: {
        const uint8_t *p = row + b * 18;
        return (__m512bh)_mm512_permutexvar_epi16(nibble_index(p + 2), table16(hf(rd16(p)), 0, 8, 0, 0));
    }
    case Q4_1: {
        const uint8_t *p = row + b * 20;
        return (__m512bh)_mm512_permutexvar_epi16(nibble_index(p + 4), table16(hf(rd16(p)), hf(rd16(p + 2)), 0, 1, 0));
    }
    case Q5_0: {
        const uint8_t *p = row + b * 22;
        __m512i idx = _mm512_or_si512(nibble_index(p + 6), fifth_bits(rd32(p + 2)));
        return (__m512bh)_mm512_permutexvar_epi16(idx, table32(hf(rd16(p)), 0, 16, 0, 0));
    }
    case Q5_1: {
        const uint8_t *p = row + b * 24;
        __m512i idx = _mm512_or_si512(nibble_index(p + 8), fifth_bits(rd32(p + 4)));
        return (__m512bh)_mm512_permutexvar_epi16(idx, table32(hf(rd16(p)), hf(rd16(p + 2)), 0, 1, 0));
    }
    case Q4_K: case Q5_K: {
        int64_t sb = b / 8;
        int j = (int)(b % 8), sc, mn;
        const uint8_t *p = row + sb * (fmt == Q4_K ? 144 : 176);
        k_scale_min(p + 4, j, &sc, &mn);
        float dl = hf(rd16(p)) * (float)sc, ml = hf(rd16(p + 2)) * (float)mn;
        const uint8_t *qs = p + (fmt == Q4_K ? 16 : 48) + (j / 2) * 32;
        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)qs));
        __m512i idx = (j & 1) ? _mm512_srli_epi16(v, 4) : _mm512_and_si512(v, _mm512_set1_epi16(15));
        if (fmt == Q4_K)
            return (__m512bh)_mm512_permutexvar_epi16(idx, table16(dl, ml, 0, 0, 1));
        __m512i h = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + 16)));
        idx = _mm512_or_si512(idx, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h, j), _mm512_set1_epi16(1)), 4));
        return (__m512bh)_mm512_permutexvar_epi16(idx, table32(dl, ml, 0, 0, 1));
    }
    default: {
        __m512 a, c;
        decode32(fmt, row, b, &a, &c);
        return _mm512_cvtne2ps_pbh(c, a);
    }
    }
}
#endif

/* ---- y[T, N] = x[T, K] (bf16) @ W[N, K]^T ---------------------------------------------------------------- */
typedef struct {
    int fmt;
    const uint8_t *w;
    int64_t row_bytes, K, T, ldx, ldy;
    const uint16_t *x;
    void *y;
    int y_bf16;
} matmul_args;

static inline void store(const matmul_args *a, int64_t t, int64_t n, float v) {
    if (a->y_bf16)
        ((uint16_t *)a->y)[t * a->ldy + n] = f32_to_bf16(v);
    else
        ((float *)a->y)[t * a->ldy + n] = v;
}

/* The portable path: decode a row, round its weights to bf16, and for each input row accumulate the bf16
   products in float32, pairwise as vdpbf16ps does (16 lanes, two products per lane per block), then sum
   the 16 lanes in vdpbf16ps's order. Not bitwise the AVX512 path, but invariant in the same way. */
static void matmul_scalar(void *p, int64_t n0, int64_t n1) {
    const matmul_args *a = p;
    int64_t blocks = a->K / 32;
    float *wrow = malloc(sizeof(float) * a->K);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = a->w + n * a->row_bytes;
        for (int64_t b = 0; b < blocks; b++) {
            decode32_scalar(a->fmt, row, b, wrow + 32 * b);
            for (int i = 0; i < 32; i++) wrow[32 * b + i] = bf16_to_f32(f32_to_bf16(wrow[32 * b + i]));
        }
        for (int64_t t = 0; t < a->T; t++) {
            const uint16_t *x = a->x + t * a->ldx;
            float lanes[16] = {0};
            for (int64_t b = 0; b < blocks; b++)
                for (int l = 0; l < 16; l++) {
                    int64_t i = 32 * b + 2 * l;
                    lanes[l] += wrow[i] * bf16_to_f32(x[i]) + wrow[i + 1] * bf16_to_f32(x[i + 1]);
                }
            float s = 0;
            for (int l = 0; l < 16; l++) s += lanes[l];
            store(a, t, n, s);
        }
    }
    free(wrow);
}

#if TQ_AVX512
#define NB 4   /* output columns decoded together */
#define TB 4   /* input rows multiplied together */

/* One output tile: rows t0..t0+tb-1 of columns n0..n0+nb-1, over the weights already decoded to bf16 in
   ``w`` (nb rows of K). Each accumulator runs over the blocks in order; nothing else varies with tb/nb. */
static inline void tile(const matmul_args *a, const __m512bh *w, int64_t blocks, int64_t n0, int nb,
                        int64_t t0, int tb) {
    __m512 acc[NB][TB];
    for (int j = 0; j < NB; j++)
        for (int i = 0; i < TB; i++) acc[j][i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m512bh xb[TB];
        for (int i = 0; i < tb; i++) xb[i] = (__m512bh)_mm512_loadu_si512(a->x + (t0 + i) * a->ldx + 32 * b);
        for (int j = 0; j < nb; j++) {
            __m512bh wb = w[j * blocks + b];
            for (int i = 0; i < tb; i++) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wb, xb[i]);
        }
    }
    for (int j = 0; j < nb; j++)
        for (int i = 0; i < tb; i++) store(a, t0 + i, n0 + j, _mm512_reduce_add_ps(acc[j][i]));
}

/* One input row (plain decoding): a row of W at a time, its blocks decoded and multiplied at once, the row
   two ahead prefetched (one row at a time streams better than several interleaved, measured). The
   accumulator sees the same operations as in ``tile``. */
#define ONE_ROW(FMT)                                                                                        \
    static void one_row_##FMT(const matmul_args *a, int64_t n0, int64_t n1) {                                \
        int64_t blocks = a->K / 32, bytes = a->row_bytes;                                                    \
        const uint16_t *x = a->x;                                                                            \
        for (int64_t n = n0; n < n1; n++) {                                                                  \
            const uint8_t *r0 = a->w + n * bytes;                                                            \
            __m512 c0 = _mm512_setzero_ps();                                                                 \
            for (int64_t b = 0; b < blocks; b++) {                                                           \
                if (n + 2 < n1) __builtin_prefetch(r0 + 2 * bytes + b * bytes / blocks, 0, 0);               \
                c0 = _mm512_dpbf16_ps(c0, decode32_bf16(FMT, r0, b), (__m512bh)_mm512_loadu_si512(x + 32 * b)); \
            }                                                                                                \
            store(a, 0, n, _mm512_reduce_add_ps(c0));                                                        \
        }                                                                                                    \
    }

/* Several input rows (verification, short prompts): NB columns decoded to bf16 once, then TB rows at a time. */
#define MANY_ROWS(FMT)                                                                                       \
    static void many_rows_##FMT(const matmul_args *a, int64_t n0, int64_t n1, __m512bh *w) {                \
        int64_t blocks = a->K / 32;                                                                          \
        for (int64_t n = n0; n < n1; n += NB) {                                                              \
            int nb = n1 - n < NB ? (int)(n1 - n) : NB;                                                       \
            for (int j = 0; j < nb; j++) {                                                                   \
                const uint8_t *row = a->w + (n + j) * a->row_bytes;                                          \
                for (int64_t b = 0; b < blocks; b++) w[j * blocks + b] = decode32_bf16(FMT, row, b);         \
            }                                                                                                \
            for (int64_t t = 0; t < a->T; t += TB) {                                                         \
                int tb = a->T - t < TB ? (int)(a->T - t) : TB;                                               \
                switch (nb * 8 + tb) {                                                                       \
                    CASES                                                                                    \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }
#define CASE(NBV, TBV) case NBV * 8 + TBV: tile(a, w, blocks, n, NBV, t, TBV); break;
#define CASES CASE(4, 4) CASE(4, 3) CASE(4, 2) CASE(4, 1) CASE(3, 4) CASE(3, 3) CASE(3, 2) CASE(3, 1)          \
              CASE(2, 4) CASE(2, 3) CASE(2, 2) CASE(2, 1) CASE(1, 4) CASE(1, 3) CASE(1, 2) CASE(1, 1)

#define FORMAT_KERNELS(FMT) ONE_ROW(FMT) MANY_ROWS(FMT)
FORMAT_KERNELS(F32) FORMAT_KERNELS(F16) FORMAT_KERNELS(BF16) FORMAT_KERNELS(Q4_0) FORMAT_KERNELS(Q4_1)
FORMAT_KERNELS(Q5_0) FORMAT_KERNELS(Q5_1) FORMAT_KERNELS(Q8_0) FORMAT_KERNELS(Q4_K) FORMAT_KERNELS(Q5_K)
FORMAT_KERNELS(Q6_K)

static void matmul_avx512(void *p, int64_t n0, int64_t n1) {
    const matmul_args *a = p;
    if (a->T == 1) {
        switch (a->fmt) {
#define ONE(FMT) case FMT: one_row_##FMT(a, n0, n1); return;
            ONE(F32) ONE(F16) ONE(BF16) ONE(Q4_0) ONE(Q4_1) ONE(Q5_0) ONE(Q5_1) ONE(Q8_0) ONE(Q4_K) ONE(Q5_K) ONE(Q6_K)
#undef ONE
        }
        return;
    }
    __m512bh *w = aligned_alloc(64, sizeof(__m512bh) * NB * (a->K / 32));
    switch (a->fmt) {
#define MANY(FMT) case FMT: many_rows_##FMT(a, n0, n1, w); break;
        MANY(F32) MANY(F16) MANY(BF16) MANY(Q4_0) MANY(Q4_1) MANY(Q5_0) MANY(Q5_1) MANY(Q8_0) MANY(Q4_K) MANY(Q5_K) MANY(Q6_K)
#undef MANY
    }
    free(w);
}
#endif

/* y[t * ldy + n] for t < T, n < N; x is bf16 [T, K] with row stride ldx; weights are N rows of row_bytes. */
/* bf16 activations times bf16-rounded weights, for any format (packed weights go through q8_matmul.c) */
int tq_matmul(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const uint16_t *x,
              int64_t T, int64_t ldx, void *y, int64_t ldy, int y_bf16) {
    if (K % 32 || row_bytes_of(fmt, K) != row_bytes || (block_size_of(fmt) == 256 && K % 256)) return -1;
    matmul_args a = {fmt, w, row_bytes, K, T, ldx, ldy, x, y, y_bf16};
#if TQ_AVX512
    tq_parallel_for(matmul_avx512, &a, N, 16);
#else
    tq_parallel_for(matmul_scalar, &a, N, 16);
#endif
    return 0;
}

/* The portable path, on any machine (tests compare the two). */
int tq_matmul_portable(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const uint16_t *x,
                       int64_t T, int64_t ldx, void *y, int64_t ldy, int y_bf16) {
    if (K % 32 || row_bytes_of(fmt, K) != row_bytes) return -1;
    matmul_args a = {fmt, w, row_bytes, K, T, ldx, ldy, x, y, y_bf16};
    tq_parallel_for(matmul_scalar, &a, N, 16);
    return 0;
}

/* ---- dequantization: whole rows (prefill, tests) or a gather of rows (embedding lookups) ---------------- */
typedef struct {
    int fmt;
    const uint8_t *w;
    int64_t row_bytes, K;
    const int64_t *rows;      /* NULL: rows 0..N-1 */
    void *out;
    int bf16, portable;
} dequant_args;

static void dequant_rows(void *p, int64_t r0, int64_t r1) {
    const dequant_args *a = p;
    int64_t blocks = a->K / 32;
    float buf[32];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = a->w + (a->rows ? a->rows[r] : r) * a->row_bytes;
        for (int64_t b = 0; b < blocks; b++) {
#if TQ_AVX512
            if (!a->portable) {
                __m512 lo, hi;
                decode32(a->fmt, row, b, &lo, &hi);
                if (a->bf16) {
                    _mm512_storeu_si512((uint16_t *)a->out + r * a->K + 32 * b, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                } else {
                    _mm512_storeu_ps((float *)a->out + r * a->K + 32 * b, lo);
                    _mm512_storeu_ps((float *)a->out + r * a->K + 32 * b + 16, hi);
                }
                continue;
            }
#endif
            decode32_scalar(a->fmt, row, b, buf);
            for (int i = 0; i < 32; i++) {
                if (a->bf16)
                    ((uint16_t *)a->out)[r * a->K + 32 * b + i] = f32_to_bf16(buf[i]);
                else
                    ((float *)a->out)[r * a->K + 32 * b + i] = buf[i];
            }
        }
    }
}

int tq_dequantize(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const int64_t *rows,
                  void *out, int bf16, int portable) {
    if (K % 32 || row_bytes_of(fmt, K) != row_bytes || (block_size_of(fmt) == 256 && K % 256)) return -1;
    dequant_args a = {fmt, w, row_bytes, K, rows, out, bf16, portable};
    tq_parallel_for(dequant_rows, &a, N, 8);
    return 0;
}
