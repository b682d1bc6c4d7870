/* Shared by tachy's CPU kernels: pool.c (threads), gguf_kernels.c (GGUF blocks, bf16 products), q8_matmul.c
   (int8-activation products) and decoder.c (a whole decoder forward). */
#ifndef TACHY_KERNELS_H
#define TACHY_KERNELS_H
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#include <immintrin.h>
#define TQ_AVX512 1
#else
#define TQ_AVX512 0
#endif

/* CPUs without AVX-512 (Zen 1-3, Intel client cores before Sapphire Rapids): AVX2 with FMA and F16C runs the
   int8 products of GGUF blocks (q8_matmul.c) and the decoder's float work 8 lanes at a time, with the portable
   path's operations lane by lane, so the same bits */
#if !TQ_AVX512 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TQ_AVX2 1
#else
#define TQ_AVX2 0
#endif

/* AMX tile units (Sapphire Rapids on), compiled where -march=native has them and used where tq_set_amx
   switched them on (decoder.c: the kernel must grant the process their state first) */
#if TQ_AVX512 && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define TQ_AMX 1
#else
#define TQ_AMX 0
#endif
extern int tq_amx_on;
#if TQ_AMX
/* the tile configuration LDTILECFG reads (palette 1: rows and bytes per row of each of 8 tiles) */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;
#endif

typedef void (*task_fn)(void *args, int64_t begin, int64_t end);

/* Run fn(args, begin, end) over [0, n) split in chunks of ``grain`` among the pool's threads. */
void tq_parallel_for(task_fn fn, void *args, int64_t n, int64_t grain);
void tq_parallel_for_dynamic(task_fn fn, void *args, int64_t n, int64_t grain);
int tq_get_threads(void);

/* y[t * ldy + n] = x[t] . W[n] for bf16 x [T, K] (row stride ldx); y float32 or bf16 (y_bf16). */
int tq_matmul(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const uint16_t *x,
              int64_t T, int64_t ldx, void *y, int64_t ldy, int y_bf16);
/* int8 activations on weights packed 16 rows at a time (q8_matmul.c) */
int tq_packable(int fmt, int64_t N, int64_t K);
int64_t tq_packed_bytes(int fmt, int64_t N, int64_t K);
int tq_pack(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, uint8_t *out);
int tq_q8_block_bytes(void);
int tq_quantize_q8(const uint16_t *x, int64_t T, int64_t K, int64_t ldx, void *out, int portable);
int tq_matmul_packed(int fmt, const uint8_t *packed, int64_t N, int64_t K, const void *xq, int64_t T, void *y,
                     int64_t ldy, int y_bf16, int portable);
int tq_matmul_packed_bf16(int fmt, const uint8_t *packed, int64_t N, int64_t K, const uint16_t *x, int64_t T,
                          int64_t ldx, void *y, int64_t ldy, int y_bf16, int portable);
/* rows of W (all N, or the listed ``rows``) as float32 or bf16 */
int tq_dequantize(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const int64_t *rows,
                  void *out, int bf16, int portable);

#if TQ_AVX512
static inline float hf16(uint16_t h) { return _cvtsh_ss(h); }   /* F16C: exact, like numpy's cast */
/* 16 bf16 values as float32 (exact: bf16 is float32's top half) */
static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif
#if TQ_AVX2
/* 8 bf16 values as float32 */
static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
/* the sum of 8 lanes as ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): the order in which sums8 below
   adds eight vectors' lanes at once, so one alone and eight together give the same bits */
static inline float hsum8(__m256 v) {
    __m256 h = _mm256_hadd_ps(v, v);
    h = _mm256_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
/* hsum8 of v[0..7], v[p]'s in lane p */
static inline __m256 sums8(const __m256 *v) {
    __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
/* 8 floats to bf16, rounded to nearest even with NaNs kept quiet (f32_to_bf16 lane by lane) */
static inline void store_bf16x8(uint16_t *dst, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(64)), nan);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(packed));
}
static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* ggml type ids (gguf.GGMLQuantizationType) */
enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14,
       BF16 = 30 };


/* ---- scalar helpers ------------------------------------------------------------------------------------- */
static inline float fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {                                  /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            man &= 0x3ff;
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | man << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {      /* round to nearest even, NaN kept quiet */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Bytes per row of K weights, and weights per block (the granularity of a row). */
static inline int64_t row_bytes_of(int fmt, int64_t K) {
    switch (fmt) {
    case F32: return 4 * K;
    case F16: case BF16: return 2 * K;
    case Q4_0: return K / 32 * 18;
    case Q4_1: return K / 32 * 20;
    case Q5_0: return K / 32 * 22;
    case Q5_1: return K / 32 * 24;
    case Q8_0: return K / 32 * 34;
    case Q4_K: return K / 256 * 144;
    case Q5_K: return K / 256 * 176;
    case Q6_K: return K / 256 * 210;
    default: return -1;
    }
}

static inline int block_size_of(int fmt) {
    switch (fmt) {
    case F32: case F16: case BF16: return 32;      /* handled 32 at a time too */
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: return 32;
    case Q4_K: case Q5_K: case Q6_K: return 256;
    default: return 0;
    }
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j (gguf's Q4_K.get_scale_min). */
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 2) & 0x30);
        *m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}


#endif
