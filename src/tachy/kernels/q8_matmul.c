/* Matrix products of GGUF's quantized blocks with int8 activations, on weights repacked 16 rows at a time.
 *
 * Activations: each 32-wide block of an input row is quantized to int8 with its own scale (dx = max|x|/127,
 * as llama.cpp does), so the dot product of a block with a block of 4-8 bit weight codes is an exact integer.
 *
 * Weights: at load time the GGUF rows are repacked in groups of 16 output rows, block by block: the codes of
 * the 16 rows interleaved four at a time, then the 16 rows' block scales. One 512-bit VNNI instruction then
 * multiplies four codes of each of the 16 rows by the same four activation values (broadcast), and 8 of them
 * give the 16 rows' exact integer sums for a block, which one multiply-add scales into 16 float32
 * accumulators, one per output row. Nothing is reduced across lanes, each weight block is decoded once for
 * all input rows, and an input row costs 12 instructions per 16 weight rows per block: verifying 8 drafted
 * tokens costs about 3 one-token steps instead of 8.
 *
 * Row invariance: output (t, n) is one float32 lane updated block after block in order with the same
 * operations, whatever the number of input rows or threads (threads split the groups of 16 rows). The
 * portable path does the same integer sums and float operations lane by lane, so both give the same bits.
 *
 * AMX (Intel's tile units, Sapphire Rapids on): with 16 or more input rows, 16 of them at a time take a
 * block's integer sums from one TDPBSUD (16 input rows x 16 weight rows x 32 codes: the activations as tile A,
 * the 8 code vectors above as tile B, unchanged), then the same float operations as the VNNI path: the
 * sums are exact integers either way, so the bits are the same and only the time changes.
 *
 * Packed formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32), Q4_K, Q5_K, Q6_K (super-blocks of 256), for
 * N a multiple of 16. Per group of 16 rows and 32-block, in this order:
 *   codes   Q4/Q5/Q4_K/Q5_K: 4 x 64 bytes, chunk c = bytes 4c..4c+3 of each row's 16 nibble bytes (element e < 16
 *           in the low nibble of byte e, element e + 16 in its high nibble); Q8_0: 8 x 64 bytes, chunk c =
 *           elements 4c..4c+3 of each row as int8 + 128; Q6_K: the low 4 bits as Q4, then 8 x 16 bytes of
 *           high 2 bits (chunk c: 16 rows x 2 bytes... see pack_q6k)
 *   fifth   Q5_0/Q5_1/Q5_K: 8 x 8 bytes, a bit per code byte of chunk c (set: add 16)
 *   scales  Q4_0/Q5_0/Q8_0: d as 16 fp16; Q4_1/Q5_1: d, m as 16 fp16 each; Q4_K/Q5_K: sc, min as 16 bytes each
 *           (the super-block's d, dmin as 16 fp16 each precede its 8 blocks); Q6_K: 2 x 16 int8 scales of the
 *           block's halves (the super-block's d as 16 fp16 precedes its 8 blocks)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

typedef struct {
    int8_t q[32];
    float dx;          /* scale */
    int32_t sx;        /* sum of q */
    float sxf;         /* sx * dx */
    int32_t sxlo;      /* sum of q[0..15] (Q6_K's halves) */
} q8block;

int tq_q8_block_bytes(void) { return (int)sizeof(q8block); }

int tq_packable(int fmt, int64_t N, int64_t K) {
    int ok = fmt == Q4_0 || fmt == Q4_1 || fmt == Q5_0 || fmt == Q5_1 || fmt == Q8_0 || fmt == Q4_K ||
             fmt == Q5_K || fmt == Q6_K;
    return ok && N % 16 == 0 && K % block_size_of(fmt) == 0;
}

/* bytes of one group-block (16 rows x 32 weights), and of a super-block header for the K formats */
static int64_t block_stride(int fmt) {
    switch (fmt) {
    case Q4_0: return 256 + 32;
    case Q4_1: return 256 + 64;
    case Q5_0: return 256 + 64 + 32;
    case Q5_1: return 256 + 64 + 64;
    case Q8_0: return 512 + 32;
    case Q4_K: return 256 + 32;
    case Q5_K: return 256 + 64 + 32;
    case Q6_K: return 256 + 128 + 32;
    default: return 0;
    }
}

static int64_t super_header(int fmt) { return fmt == Q4_K || fmt == Q5_K ? 64 : fmt == Q6_K ? 32 : 0; }

int64_t tq_packed_bytes(int fmt, int64_t N, int64_t K) {
    int64_t blocks = K / 32, supers = block_size_of(fmt) == 256 ? K / 256 : 0;
    return N / 16 * (blocks * block_stride(fmt) + supers * super_header(fmt));
}

/* ---- activations ------------------------------------------------------------------------------------------ */
/* Each 32-block of a bf16 row as int8 with its scale, rounded to nearest even (lrintf in the default mode). The
   AVX-512 path does the same operations 16 lanes at a time (the max is exact in any order, products and
   rounding are lane-wise, the sums are of integers), so both give the same bits. */
static void quantize_row(const uint16_t *x, int64_t K, q8block *out, int portable) {
#if TQ_AVX512
    if (!portable) {
        const __m512 sign = _mm512_set1_ps(-0.0f);
        for (int64_t b = 0; b < K / 32; b++) {
            q8block *o = &out[b];
            __m512 lo = load_bf16x16(x + 32 * b), hi = load_bf16x16(x + 32 * b + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, lo), _mm512_andnot_ps(sign, hi)));
            float dx = amax / 127.0f, id = dx != 0.0f ? 1.0f / dx : 0.0f;
            __m512 idv = _mm512_set1_ps(id);
            __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, idv));
            __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, idv));
            _mm_storeu_si128((__m128i *)o->q, _mm512_cvtepi32_epi8(qlo));
            _mm_storeu_si128((__m128i *)(o->q + 16), _mm512_cvtepi32_epi8(qhi));
            o->dx = dx;
            o->sxlo = _mm512_reduce_add_epi32(qlo);
            o->sx = o->sxlo + _mm512_reduce_add_epi32(qhi);
            o->sxf = (float)o->sx * dx;
        }
        return;
    }
#elif TQ_AVX2
    if (!portable) {
        const __m256 sign = _mm256_set1_ps(-0.0f);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);   /* undoes the packs' lane split */
        for (int64_t b = 0; b < K / 32; b++) {
            q8block *o = &out[b];
            __m256 v[4];
            for (int j = 0; j < 4; j++) v[j] = load_bf16x8(x + 32 * b + 8 * j);
            __m256 a01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
            __m256 a23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
            float amax = hmax8(_mm256_max_ps(a01, a23));
            float dx = amax / 127.0f, id = dx != 0.0f ? 1.0f / dx : 0.0f;
            __m256 idv = _mm256_set1_ps(id);
            __m256i q[4];
            for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], idv));
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i *)o->q, _mm256_permutevar8x32_epi32(bytes, order));
            int32_t lo[8], hi[8];
            _mm256_storeu_si256((__m256i *)lo, _mm256_add_epi32(q[0], q[1]));
            _mm256_storeu_si256((__m256i *)hi, _mm256_add_epi32(q[2], q[3]));
            o->sxlo = 0;
            o->sx = 0;
            for (int i = 0; i < 8; i++) {
                o->sxlo += lo[i];
                o->sx += hi[i];
            }
            o->sx += o->sxlo;
            o->dx = dx;
            o->sxf = (float)o->sx * dx;
        }
        return;
    }
#endif
    (void)portable;
    for (int64_t b = 0; b < K / 32; b++) {
        q8block *o = &out[b];
        float v[32], amax = 0;
        for (int i = 0; i < 32; i++) {
            v[i] = bf16_to_f32(x[32 * b + i]);
            float a = fabsf(v[i]);
            if (a > amax) amax = a;
        }
        float dx = amax / 127.0f, id = dx != 0.0f ? 1.0f / dx : 0.0f;
        int32_t s = 0;
        for (int i = 0; i < 32; i++) {
            o->q[i] = (int8_t)lrintf(v[i] * id);
            s += o->q[i];
        }
        o->dx = dx;
        o->sx = s;
        o->sxf = (float)s * dx;
        o->sxlo = 0;
        for (int i = 0; i < 16; i++) o->sxlo += o->q[i];
    }
}

typedef struct {
    const uint16_t *x;
    int64_t K, ldx;
    q8block *out;
    int portable;
} quantize_args;

static void quantize_task(void *p, int64_t t0, int64_t t1) {
    quantize_args *a = p;
    for (int64_t t = t0; t < t1; t++) quantize_row(a->x + t * a->ldx, a->K, a->out + t * (a->K / 32), a->portable);
}

/* bf16 x [T, K] (row stride ldx) -> T rows of K/32 q8blocks */
int tq_quantize_q8(const uint16_t *x, int64_t T, int64_t K, int64_t ldx, void *out, int portable) {
    if (K % 32) return -1;
    quantize_args a = {x, K, ldx, out, portable};
    tq_parallel_for(quantize_task, &a, T, T >= 32 ? 8 : T);
    return 0;
}

/* ---- packing ---------------------------------------------------------------------------------------------- */
/* one row's block b: codes (natural order, unsigned), scale, min (value = d * (code - off) + m), Q6_K's two
   half scales, and the super-block values of the K formats */
typedef struct {
    uint8_t c[32];
    uint16_t d16, m16;         /* fp16 scale / min (32-blocks) */
    uint8_t sc, mn;            /* Q4_K / Q5_K 6-bit scale and min */
    int8_t s6[2];              /* Q6_K half scales */
    uint16_t sd16, sdmin16;    /* K formats: the super-block's d (and dmin) */
} block_codes;

static void codes_of(int fmt, const uint8_t *row, int64_t b, block_codes *o) {
    memset(o, 0, sizeof *o);
    switch (fmt) {
    case Q4_0: case Q4_1: {
        const uint8_t *p = row + b * (fmt == Q4_0 ? 18 : 20), *qs = p + (fmt == Q4_0 ? 2 : 4);
        o->d16 = rd16(p);
        if (fmt == Q4_1) o->m16 = rd16(p + 2);
        for (int i = 0; i < 16; i++) {
            o->c[i] = qs[i] & 15;
            o->c[i + 16] = qs[i] >> 4;
        }
        return;
    }
    case Q5_0: case Q5_1: {
        const uint8_t *p = row + b * (fmt == Q5_0 ? 22 : 24);
        int off = fmt == Q5_0 ? 2 : 4;
        uint32_t qh = rd32(p + off);
        const uint8_t *qs = p + off + 4;
        o->d16 = rd16(p);
        if (fmt == Q5_1) o->m16 = rd16(p + 2);
        for (int i = 0; i < 16; i++) {
            o->c[i] = (qs[i] & 15) | ((qh >> i) & 1) << 4;
            o->c[i + 16] = (qs[i] >> 4) | ((qh >> (i + 16)) & 1) << 4;
        }
        return;
    }
    case Q8_0: {
        const uint8_t *p = row + b * 34;
        o->d16 = rd16(p);
        for (int i = 0; i < 32; i++) o->c[i] = p[2 + i] ^ 0x80;      /* int8 + 128 */
        return;
    }
    case Q4_K: case Q5_K: {
        int64_t sb = b / 8;
        int j = (int)(b % 8), sc, mn;
        const uint8_t *p = row + sb * (fmt == Q4_K ? 144 : 176);
        k_scale_min(p + 4, j, &sc, &mn);
        o->sc = (uint8_t)sc;
        o->mn = (uint8_t)mn;
        o->sd16 = rd16(p);
        o->sdmin16 = rd16(p + 2);
        const uint8_t *qs = p + (fmt == Q4_K ? 16 : 48) + (j / 2) * 32, *qh = p + 16;
        for (int i = 0; i < 32; i++) {
            o->c[i] = (j & 1) ? qs[i] >> 4 : qs[i] & 15;
            if (fmt == Q5_K) o->c[i] |= ((qh[i] >> j) & 1) << 4;
        }
        return;
    }
    case Q6_K: {
        int64_t sb = b / 8;
        int j = (int)(b % 8), cc = j / 4, g = j % 4;
        const uint8_t *p = row + sb * 210, *ql = p + cc * 64 + (g & 1) * 32, *qh = p + 128 + cc * 32;
        const int8_t *scales = (const int8_t *)(p + 192);
        o->sd16 = rd16(p + 208);
        o->s6[0] = scales[cc * 8 + g * 2];
        o->s6[1] = scales[cc * 8 + g * 2 + 1];
        for (int i = 0; i < 32; i++) o->c[i] = ((g < 2) ? (ql[i] & 15) : (ql[i] >> 4)) | ((qh[i] >> (2 * g)) & 3) << 4;
        return;
    }
    }
}

/* the 4-bit part of 16 rows' codes: chunk c holds bytes 4c..4c+3 of each row's nibble bytes */
static void put_nibbles(uint8_t *dst, block_codes *rows) {
    for (int c = 0; c < 4; c++)
        for (int r = 0; r < 16; r++)
            for (int k = 0; k < 4; k++) {
                int e = 4 * c + k;
                dst[64 * c + 4 * r + k] = (uint8_t)((rows[r].c[e] & 15) | (rows[r].c[e + 16] & 15) << 4);
            }
}

/* one bit per code byte of chunk c (elements 4c..4c+3 of each row), set where the code has ``bit`` */
static void put_bits(uint8_t *dst, block_codes *rows, int bit) {
    for (int c = 0; c < 8; c++) {
        uint64_t mask = 0;
        for (int r = 0; r < 16; r++)
            for (int k = 0; k < 4; k++)
                if (rows[r].c[4 * c + k] & bit) mask |= 1ull << (4 * r + k);
        memcpy(dst + 8 * c, &mask, 8);
    }
}

typedef struct {
    int fmt;
    const uint8_t *w;
    int64_t row_bytes, K;
    uint8_t *out;
} pack_args;

/* Q4_0, Q4_1 and Q8_0 keep their bytes: the packed nibble layout is GGUF's own (element e in the low nibble of
   byte e, element e + 16 in its high nibble), so packing them is copying 4-byte runs (a load takes 0.1 s). */
static int pack_copy(const pack_args *a, int64_t g) {
    int fmt = a->fmt;
    if (fmt != Q4_0 && fmt != Q4_1 && fmt != Q8_0) return 0;
    int64_t blocks = a->K / 32, stride = block_stride(fmt);
    int bb = fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : 34, qoff = fmt == Q4_1 ? 4 : 2, chunks = fmt == Q8_0 ? 8 : 4;
    uint8_t *dst = a->out + g * blocks * stride;
    for (int64_t b = 0; b < blocks; b++, dst += stride) {
        for (int r = 0; r < 16; r++) {
            const uint8_t *blk = a->w + (16 * g + r) * a->row_bytes + b * bb;
            for (int c = 0; c < chunks; c++) memcpy(dst + 64 * c + 4 * r, blk + qoff + 4 * c, 4);
            uint8_t *s = dst + 64 * chunks;
            memcpy(s + 2 * r, blk, 2);
            if (fmt == Q4_1) memcpy(s + 32 + 2 * r, blk + 2, 2);
        }
        if (fmt == Q8_0)
            for (int i = 0; i < 512; i++) dst[i] ^= 0x80;
    }
    return 1;
}

static void pack_groups(void *p, int64_t g0, int64_t g1) {
    const pack_args *a = p;
    int fmt = a->fmt;
    int64_t blocks = a->K / 32, stride = block_stride(fmt), header = super_header(fmt);
    int64_t group_bytes = blocks * stride + (header ? a->K / 256 * header : 0);
    block_codes rows[16];
    for (int64_t g = g0; g < g1; g++) {
        if (pack_copy(a, g)) continue;
        uint8_t *dst = a->out + g * group_bytes;
        for (int64_t b = 0; b < blocks; b++) {
            for (int r = 0; r < 16; r++) codes_of(fmt, a->w + (16 * g + r) * a->row_bytes, b, &rows[r]);
            if (header && b % 8 == 0) {    /* the super-block's d (and dmin) of the 16 rows */
                for (int r = 0; r < 16; r++) {
                    memcpy(dst + 2 * r, &rows[r].sd16, 2);
                    if (fmt != Q6_K) memcpy(dst + 32 + 2 * r, &rows[r].sdmin16, 2);
                }
                dst += header;
            }
            if (fmt == Q8_0) {
                for (int c = 0; c < 8; c++)
                    for (int r = 0; r < 16; r++) memcpy(dst + 64 * c + 4 * r, rows[r].c + 4 * c, 4);
            } else {
                put_nibbles(dst, rows);
            }
            uint8_t *s = dst + (fmt == Q8_0 ? 512 : 256);
            if (fmt == Q5_0 || fmt == Q5_1 || fmt == Q5_K) {
                put_bits(s, rows, 16);
                s += 64;
            }
            if (fmt == Q6_K) {            /* the high 2 bits: 8 chunks x 16 bytes, byte 2r / 2r + 1 of chunk c */
                for (int c = 0; c < 8; c++)  /* hold rows r's elements 4c..4c+3 as 2-bit fields, low first */
                    for (int r = 0; r < 16; r++) {
                        uint8_t v = 0;
                        for (int k = 0; k < 4; k++) v |= (uint8_t)((rows[r].c[4 * c + k] >> 4) & 3) << (2 * k);
                        s[16 * c + r] = v;
                    }
                s += 128;
            }
            for (int r = 0; r < 16; r++) {
                switch (fmt) {
                case Q4_K: case Q5_K:
                    s[r] = rows[r].sc;
                    s[16 + r] = rows[r].mn;
                    break;
                case Q6_K:
                    s[r] = (uint8_t)rows[r].s6[0];
                    s[16 + r] = (uint8_t)rows[r].s6[1];
                    break;
                default:
                    memcpy(s + 2 * r, &rows[r].d16, 2);
                    if (fmt == Q4_1 || fmt == Q5_1) memcpy(s + 32 + 2 * r, &rows[r].m16, 2);
                }
            }
            dst += stride;
        }
    }
}

int tq_pack(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, uint8_t *out) {
    if (!tq_packable(fmt, N, K) || row_bytes_of(fmt, K) != row_bytes) return -1;
    pack_args a = {fmt, w, row_bytes, K, out};
    tq_parallel_for(pack_groups, &a, N / 16, 4);
    return 0;
}

/* ---- the product ---------------------------------------------------------------------------------------- */
typedef struct {
    int fmt;
    const uint8_t *w;          /* packed */
    int64_t K, T, ldy;
    const q8block *x;
    void *y;
    int y_bf16;
} packed_args;

static inline void put16(const packed_args *a, int64_t t, int64_t n0, const float *v) {
    for (int r = 0; r < 16; r++) {
        if (a->y_bf16)
            ((uint16_t *)a->y)[t * a->ldy + n0 + r] = f32_to_bf16(v[r]);
        else
            ((float *)a->y)[t * a->ldy + n0 + r] = v[r];
    }
}

/* One group-block's decoded weights: codes per chunk (uint8, 16 rows x 4), and per row: the scale of each
   half (equal but for Q6_K), the min, the code offset. */
typedef struct {
    uint8_t c[8][64];
    float d[2][16], m[16];
    int off, mins, halves;
} group_block;

static void decode_group_block(int fmt, const uint8_t **pp, int64_t b, float *sd, float *sdmin, group_block *o) {
    const uint8_t *p = *pp;
    int header = (int)super_header(fmt);
    if (header && b % 8 == 0) {
        for (int r = 0; r < 16; r++) {
            sd[r] = fp16_to_f32(rd16(p + 2 * r));
            if (fmt != Q6_K) sdmin[r] = fp16_to_f32(rd16(p + 32 + 2 * r));
        }
        p += header;
    }
    o->off = fmt == Q4_0 ? 8 : fmt == Q5_0 ? 16 : fmt == Q6_K ? 32 : fmt == Q8_0 ? 128 : 0;
    o->mins = fmt == Q4_1 || fmt == Q5_1 || fmt == Q4_K || fmt == Q5_K;
    o->halves = fmt == Q6_K;
    if (fmt == Q8_0) {
        memcpy(o->c, p, 512);
    } else {
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 64; i++) {
                o->c[c][i] = p[64 * c + i] & 15;
                o->c[c + 4][i] = p[64 * c + i] >> 4;
            }
    }
    const uint8_t *s = p + (fmt == Q8_0 ? 512 : 256);
    if (fmt == Q5_0 || fmt == Q5_1 || fmt == Q5_K) {
        for (int c = 0; c < 8; c++) {
            uint64_t mask;
            memcpy(&mask, s + 8 * c, 8);
            for (int i = 0; i < 64; i++)
                if (mask >> i & 1) o->c[c][i] |= 16;
        }
        s += 64;
    }
    if (fmt == Q6_K) {
        for (int c = 0; c < 8; c++)
            for (int i = 0; i < 64; i++) o->c[c][i] |= (uint8_t)(((s[16 * c + i / 4] >> (2 * (i % 4))) & 3) << 4);
        s += 128;
    }
    for (int r = 0; r < 16; r++) {
        switch (fmt) {
        case Q4_K: case Q5_K:
            o->d[0][r] = o->d[1][r] = sd[r] * (float)s[r];
            o->m[r] = 0.0f - sdmin[r] * (float)s[16 + r];
            break;
        case Q6_K:
            o->d[0][r] = sd[r] * (float)(int8_t)s[r];
            o->d[1][r] = sd[r] * (float)(int8_t)s[16 + r];
            o->m[r] = 0;
            break;
        default:
            o->d[0][r] = o->d[1][r] = fp16_to_f32(rd16(s + 2 * r));
            o->m[r] = (fmt == Q4_1 || fmt == Q5_1) ? fp16_to_f32(rd16(s + 32 + 2 * r)) : 0;
        }
    }
    *pp = p + block_stride(fmt);
}

/* the scales of a group-block at p (past any super-block header): after its codes and fifth / high bits */
static inline const uint8_t *scales_of(const int fmt, const uint8_t *p) {
    return p + (fmt == Q8_0 ? 512 : 256) + (fmt == Q5_0 || fmt == Q5_1 || fmt == Q5_K ? 64 : 0) +
           (fmt == Q6_K ? 128 : 0);
}

/* The portable path: the AVX512 path's integer sums and float operations, one lane at a time. For a block,
   a lane's integer sum runs over its chunks (Q6_K: chunks 0-3 and 4-7 apart, each half with its scale). */
static void packed_portable(void *p, int64_t g0, int64_t g1) {
    const packed_args *a = p;
    int64_t blocks = a->K / 32;
    group_block gb;
    float sd[16] = {0}, sdmin[16] = {0}, acc[16];
    for (int64_t g = g0; g < g1; g++) {
        for (int64_t t = 0; t < a->T; t++) {
            const uint8_t *w = a->w + g * (tq_packed_bytes(a->fmt, 16, a->K));
            const q8block *x = a->x + t * blocks;
            for (int r = 0; r < 16; r++) acc[r] = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                decode_group_block(a->fmt, &w, b, sd, sdmin, &gb);
                for (int r = 0; r < 16; r++) {
                    int32_t s[2] = {0, 0};
                    for (int c = 0; c < 8; c++)
                        for (int k = 0; k < 4; k++)
                            s[gb.halves && c >= 4] += (int32_t)gb.c[c][4 * r + k] * x[b].q[4 * c + k];
                    if (gb.halves) {
                        s[0] -= gb.off * x[b].sxlo;
                        s[1] -= gb.off * (x[b].sx - x[b].sxlo);
                        acc[r] = fmaf((float)s[0], gb.d[0][r] * x[b].dx, acc[r]);
                        acc[r] = fmaf((float)s[1], gb.d[1][r] * x[b].dx, acc[r]);
                    } else {
                        s[0] -= gb.off * x[b].sx;
                        acc[r] = fmaf((float)s[0], gb.d[0][r] * x[b].dx, acc[r]);
                        if (gb.mins) acc[r] = fmaf(gb.m[r], x[b].sxf, acc[r]);
                    }
                }
            }
            put16(a, t, 16 * g, acc);
        }
    }
}

#if TQ_AVX512
#define TILE 8

/* the 8 code vectors of a group-block (Q4-like nibbles, Q8_0 bytes, plus the fifth / Q6_K high bits) */
static inline __attribute__((always_inline)) void load_codes(const int fmt, const uint8_t *p, __m512i *c) {
    if (fmt == Q8_0) {
        for (int k = 0; k < 8; k++) c[k] = _mm512_loadu_si512(p + 64 * k);
        return;
    }
    __m512i f = _mm512_set1_epi8(15);
    for (int k = 0; k < 4; k++) {
        __m512i v = _mm512_loadu_si512(p + 64 * k);
        c[k] = _mm512_and_si512(v, f);
        c[k + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), f);
    }
    const uint8_t *s = p + 256;
    if (fmt == Q5_0 || fmt == Q5_1 || fmt == Q5_K) {
        for (int k = 0; k < 8; k++) {
            uint64_t mask;
            memcpy(&mask, s + 8 * k, 8);
            c[k] = _mm512_mask_add_epi8(c[k], (__mmask64)mask, c[k], _mm512_set1_epi8(16));
        }
    }
    if (fmt == Q6_K) {
        /* chunk k: 16 bytes, byte r holds row r's 4 high-bit pairs; spread each to its 4 code bytes */
        /* bit offsets 0, 2, 4, 6 within each lane's byte (a qword holds two lanes) */
        __m512i shifts = _mm512_set1_epi64(0x2624222006040200ll);
        for (int k = 0; k < 8; k++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 16 * k)));
            __m512i h = _mm512_multishift_epi64_epi8(shifts, v);
            h = _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(3)), 4);
            c[k] = _mm512_or_si512(c[k], h);
        }
    }
}

/* A group-block's scales for its 16 weight rows: d0 (Q6_K: d0, d1 for its halves) and the min m, from the
   scales at s (after the codes) and the super-block's sd, sdmin (the K formats). Shared by the VNNI and AMX
   paths, whose float operations must be the same for the same bits. */
static inline __attribute__((always_inline)) void block_scales(const int fmt, const uint8_t *s, __m512 sd,
                                                               __m512 sdmin, __m512 *d0, __m512 *d1, __m512 *m) {
    *d1 = _mm512_setzero_ps();
    *m = _mm512_setzero_ps();
    if (fmt == Q4_K || fmt == Q5_K) {
        *d0 = _mm512_mul_ps(sd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)s))));
        *m = _mm512_sub_ps(_mm512_setzero_ps(),
                           _mm512_mul_ps(sdmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 16))))));
    } else if (fmt == Q6_K) {
        *d0 = _mm512_mul_ps(sd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)s))));
        *d1 = _mm512_mul_ps(sd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(s + 16)))));
    } else {
        *d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s));
        if (fmt == Q4_1 || fmt == Q5_1) *m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 32)));
    }
}


/* one input row's block: its exact integer sums s0 (Q6_K: s0, s1 for the halves) against the 16 weight rows,
   less the codes' offset, scaled into acc */
static inline __attribute__((always_inline)) __m512 scale_sums(const int fmt, const q8block *xb, __m512i s0,
                                                               __m512i s1, __m512 d0, __m512 d1, __m512 m,
                                                               __m512 acc) {
    const int off_sh = fmt == Q4_0 ? 3 : fmt == Q5_0 ? 4 : fmt == Q6_K ? 5 : fmt == Q8_0 ? 7 : 0;
    const int mins = fmt == Q4_1 || fmt == Q5_1 || fmt == Q4_K || fmt == Q5_K;
    __m512 dx = _mm512_set1_ps(xb->dx);
    if (fmt == Q6_K) {
        s0 = _mm512_sub_epi32(s0, _mm512_set1_epi32(xb->sxlo << off_sh));
        s1 = _mm512_sub_epi32(s1, _mm512_set1_epi32((xb->sx - xb->sxlo) << off_sh));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(d0, dx), acc);
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(d1, dx), acc);
    }
    if (off_sh) s0 = _mm512_sub_epi32(s0, _mm512_set1_epi32(xb->sx << off_sh));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(d0, dx), acc);
    return mins ? _mm512_fmadd_ps(m, _mm512_set1_ps(xb->sxf), acc) : acc;
}

/* rows t0 .. t0 + n - 1 of y, columns 16g .. 16g + 15 */
static inline void store_rows(const packed_args *a, int64_t t0, int n, int64_t g, const __m512 *acc) {
    for (int i = 0; i < n; i++) {
        if (a->y_bf16) {
            _mm256_storeu_si256((__m256i *)((uint16_t *)a->y + (t0 + i) * a->ldy + 16 * g),
                                (__m256i)_mm512_cvtneps_pbh(acc[i]));
        } else {
            _mm512_storeu_ps((float *)a->y + (t0 + i) * a->ldy + 16 * g, acc[i]);
        }
    }
}

/* T input rows (TB <= TILE, a constant at each call site) against one group of 16 weight rows */
static inline __attribute__((always_inline)) void packed_tile(const packed_args *a, const uint8_t *w, int64_t g,
                                                              int64_t t0, const int TB, const int fmt) {
    int64_t blocks = a->K / 32;
    int header = (int)super_header(fmt);
    __m512 acc[TILE], sd = _mm512_setzero_ps(), sdmin = _mm512_setzero_ps();
    for (int i = 0; i < TB; i++) acc[i] = _mm512_setzero_ps();
    const uint8_t *p = w;
    for (int64_t b = 0; b < blocks; b++) {
        if (header && b % 8 == 0) {
            sd = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
            if (fmt != Q6_K) sdmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
            p += header;
        }
        __m512i c[8];
        load_codes(fmt, p, c);
        __m512 d0, d1, m;
        block_scales(fmt, scales_of(fmt, p), sd, sdmin, &d0, &d1, &m);
        for (int i = 0; i < TB; i++) {
            const q8block *xb = a->x + (t0 + i) * blocks + b;
            const int32_t *q4 = (const int32_t *)xb->q;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            if (fmt == Q6_K) {
                for (int k = 0; k < 4; k++) s0 = _mm512_dpbusd_epi32(s0, c[k], _mm512_set1_epi32(q4[k]));
                for (int k = 4; k < 8; k++) s1 = _mm512_dpbusd_epi32(s1, c[k], _mm512_set1_epi32(q4[k]));
            } else {
                for (int k = 0; k < 8; k++) s0 = _mm512_dpbusd_epi32(s0, c[k], _mm512_set1_epi32(q4[k]));
            }
            acc[i] = scale_sums(fmt, xb, s0, s1, d0, d1, m, acc[i]);
        }
        p += block_stride(fmt);
    }
    store_rows(a, t0, TB, g, acc);
}

#if TQ_AMX
/* tiles: 0, 5 and 6, 7 sums (16 input rows x 16 int32, even and odd blocks); 1 activations (16 x 32 int8), 2
   codes (8 x 64); Q6_K's halves: 3 activations (16 x 16), 4 codes (4 x 64) */
static void amx_begin(void) {
    tile_config c = {.palette = 1};
    c.rows[0] = c.rows[1] = c.rows[3] = c.rows[5] = c.rows[6] = c.rows[7] = 16;
    c.colsb[0] = c.colsb[5] = c.colsb[6] = c.colsb[7] = 64;
    c.colsb[1] = 32;
    c.colsb[3] = 16;
    c.rows[2] = 8;
    c.rows[4] = 4;
    c.colsb[2] = c.colsb[4] = 64;
    _tile_loadconfig(&c);
}

/* the code vectors of a group's blocks, 512 bytes each, as tile B rows (load_codes' order: codes 4r..4r+3 of
   the 16 weight rows in row r) */
static inline __attribute__((always_inline)) void amx_codes(const packed_args *a, const uint8_t *w, const int fmt,
                                                            uint8_t *codes) {
    int64_t blocks = a->K / 32;
    int header = (int)super_header(fmt);
    const uint8_t *p = w;
    for (int64_t b = 0; b < blocks; b++) {
        if (header && b % 8 == 0) p += header;
        __m512i c[8];
        load_codes(fmt, p, c);
        for (int k = 0; k < 8; k++) _mm512_store_si512(codes + 512 * b + 64 * k, c[k]);
        p += block_stride(fmt);
    }
}

/* block b's integer sums of 16 input rows (x0: the first's q8block b) into sums[0] (Q6_K: halves in sums[0],
   sums[1]), through tile pair (0, 5) or (6, 7) */
/* one block's sums into tile C (Q6_K: its halves into tiles C, C2), stored to sums (tile numbers are
   immediates, so each pair is spelled out) */
#define AMX_SUMS(C)                                                                                            \
    do {                                                                                                       \
        _tile_zero(C);                                                                                         \
        _tile_loadd(1, x0->q, stride);                                                                        \
        _tile_loadd(2, cb, 64);                                                                                \
        _tile_dpbsud(C, 1, 2);                                                                                 \
        _tile_stored(C, sums[0], 64);                                                                          \
    } while (0)
#define AMX_SUMS_HALVES(C, C2)                                                                                 \
    do {                                                                                                       \
        _tile_zero(C);                                                                                         \
        _tile_zero(C2);                                                                                        \
        _tile_loadd(3, x0->q, stride);                                                                        \
        _tile_loadd(4, cb, 64);                                                                                \
        _tile_dpbsud(C, 3, 4);                                                                                 \
        _tile_loadd(3, x0->q + 16, stride);                                                                   \
        _tile_loadd(4, cb + 256, 64);                                                                          \
        _tile_dpbsud(C2, 3, 4);                                                                                \
        _tile_stored(C, sums[0], 64);                                                                          \
        _tile_stored(C2, sums[1], 64);                                                                         \
    } while (0)
static inline __attribute__((always_inline)) void amx_sums(const int fmt, const q8block *x0, int64_t stride,
                                                           const uint8_t *cb, int32_t (*sums)[256], int odd) {
    if (fmt == Q6_K) {
        if (odd) AMX_SUMS_HALVES(6, 7);
        else AMX_SUMS_HALVES(0, 5);
    } else if (odd) {
        AMX_SUMS(6);
    } else {
        AMX_SUMS(0);
    }
}
#undef AMX_SUMS
#undef AMX_SUMS_HALVES

/* 16 input rows from t0 against one group of 16 weight rows: packed_tile's float operations on sums from AMX
   (block b + 1's tile work is issued before block b's float work, so the two overlap) */
static inline __attribute__((always_inline)) void amx_tile(const packed_args *a, const uint8_t *w, int64_t g,
                                                           int64_t t0, const int fmt, const uint8_t *codes) {
    int64_t blocks = a->K / 32, stride = blocks * (int64_t)sizeof(q8block);
    int header = (int)super_header(fmt);
    __m512 acc[16], sd = _mm512_setzero_ps(), sdmin = _mm512_setzero_ps();
    int32_t sums[2][2][16 * 16] __attribute__((aligned(64)));   /* [block parity][Q6_K half] */
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    const uint8_t *p = w;
    for (int64_t b = 0; b < blocks; b++) {
        if (header && b % 8 == 0) {
            sd = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
            if (fmt != Q6_K) sdmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
            p += header;
        }
        const q8block *x0 = a->x + t0 * blocks + b;
        if (b == 0) amx_sums(fmt, x0, stride, codes, sums[0], 0);
        if (b + 1 < blocks) amx_sums(fmt, x0 + 1, stride, codes + 512 * (b + 1), sums[(b + 1) & 1], (int)((b + 1) & 1));
        int32_t (*sb)[256] = sums[b & 1];
        __m512 d0, d1, m;
        block_scales(fmt, scales_of(fmt, p), sd, sdmin, &d0, &d1, &m);
        for (int i = 0; i < 16; i++)
            acc[i] = scale_sums(fmt, x0 + i * blocks, _mm512_load_si512(sb[0] + 16 * i),
                                fmt == Q6_K ? _mm512_load_si512(sb[1] + 16 * i) : _mm512_setzero_si512(), d0, d1, m,
                                acc[i]);
        p += block_stride(fmt);
    }
    store_rows(a, t0, 16, g, acc);
}

/* the first T / 16 * 16 input rows on AMX (with a buffer of the group's codes); returns the rows done */
#define AMX_ROWS(FMT)                                                                                          \
    int64_t amx_done = 0;                                                                                    \
    uint8_t *amx_buf = NULL;                                                                                 \
    if (tq_amx_on && a->T >= 16 && (amx_buf = aligned_alloc(64, (size_t)(512 * (a->K / 32))))) {            \
        amx_begin();                                                                                         \
        amx_done = a->T / 16 * 16;                                                                           \
    }
#define AMX_GROUP(FMT)                                                                                         \
    if (amx_done) {                                                                                          \
        amx_codes(a, w, FMT, amx_buf);                                                                       \
        for (int64_t t0 = 0; t0 < amx_done; t0 += 16) amx_tile(a, w, g, t0, FMT, amx_buf);                  \
    }
#define AMX_END()                                                                                              \
    if (amx_buf) {                                                                                           \
        _tile_release();                                                                                     \
        free(amx_buf);                                                                                       \
    }
#else
#define AMX_ROWS(FMT) const int64_t amx_done = 0;
#define AMX_GROUP(FMT)
#define AMX_END()
#endif

#define PACKED_KERNEL(FMT)                                                                                     \
    static void packed_##FMT(const packed_args *a, int64_t g0, int64_t g1) {                                 \
        int64_t group_bytes = tq_packed_bytes(FMT, 16, a->K);                                                \
        AMX_ROWS(FMT)                                                                                        \
        for (int64_t g = g0; g < g1; g++) {                                                                  \
            const uint8_t *w = a->w + g * group_bytes;                                                       \
            AMX_GROUP(FMT)                                                                                   \
            for (int64_t t0 = amx_done; t0 < a->T; t0 += TILE) {                                            \
                switch (a->T - t0 < TILE ? (int)(a->T - t0) : TILE) {                                        \
                case 1: packed_tile(a, w, g, t0, 1, FMT); break;                                             \
                case 2: packed_tile(a, w, g, t0, 2, FMT); break;                                             \
                case 3: packed_tile(a, w, g, t0, 3, FMT); break;                                             \
                case 4: packed_tile(a, w, g, t0, 4, FMT); break;                                             \
                case 5: packed_tile(a, w, g, t0, 5, FMT); break;                                             \
                case 6: packed_tile(a, w, g, t0, 6, FMT); break;                                             \
                case 7: packed_tile(a, w, g, t0, 7, FMT); break;                                             \
                default: packed_tile(a, w, g, t0, 8, FMT); break;                                            \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        AMX_END()                                                                                            \
    }

PACKED_KERNEL(Q4_0) PACKED_KERNEL(Q4_1) PACKED_KERNEL(Q5_0) PACKED_KERNEL(Q5_1) PACKED_KERNEL(Q8_0)
PACKED_KERNEL(Q4_K) PACKED_KERNEL(Q5_K) PACKED_KERNEL(Q6_K)

static void packed_avx512(void *p, int64_t g0, int64_t g1) {
    const packed_args *a = p;
    switch (a->fmt) {
    case Q4_0: packed_Q4_0(a, g0, g1); break;
    case Q4_1: packed_Q4_1(a, g0, g1); break;
    case Q5_0: packed_Q5_0(a, g0, g1); break;
    case Q5_1: packed_Q5_1(a, g0, g1); break;
    case Q8_0: packed_Q8_0(a, g0, g1); break;
    case Q4_K: packed_Q4_K(a, g0, g1); break;
    case Q5_K: packed_Q5_K(a, g0, g1); break;
    case Q6_K: packed_Q6_K(a, g0, g1); break;
    }
}
#endif

#if TQ_AVX2
/* The same products 8 lanes at a time: a group's 16 weight rows as two halves of 8 (rows 8h .. 8h + 7 are bytes
   32h .. 32h + 31 of each 64-byte code chunk). Without VNNI, four codes times four activations are summed by
   VPMADDUBSW (pairs into int16) and VPMADDWD (pairs of those into int32). Both are exact here: the int16 sums
   add chunks only while they cannot overflow (codes of 4 bits: all 8 chunks; 5 bits: 4; Q6_K's 6 bits: 2), and
   Q8_0 multiplies its signed codes' magnitudes by the activations carrying the codes' signs (at most 128 x 127
   per product). So every lane gets the portable path's integer sums and then its float operations. */
#define TILE_AVX2 6
/* bytes ahead that a group's first pass asks for, beside the hardware prefetcher: decode steps measured
   1.12-1.22x faster with it (benchmarks/kernel_ab.py), with the same bits */
#define PREFETCH_AVX2 2048

/* 32 bytes, byte i all ones where bit i of m is set */
static inline __m256i bytes_of_bits(uint32_t m) {
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m), _mm256_setr_epi64x(0, 0x0101010101010101ll,
                                                                                     0x0202020202020202ll,
                                                                                     0x0303030303030303ll));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* code vector k (0-7) of half h of a group-block (Q8_0: the signed codes) */
static inline __attribute__((always_inline)) __m256i chunk_code_avx2(const int fmt, const uint8_t *p, int h,
                                                                    int k) {
    if (fmt == Q8_0)
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 64 * k + 32 * h)), _mm256_set1_epi8(-128));
    __m256i v = _mm256_loadu_si256((const __m256i *)(p + 64 * (k & 3) + 32 * h));
    __m256i c = _mm256_and_si256(k < 4 ? v : _mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));
    const uint8_t *s = p + 256;
    if (fmt == Q5_0 || fmt == Q5_1 || fmt == Q5_K) {
        uint32_t m;
        memcpy(&m, s + 8 * k + 4 * h, 4);
        c = _mm256_or_si256(c, _mm256_and_si256(bytes_of_bits(m), _mm256_set1_epi8(16)));
    }
    if (fmt == Q6_K) {
        /* chunk k: byte r of 16 holds row r's four 2-bit fields; code byte 4r + j takes field j (bits 2j, 2j + 1);
           each 128-bit lane shuffles its own copy of the 16 bytes (lane 1: the half's rows 4-7) */
        const __m256i spread = h ? _mm256_setr_epi32(0x08080808, 0x09090909, 0x0a0a0a0a, 0x0b0b0b0b,
                                                     0x0c0c0c0c, 0x0d0d0d0d, 0x0e0e0e0e, 0x0f0f0f0f)
                                 : _mm256_setr_epi32(0x00000000, 0x01010101, 0x02020202, 0x03030303,
                                                     0x04040404, 0x05050505, 0x06060606, 0x07070707);
        const __m256i m0 = _mm256_set1_epi32(0x00000003), m1 = _mm256_set1_epi32(0x00000300),
                      m2 = _mm256_set1_epi32(0x00030000), m3 = _mm256_set1_epi32(0x03000000);
        __m256i v6 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(s + 16 * k)));
        v6 = _mm256_shuffle_epi8(v6, spread);
        __m256i f01 = _mm256_or_si256(_mm256_and_si256(v6, m0), _mm256_and_si256(_mm256_srli_epi16(v6, 2), m1));
        __m256i f23 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v6, 4), m2),
                                      _mm256_and_si256(_mm256_srli_epi16(v6, 6), m3));
        c = _mm256_or_si256(c, _mm256_slli_epi16(_mm256_or_si256(f01, f23), 4));
    }
    return c;
}

/* half h of a group-block's 8 code vectors */
static inline __attribute__((always_inline)) void load_codes_avx2(const int fmt, const uint8_t *p, int h,
                                                                  __m256i *c) {
    for (int k = 0; k < 8; k++) c[k] = chunk_code_avx2(fmt, p, h, k);
}

/* four codes times four activations, as int16 pairs */
static inline __m256i pair_products(__m256i c, __m256i x4) { return _mm256_maddubs_epi16(c, x4); }

static inline __m256i widen(__m256i p16) { return _mm256_madd_epi16(p16, _mm256_set1_epi16(1)); }

/* one input row's exact integer sums against 8 weight rows: s0 over all chunks (Q6_K: s0 over chunks 0-3, s1
   over 4-7); Q8_0's are of the signed codes, the others' of the unsigned */
static inline __attribute__((always_inline)) void block_sums_avx2(const int fmt, const __m256i *c,
                                                                  const int32_t *q4, __m256i *s0, __m256i *s1) {
    __m256i x[8];
    for (int k = 0; k < 8; k++) x[k] = _mm256_set1_epi32(q4[k]);
    if (fmt == Q8_0) {
        __m256i s = _mm256_setzero_si256();
        for (int k = 0; k < 8; k++)
            s = _mm256_add_epi32(s, widen(pair_products(_mm256_abs_epi8(c[k]), _mm256_sign_epi8(x[k], c[k]))));
        *s0 = s;
    } else if (fmt == Q6_K) {
        __m256i p[4];
        for (int j = 0; j < 4; j++)
            p[j] = _mm256_add_epi16(pair_products(c[2 * j], x[2 * j]), pair_products(c[2 * j + 1], x[2 * j + 1]));
        *s0 = _mm256_add_epi32(widen(p[0]), widen(p[1]));
        *s1 = _mm256_add_epi32(widen(p[2]), widen(p[3]));
    } else if (fmt == Q5_0 || fmt == Q5_1 || fmt == Q5_K) {
        __m256i p[2];
        for (int j = 0; j < 2; j++) {
            p[j] = pair_products(c[4 * j], x[4 * j]);
            for (int k = 1; k < 4; k++) p[j] = _mm256_add_epi16(p[j], pair_products(c[4 * j + k], x[4 * j + k]));
        }
        *s0 = _mm256_add_epi32(widen(p[0]), widen(p[1]));
    } else {
        __m256i q = pair_products(c[0], x[0]);
        for (int k = 1; k < 8; k++) q = _mm256_add_epi16(q, pair_products(c[k], x[k]));
        *s0 = widen(q);
    }
}

/* 8 bytes as floats, unsigned or signed */
static inline __m256 u8x8(const uint8_t *s) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)s)));
}
static inline __m256 i8x8(const uint8_t *s) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)s)));
}

/* half h of a group-block's scales (block_scales' operations) */
static inline __attribute__((always_inline)) void block_scales_avx2(const int fmt, const uint8_t *s, int h,
                                                                    __m256 sd, __m256 sdmin, __m256 *d0, __m256 *d1,
                                                                    __m256 *m) {
    *d1 = _mm256_setzero_ps();
    *m = _mm256_setzero_ps();
    if (fmt == Q4_K || fmt == Q5_K) {
        *d0 = _mm256_mul_ps(sd, u8x8(s + 8 * h));
        *m = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(sdmin, u8x8(s + 16 + 8 * h)));
    } else if (fmt == Q6_K) {
        *d0 = _mm256_mul_ps(sd, i8x8(s + 8 * h));
        *d1 = _mm256_mul_ps(sd, i8x8(s + 16 + 8 * h));
    } else {
        *d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 16 * h)));
        if (fmt == Q4_1 || fmt == Q5_1) *m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 32 + 16 * h)));
    }
}

/* scale_sums' operations on 8 lanes (Q8_0's sums are already of the signed codes: no offset) */
static inline __attribute__((always_inline)) __m256 scale_sums_avx2(const int fmt, const q8block *xb, __m256i s0,
                                                                    __m256i s1, __m256 d0, __m256 d1, __m256 m,
                                                                    __m256 acc) {
    const int off_sh = fmt == Q4_0 ? 3 : fmt == Q5_0 ? 4 : fmt == Q6_K ? 5 : 0;
    const int mins = fmt == Q4_1 || fmt == Q5_1 || fmt == Q4_K || fmt == Q5_K;
    __m256 dx = _mm256_set1_ps(xb->dx);
    if (fmt == Q6_K) {
        s0 = _mm256_sub_epi32(s0, _mm256_set1_epi32(xb->sxlo << off_sh));
        s1 = _mm256_sub_epi32(s1, _mm256_set1_epi32((xb->sx - xb->sxlo) << off_sh));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d0, dx), acc);
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(d1, dx), acc);
    }
    if (off_sh) s0 = _mm256_sub_epi32(s0, _mm256_set1_epi32(xb->sx << off_sh));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d0, dx), acc);
    return mins ? _mm256_fmadd_ps(m, _mm256_set1_ps(xb->sxf), acc) : acc;
}

/* TB input rows (TB <= TILE_AVX2, a constant at each call site) against one group of 16 weight rows */
static inline __attribute__((always_inline)) void packed_tile_avx2(const packed_args *a, const uint8_t *w,
                                                                   int64_t g, int64_t t0, const int TB,
                                                                   const int fmt) {
    int64_t blocks = a->K / 32;
    int header = (int)super_header(fmt);
    /* halves per pass over the group's blocks. Both halves at once, 4 rows already spilled their codes and
       accumulators through the stack on every block (AVX2 has 16 registers); in a pass of its own, a half's
       accumulators fit beside its codes. So a tile of 5-6 rows (prompt chunks), and of 3-4 rows with 4-bit codes
       (verify steps; their codes are made chunk by chunk below), takes a pass per half; 1-2 rows (decode steps)
       keep both halves in one pass, which streams the weights once. Prompts read 1.2-1.3x faster, 3-4-token
       verify forwards 1.15-1.3x (benchmarks/kernel_ab.py) */
    const int nibbles = fmt == Q4_0 || fmt == Q4_1 || fmt == Q4_K;   /* codes of 4 bits, all in the low ones */
    const int HP = TB >= 5 || (TB >= 3 && nibbles) ? 1 : 2;
    float v[TILE_AVX2][16];
    for (int h0 = 0; h0 < 2; h0 += HP) {
        __m256 acc[2][TILE_AVX2], sd[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, sdmin[2] = {sd[0], sd[0]};
        for (int h = 0; h < HP; h++)
            for (int i = 0; i < TB; i++) acc[h][i] = _mm256_setzero_ps();
        const uint8_t *p = w;
        for (int64_t b = 0; b < blocks; b++) {
            if (header && b % 8 == 0) {
                for (int h = h0; h < h0 + HP; h++) {
                    sd[h - h0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
                    if (fmt != Q6_K)
                        sdmin[h - h0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32 + 16 * h)));
                }
                p += header;
            }
            const uint8_t *s = scales_of(fmt, p);
            if (t0 == 0 && h0 == 0)   /* the group's first pass streams its weights from memory: ask ahead */
                for (int64_t o = 0; o < block_stride(fmt); o += 64) __builtin_prefetch(p + PREFETCH_AVX2 + o, 0, 0);
            for (int h = h0; h < h0 + HP; h++) {
                __m256 d0, d1, m;
                block_scales_avx2(fmt, s, h, sd[h - h0], sdmin[h - h0], &d0, &d1, &m);
                if (HP == 1 && nibbles) {
                    /* codes of 4 bits: chunk by chunk, each code vector made where it is used and taken by
                       every row, so only the rows' int16 sums stay live beside it */
                    __m256i q[TILE_AVX2];
                    for (int k = 0; k < 8; k++) {
                        __m256i ck = chunk_code_avx2(fmt, p, h, k);
                        for (int i = 0; i < TB; i++) {
                            const int32_t *x4 = (const int32_t *)a->x[(t0 + i) * blocks + b].q;
                            __m256i pk = pair_products(ck, _mm256_set1_epi32(x4[k]));
                            q[i] = k ? _mm256_add_epi16(q[i], pk) : pk;
                            __asm__("" : "+x"(q[i]));   /* keeps the chain: -O3 otherwise reassociates the adds
                                                          into a tree whose products all live at once (spilled) */
                        }
                    }
                    for (int i = 0; i < TB; i++)
                        acc[h - h0][i] = scale_sums_avx2(fmt, a->x + (t0 + i) * blocks + b, widen(q[i]),
                                                         _mm256_setzero_si256(), d0, d1, m, acc[h - h0][i]);
                    continue;
                }
                __m256i c[8];
                load_codes_avx2(fmt, p, h, c);
                for (int i = 0; i < TB; i++) {
                    const q8block *xb = a->x + (t0 + i) * blocks + b;
                    __m256i s0, s1 = _mm256_setzero_si256();
                    block_sums_avx2(fmt, c, (const int32_t *)xb->q, &s0, &s1);
                    acc[h - h0][i] = scale_sums_avx2(fmt, xb, s0, s1, d0, d1, m, acc[h - h0][i]);
                }
            }
            p += block_stride(fmt);
        }
        for (int h = h0; h < h0 + HP; h++)
            for (int i = 0; i < TB; i++) _mm256_storeu_ps(v[i] + 8 * h, acc[h - h0][i]);
    }
    for (int i = 0; i < TB; i++) put16(a, t0 + i, 16 * g, v[i]);
}

#define PACKED_KERNEL_AVX2(FMT)                                                                                \
    static void packed_avx2_##FMT(const packed_args *a, int64_t g0, int64_t g1) {                            \
        int64_t group_bytes = tq_packed_bytes(FMT, 16, a->K);                                                \
        for (int64_t g = g0; g < g1; g++) {                                                                  \
            const uint8_t *w = a->w + g * group_bytes;                                                       \
            for (int64_t t0 = 0; t0 < a->T; t0 += TILE_AVX2) {                                               \
                switch (a->T - t0 < TILE_AVX2 ? (int)(a->T - t0) : TILE_AVX2) {                              \
                case 1: packed_tile_avx2(a, w, g, t0, 1, FMT); break;                                        \
                case 2: packed_tile_avx2(a, w, g, t0, 2, FMT); break;                                        \
                case 3: packed_tile_avx2(a, w, g, t0, 3, FMT); break;                                        \
                case 4: packed_tile_avx2(a, w, g, t0, 4, FMT); break;                                        \
                case 5: packed_tile_avx2(a, w, g, t0, 5, FMT); break;                                        \
                default: packed_tile_avx2(a, w, g, t0, 6, FMT); break;                                       \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

PACKED_KERNEL_AVX2(Q4_0) PACKED_KERNEL_AVX2(Q4_1) PACKED_KERNEL_AVX2(Q5_0) PACKED_KERNEL_AVX2(Q5_1)
PACKED_KERNEL_AVX2(Q8_0) PACKED_KERNEL_AVX2(Q4_K) PACKED_KERNEL_AVX2(Q5_K) PACKED_KERNEL_AVX2(Q6_K)

static void packed_avx2(void *p, int64_t g0, int64_t g1) {
    const packed_args *a = p;
    switch (a->fmt) {
    case Q4_0: packed_avx2_Q4_0(a, g0, g1); break;
    case Q4_1: packed_avx2_Q4_1(a, g0, g1); break;
    case Q5_0: packed_avx2_Q5_0(a, g0, g1); break;
    case Q5_1: packed_avx2_Q5_1(a, g0, g1); break;
    case Q8_0: packed_avx2_Q8_0(a, g0, g1); break;
    case Q4_K: packed_avx2_Q4_K(a, g0, g1); break;
    case Q5_K: packed_avx2_Q5_K(a, g0, g1); break;
    case Q6_K: packed_avx2_Q6_K(a, g0, g1); break;
    }
}
#endif

/* y[t * ldy + n] = W[n] . x[t] for packed W [N, K] and T activation rows quantized by tq_quantize_q8 */
int tq_matmul_packed(int fmt, const uint8_t *packed, int64_t N, int64_t K, const void *xq, int64_t T, void *y,
                     int64_t ldy, int y_bf16, int portable) {
    if (!tq_packable(fmt, N, K)) return -1;
    packed_args a = {fmt, packed, K, T, ldy, xq, y, y_bf16};
#if TQ_AVX512
    tq_parallel_for(portable ? packed_portable : packed_avx512, &a, N / 16, 1);
#elif TQ_AVX2
    tq_parallel_for(portable ? packed_portable : packed_avx2, &a, N / 16, 1);
#else
    (void)portable;
    tq_parallel_for(packed_portable, &a, N / 16, 1);
#endif
    return 0;
}

/* the same with bf16 activations [T, K] (row stride ldx), quantized here */
int tq_matmul_packed_bf16(int fmt, const uint8_t *packed, int64_t N, int64_t K, const uint16_t *x, int64_t T,
                          int64_t ldx, void *y, int64_t ldy, int y_bf16, int portable) {
    if (!tq_packable(fmt, N, K)) return -1;
    void *xq = aligned_alloc(64, sizeof(q8block) * (size_t)(T * (K / 32)));
    if (!xq) return -3;
    tq_quantize_q8(x, T, K, ldx, xq, portable);
    int rc = tq_matmul_packed(fmt, packed, N, K, xq, T, y, ldy, y_bf16, portable);
    free(xq);
    return rc;
}
