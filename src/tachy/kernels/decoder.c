/* A whole decoder forward on the CPU in one call: Llama-family and Gemma 3 layers over GGUF blocks.
 *
 * The same model as tachy/models/llama.py and gemma3.py (read those for the math); this file only removes
 * what a tiny model's decode step otherwise spends between its matrix products (thousands of PyTorch ops per
 * token). The residual stream, norms, rope, attention scores and activations are float32; matrix inputs and
 * the K/V cache are bf16, as in the bf16 path.
 *
 * One call forwards T new tokens of one or several sequences (rows of the K/V cache). Token t is written at
 * slot slots[t] of cache row rows[t] and attends to that row's slots [0, prefix[t]) (within a sliding window
 * where the layer has one) and then to the new tokens its mask row allows, in that order. Every reduction
 * (dot products, softmax, sums over keys) runs in a fixed order over exactly those keys, so a token's result
 * does not depend on T or on the other tokens: a verify forward over a chain of drafts gives each token the
 * bits one-token decoding gives it, and a batch gives each sequence the bits it gets alone.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

/* Where a forward's time goes, summed over calls (tq_profile): a clock read per phase per layer, ~1 us a step. */
enum { P_EMBED, P_QKV, P_ROPE, P_ATTENTION, P_OUT, P_MLP_UP, P_MLP_DOWN, P_HEAD, P_COUNT };
static double profile[P_COUNT];
static int64_t profile_calls;

static inline double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* copy the phase totals (seconds: embeddings, q/k/v, norms + rope + cache writes, attention, output
   projection + residual, gate/up + activation, down + residual, final norm + output layer) and the number
   of forwards into out[0..8]; reset after when asked */
void tq_profile(double *out, int reset) {
    for (int i = 0; i < P_COUNT; i++) out[i] = profile[i];
    out[P_COUNT] = (double)profile_calls;
    if (reset) {
        memset(profile, 0, sizeof profile);
        profile_calls = 0;
    }
}

#define DEC_AVX512 TQ_AVX512
#define DEC_AVX2 TQ_AVX2

/* Intel's AMX tile units (Sapphire Rapids on) compute attention where the CPU has them and the kernel lets the
   process use them: scores for 16 keys by up to 16 (token, head) pairs per few TDPBF16PS instead of a fused
   multiply-add chain and a horizontal sum per pair and key (amx_scores), and the value sums 32 keys at a time
   (amx_values). A score is the dot product of the query (as two bf16 parts, ~16 bits) with the bf16 key over
   the channels in a fixed order, so its bits do not depend on the call's other pairs and keys; a value sum's
   depend on its pair's weights and the keys at each position of its list, which are the same for a token in
   a chunk, a verify row or decoded alone (see amx_values; sliding-window layers keep pv_group). Every
   attention call of a forward uses them (tq_amx_on is set once per process, tq_set_amx), so decoding,
   verification and batches stay row-invariant. The softmax is the AVX-512 path's. */
#define DEC_AMX TQ_AMX
#if DEC_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif
int tq_amx_on;   /* also q8_matmul.c's switch */

/* use AMX for attention scores (on: 1) where it exists; returns whether it is used. Linux hands a process the
   tile registers' state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA), once. */
int tq_set_amx(int on) {
#if DEC_AMX
    static int permitted = -1;
    if (on && permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    tq_amx_on = on && permitted > 0;
#else
    (void)on;
#endif
    return tq_amx_on;
}

/* Every field is 8 bytes wide, so the Python side (ctypes) lays the structs out the same way. */
typedef struct {
    int64_t fmt;
    const uint8_t *data;
    int64_t row_bytes, N, K;
    const uint8_t *packed;        /* the rows packed for the int8 kernels (q8_matmul.c), or NULL */
} tq_weight;

typedef struct {
    int64_t n_parts;              /* 1..3 weights stacked by rows (fused q/k/v, gate/up) */
    tq_weight part[3];
    int64_t N, K;
    const uint16_t *bias;         /* bf16 [N] or NULL */
} tq_linear;

typedef struct {
    tq_linear qkv, o, gate_up, down;
    const float *attn_norm, *post_attn_norm, *mlp_norm, *post_mlp_norm;   /* scales [hidden]; post_* may be NULL */
    const float *q_norm, *k_norm;                                         /* scales [head_dim] or NULL */
    const float *cos, *sin;                                               /* rope tables [rope_len, head_dim] */
    int64_t window;                                                       /* sliding window, 0 for none */
} tq_layer;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, inter, vocab, rope_len, gelu;
    double eps, attn_scale, embed_scale;
    const tq_layer *layers;
    tq_weight embed;
    tq_linear lm_head;
    const float *final_norm;
} tq_model;

typedef struct {
    uint16_t *k, *v;              /* bf16 [n_layers, batch, kv_heads, cap, head_dim] */
    int64_t batch, cap;
} tq_cache;

typedef struct {
    int64_t T;
    const int64_t *tokens, *positions, *rows, *slots, *prefix;
    const uint8_t *mask;          /* [T, T]: token t sees new token j; NULL: j <= t in the same row */
    int64_t n_logits;
    const int64_t *logit_rows;    /* tokens whose logits are computed (NULL: all T) */
    float *logits;                /* [n_logits, vocab] */
    float *hidden;                /* [T, hidden] final-norm hidden states, or NULL */
} tq_batch;

/* Decode-time sparse attention (tachy/sparse/): each query row of a sparse layer attends to its first
   ``sinks`` keys, its last ``window`` keys and ``select`` more chosen among the keys in between (the
   candidates), instead of all of them. The choice depends only on the row's query and the keys it sees, and
   a row whose candidates all fit reads exactly its dense key list, so rows keep dense attention's bits.
   Candidates lie within the cached prefix as long as window >= T (tachy checks it), i.e. among committed keys.
   Quest (method 1): keys come in pages of ``page`` slots; each page's elementwise key min/max (bf16, kept up
   to date for the pages a sequence has committed) bounds q.k from above, and the top pages are read.
   TidalDecode (method 2): at each selection layer the row's full attention picks its top keys (attention
   summed over the query heads of the kv head); later sparse layers read those, until the next selection
   layer. Double Sparsity (method 4): each committed key keeps a label, its values on ``channels`` calibrated
   channels of its kv head (int8 with a per-key scale, in blocks of 16 keys); a row scores every candidate by
   its query (summed over the group's heads, int8 too) on those channels times the label, and reads the top
   keys.
   Layers flagged 0 stay dense. MInference (method 3, prefill) is described below. */
enum { SPARSE_QUEST = 1, SPARSE_TIDAL = 2, SPARSE_MINFERENCE = 3, SPARSE_DOUBLE = 4 };
enum { LABEL_BLOCK = 16 };
#define LABEL_C4(C) (((C) + 3) & ~(int64_t)3)                 /* label channels, padded to whole groups of 4 */
#define LABEL_STRIDE(C) (LABEL_BLOCK * (LABEL_C4(C) + 4))      /* bytes per block of 16 labels: values, scales */
enum { LAYER_DENSE = 0, LAYER_SPARSE = 1, LAYER_SELECT = 2 };

/* Prefill-time sparse attention, MInference (method 3, tachy/sparse/minference.py): one plain prompt chunk a
   call (one cache row, keys = slots 0..prefix+t). Per layer and kv head a pattern (``patterns``), whose keys
   are estimated for the chunk before its attention runs, from the group's query heads together:
   vertical-slash: the ``last_q`` last rows' attention summed by key (columns) and by offset t - j (diagonals);
   the top ``vertical`` columns (the first ``sinks`` forced) and ``slash`` diagonals (the ``window`` nearest
   forced); row t reads the chosen columns <= t and the keys t - offset.
   A-shape: the first ``vertical`` keys and the last ``slash`` ones (static).
   block-sparse: 64-row query blocks against 64-key blocks, scored by mean-pooled q (summed over the group)
   and k; each query block reads its top ``blocks`` key blocks (the first and its own forced).
   search (calibration): attends densely and adds to ``recall`` how much of sampled rows' attention each of
   the three patterns would have kept. Rows at positions >= ``dense_from`` read densely. A row whose pattern
   covers all its keys reads exactly its dense key list (dense attention's bits). */
enum { PATTERN_DENSE = 0, PATTERN_VS = 1, PATTERN_ASHAPE = 2, PATTERN_BLOCK = 3, PATTERN_SEARCH = 4 };
enum { MI_BLOCK = 64, MI_SAMPLES = 16 };

typedef struct {
    int64_t method, page, select, sinks, window;
    const uint8_t *layers;        /* [n_layers]: LAYER_DENSE, LAYER_SPARSE, or LAYER_SELECT (TidalDecode) */
    uint16_t *bounds;             /* Quest: bf16 [n_layers, batch, kv_heads, max_pages, 2, head_dim] min, max */
    int64_t max_pages;            /* Quest: pages in bounds; Double Sparsity: slots in labels (whole blocks) */
    int64_t *bounded;             /* [batch] leading pages (slots) of each cache row whose bounds (labels) are current */
    const uint8_t *patterns;      /* MInference: [n_layers, kv_heads] PATTERN_* */
    int64_t vertical, slash, blocks, last_q, dense_from;
    double *recall;               /* MInference search: [n_layers, kv_heads, 4] recall of VS, A-shape, block; rows */
    uint8_t *record;              /* MInference, tests: [n_layers, kv_heads, T, prefix + T] keys each row read */
    int64_t channels;             /* Double Sparsity: label channels per key */
    const int64_t *channel_index; /* Double Sparsity: [n_layers, kv_heads, channels] the channels labels keep */
    uint8_t *labels;              /* Double Sparsity: [n_layers, batch, kv_heads, max_pages / 16, LABEL_STRIDE] */
} tq_sparse;

/* one kv head's MInference choice for the current layer and chunk */
typedef struct {
    int64_t *vert, *slash;        /* chosen columns, ascending; chosen offsets, ascending */
    int64_t n_vert, n_slash;
    uint8_t *blocks;              /* [query blocks of the chunk, key blocks] */
} mi_head;

/* ---- numerics -------------------------------------------------------------------------------------------- */
static inline float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {   /* round to nearest even, as torch's cast */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

#if DEC_AVX512

/* exp for x <= ~88: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2, degree-6 polynomial (Cephes). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#elif DEC_AVX2
/* exp16's operations on 8 lanes, 2^n made from n's exponent bits (n is within -126..127 after the clamp) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* exp over an array, in place */
static void exp_inplace(float *x, int64_t n) {
    int64_t i = 0;
#if DEC_AVX512
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(x + i, m, exp16(_mm512_maskz_loadu_ps(m, x + i)));
    }
#elif DEC_AVX2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
    if (i < n) {   /* the tail through the same lanes */
        float t[8] = {0};
        memcpy(t, x + i, sizeof(float) * (size_t)(n - i));
        _mm256_storeu_ps(t, exp8(_mm256_loadu_ps(t)));
        memcpy(x + i, t, sizeof(float) * (size_t)(n - i));
    }
#else
    for (; i < n; i++) x[i] = expf(x[i]);
#endif
}

/* sum of x[i] * y[i], float32, in a fixed order */
static inline float dot_f32(const float *x, const float *y, int64_t n) {
#if DEC_AVX512
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) s += x[i] * y[i];
    return s;
#elif DEC_AVX2
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc);
    float s = hsum8(acc);
    for (; i < n; i++) s += x[i] * y[i];
    return s;
#else
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += x[i] * y[i];
    return s;
#endif
}

static inline float dot_f32_bf16(const float *x, const uint16_t *y, int64_t n) {
#if DEC_AVX512
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load_bf16x16(y + i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) s += x[i] * bf2f(y[i]);
    return s;
#elif DEC_AVX2
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load_bf16x8(y + i), acc);
    float s = hsum8(acc);
    for (; i < n; i++) s += x[i] * bf2f(y[i]);
    return s;
#else
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += x[i] * bf2f(y[i]);
    return s;
#endif
}

/* out[i] += p * y[i] */
static inline void axpy_bf16(float *out, float p, const uint16_t *y, int64_t n) {
#if DEC_AVX512
    __m512 pp = _mm512_set1_ps(p);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_fmadd_ps(pp, load_bf16x16(y + i), _mm512_loadu_ps(out + i)));
    for (; i < n; i++) out[i] += p * bf2f(y[i]);
#elif DEC_AVX2
    __m256 pp = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pp, load_bf16x8(y + i), _mm256_loadu_ps(out + i)));
    for (; i < n; i++) out[i] += p * bf2f(y[i]);
#else
    for (int64_t i = 0; i < n; i++) out[i] += p * bf2f(y[i]);
#endif
}

/* RMSNorm of one row: out = x / sqrt(mean(x^2) + eps) * scale, written as float32 and/or bf16 */
static void rms_norm(const float *x, const float *scale, int64_t n, double eps, float *out_f32, uint16_t *out_bf16) {
    float r = 1.0f / sqrtf(dot_f32(x, x, n) / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++) {
        float y = (x[i] * r) * scale[i];
        if (out_f32) out_f32[i] = y;
        if (out_bf16) out_bf16[i] = f2bf(y);
    }
}

/* ---- the forward ----------------------------------------------------------------------------------------- */
typedef struct {
    const tq_model *m;
    const tq_layer *layer;
    int64_t layer_index;
    tq_cache *c;
    const tq_batch *b;
    float *x, *tmp, *qkv, *gu;
    uint16_t *xn, *attn, *act;
    int64_t qkv_n;
    const tq_sparse *sparse;      /* NULL: dense attention */
    uint8_t *chosen;              /* TidalDecode: [T, kv_heads, cap + T] keys the last selection layer chose */
    mi_head *mi;                  /* MInference: [kv_heads] */
    int64_t mi_start, mi_qb0, mi_kb; /* the chunk's first slot, its first query block, key blocks */
    int64_t grouped;              /* grouped_tokens serves this model's heads */
    int64_t block;                /* tokens per attention item: 16 / G for plain causal chunks, else 1 */
    int64_t amx;                  /* grouped_tokens scores keys with AMX (amx_scores) */
} fwd;

/* y [T, N] = x [T, K] times the layer's parts; packed parts share one int8 quantization of x */
static void linear(const tq_linear *l, const uint16_t *x, int64_t T, float *y) {
    int64_t col = 0;
    void *xq = NULL;
    for (int64_t p = 0; p < l->n_parts; p++) {
        const tq_weight *w = &l->part[p];
        if (w->packed) {
            if (!xq) {
                xq = malloc((size_t)tq_q8_block_bytes() * (size_t)(T * (w->K / 32)));
                tq_quantize_q8(x, T, w->K, w->K, xq, 0);
            }
            tq_matmul_packed((int)w->fmt, w->packed, w->N, w->K, xq, T, y + col, l->N, 0, 0);
        } else {
            tq_matmul((int)w->fmt, w->data, w->row_bytes, w->N, w->K, x, T, w->K, y + col, l->N, 0);
        }
        col += w->N;
    }
    free(xq);
    if (l->bias)
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < l->N; i++) y[t * l->N + i] += bf2f(l->bias[i]);
}

static inline uint16_t *cache_at(const fwd *f, uint16_t *base, int64_t row, int64_t head, int64_t slot) {
    const tq_model *m = f->m;
    int64_t D = m->head_dim;
    return base + ((((f->layer_index * f->c->batch + row) * m->kv_heads + head) * f->c->cap + slot) * D);
}

/* q/k norms and rope for token t, then its K/V into the cache */
static void qkv_token(void *p, int64_t t0, int64_t t1) {
    fwd *f = p;
    const tq_model *m = f->m;
    const tq_layer *L = f->layer;
    int64_t D = m->head_dim, H = m->heads, Hkv = m->kv_heads, half = D / 2;
    float rot[512];
    for (int64_t t = t0; t < t1; t++) {
        float *q = f->qkv + t * f->qkv_n;
        int64_t pos = f->b->positions[t];
        const float *cs = L->cos + pos * D, *sn = L->sin + pos * D;
        for (int64_t h = 0; h < H + Hkv; h++) {         /* query heads, then key heads */
            float *v = q + h * D;
            const float *norm = h < H ? L->q_norm : L->k_norm;
            if (norm) rms_norm(v, norm, D, m->eps, v, NULL);
            for (int64_t i = 0; i < half; i++) {
                rot[i] = v[i] * cs[i] - v[i + half] * sn[i];
                rot[i + half] = v[i + half] * cs[i + half] + v[i] * sn[i + half];
            }
            memcpy(v, rot, sizeof(float) * D);
        }
        int64_t row = f->b->rows[t], slot = f->b->slots[t];
        for (int64_t h = 0; h < Hkv; h++) {
            uint16_t *kd = cache_at(f, f->c->k, row, h, slot), *vd = cache_at(f, f->c->v, row, h, slot);
            const float *ks = q + (H + h) * D, *vs = q + (H + Hkv + h) * D;
            for (int64_t i = 0; i < D; i++) {
                kd[i] = f2bf(ks[i]);
                vd[i] = f2bf(vs[i]);
            }
        }
    }
}

static inline int sees(const tq_batch *b, int64_t t, int64_t j) {
    if (b->mask) return b->mask[t * b->T + j];
    return j <= t && b->rows[j] == b->rows[t];
}

#if DEC_AVX512
/* Key lists with gaps (sparse attention reads chosen pages) defeat the hardware prefetcher at every jump: each
   K/V row is requested PREFETCH keys ahead. No arithmetic changes. */
enum { PREFETCH = 8 };
static inline void prefetch_row(const uint16_t *p, int64_t D) {
    for (int64_t i = 0; i < D; i += 32) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
}

/* The G query heads of key head g for token t over its n keys, each K and V row loaded (and widened from
   bf16) once for all G heads. Every head's arithmetic is the per-head loop's below, in the same order (the
   dot product's 16-lane fmadd chain then its reduction, the max, exp, sum, then out += p * v key by key), so
   the results are the same bits; only the memory traffic shrinks. score: G * cap floats. */
static void grouped_heads(fwd *f, int64_t t, int64_t g, int64_t G, const int64_t *keys, int64_t n,
                          const uint16_t *K0, const uint16_t *V0, float *score, int64_t cap) {
    const tq_model *m = f->m;
    int64_t D = m->head_dim, H = m->heads, C = D / 16;
    float scale = (float)m->attn_scale;
    __m512 q[8][16], row[16], out[8][16];
    float mx[8], sum[8];
    for (int64_t h = 0; h < G; h++) {
        const float *qh = f->qkv + t * f->qkv_n + (g * G + h) * D;
        for (int64_t c = 0; c < C; c++) q[h][c] = _mm512_loadu_ps(qh + 16 * c);
        mx[h] = -INFINITY;
    }
    for (int64_t k = 0; k < n; k++) {
        const uint16_t *kr = K0 + keys[k] * D;
        if (k + PREFETCH < n) {   /* V rows too: the second loop then finds them in cache */
            prefetch_row(K0 + keys[k + PREFETCH] * D, D);
            prefetch_row(V0 + keys[k + PREFETCH] * D, D);
        }
        for (int64_t c = 0; c < C; c++) row[c] = load_bf16x16(kr + 16 * c);
        for (int64_t h = 0; h < G; h++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < C; c++) acc = _mm512_fmadd_ps(q[h][c], row[c], acc);
            float sc = _mm512_reduce_add_ps(acc) * scale;
            score[h * cap + k] = sc;
            if (sc > mx[h]) mx[h] = sc;
        }
    }
    for (int64_t h = 0; h < G; h++) {
        float *sh = score + h * cap;
        for (int64_t k = 0; k < n; k++) sh[k] -= mx[h];
        exp_inplace(sh, n);
        float s = 0;
        for (int64_t k = 0; k < n; k++) s += sh[k];
        sum[h] = s;
        for (int64_t c = 0; c < C; c++) out[h][c] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < n; k++) {
        const uint16_t *vr = V0 + keys[k] * D;
        if (k + PREFETCH < n) prefetch_row(V0 + keys[k + PREFETCH] * D, D);
        for (int64_t c = 0; c < C; c++) row[c] = load_bf16x16(vr + 16 * c);
        for (int64_t h = 0; h < G; h++) {
            __m512 pp = _mm512_set1_ps(score[h * cap + k]);
            for (int64_t c = 0; c < C; c++) out[h][c] = _mm512_fmadd_ps(pp, row[c], out[h][c]);
        }
    }
    for (int64_t h = 0; h < G; h++) {
        float o[256], inv = 1.0f / sum[h];
        for (int64_t c = 0; c < C; c++) _mm512_storeu_ps(o + 16 * c, out[h][c]);
        uint16_t *dst = f->attn + t * H * D + (g * G + h) * D;
        for (int64_t d = 0; d < D; d++) dst[d] = f2bf(o[d] * inv);
    }
}

/* Attention of several query rows over the same keys: one token's G heads (decoding, verify rows, sparse key
   lists), or the G heads of up to 16 / G consecutive tokens of a plain causal chunk (prefill), with the bits
   the per-head loop in attention_task gives each row alone: for each key, the dot product's 16-lane fmadd
   chain then its horizontal sum (_mm512_reduce_add_ps: lanes i + i+8, then i + i+4, i + i+2, i + i+1), the
   scale, the max, exp, the sum in key order, then out += p * v key by key.

   The horizontal sums are most of that loop's time per key. Here up to 16 (token, head) pairs share each key:
   their product vectors go through one transposing network that makes those same sums (the same operands at
   every level, so the same bits) for all of them at once, one pair per lane, and the softmax then runs
   lane-wise across pairs. Pair p sits in slot p of the network, whose result lands in lane lane_of(p). Each K
   and V row is loaded once per key for all pairs, which is what makes a prefill chunk's attention cheaper than
   its tokens' one at a time. */
static inline int lane_of(int p) { return 4 * (p % 4) + p / 4; }

/* one level of the network: lanes i and i+8 of a, of b (level 1); i and i+4 in each 8-lane half (2); ... */
static inline __m512 net1(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}
static inline __m512 net2(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
static inline __m512 net3(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
}
static inline __m512 net4(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
}

/* the horizontal sums of acc[0..n) (n <= 16), pair p's in lane lane_of(p) */
static inline __m512 reduce_pairs(const __m512 *acc, int n) {
    __m512 z = _mm512_setzero_ps(), v[8], w[4], u[2];
    int n1 = (n + 1) / 2, n2 = (n1 + 1) / 2, n3 = (n2 + 1) / 2;
    for (int j = 0; j < n1; j++) v[j] = net1(acc[2 * j], 2 * j + 1 < n ? acc[2 * j + 1] : z);
    for (int j = 0; j < n2; j++) w[j] = net2(v[2 * j], 2 * j + 1 < n1 ? v[2 * j + 1] : z);
    for (int j = 0; j < n3; j++) u[j] = net3(w[2 * j], 2 * j + 1 < n2 ? w[2 * j + 1] : z);
    return net4(u[0], n3 > 1 ? u[1] : z);
}

/* tests: the horizontal sums of n <= 16 rows of 16 floats, through the network (network[p]) and one by one
   (alone[p], _mm512_reduce_add_ps) */
void tq_horizontal_sums(const float *rows, int64_t n, float *network, float *alone) {
    __m512 acc[16];
    float lanes[16];
    for (int p = 0; p < n; p++) acc[p] = _mm512_loadu_ps(rows + 16 * p);
    _mm512_storeu_ps(lanes, reduce_pairs(acc, (int)n));
    for (int p = 0; p < n; p++) {
        network[p] = lanes[lane_of(p)];
        alone[p] = _mm512_reduce_add_ps(acc[p]);
    }
}

/* out[p] += e[k][p] * V row k, key by key (e: S floats per key), for NP pairs and NC * 16 channels from d0:
   the accumulators stay in registers (NP <= 6, NC <= 4: 24 of them) */
static inline __attribute__((always_inline)) void pv_pairs(int NP, int NC, const float *e, int64_t S, int64_t n,
                                                           const int64_t *keys, const uint16_t *V0, int64_t D,
                                                           int64_t d0, float *out) {
    __m512 o[6][4], row[4];
    for (int p = 0; p < NP; p++)
        for (int c = 0; c < NC; c++) o[p][c] = _mm512_loadu_ps(out + p * 256 + d0 + 16 * c);
    for (int64_t k = 0; k < n; k++) {
        const uint16_t *vr = V0 + keys[k] * D + d0;
        if (k + PREFETCH < n) prefetch_row(V0 + keys[k + PREFETCH] * D + d0, 16 * NC);
        for (int c = 0; c < NC; c++) row[c] = load_bf16x16(vr + 16 * c);
        for (int p = 0; p < NP; p++) {
            __m512 pp = _mm512_set1_ps(e[k * S + p]);
            for (int c = 0; c < NC; c++) o[p][c] = _mm512_fmadd_ps(pp, row[c], o[p][c]);
        }
    }
    for (int p = 0; p < NP; p++)
        for (int c = 0; c < NC; c++) _mm512_storeu_ps(out + p * 256 + d0 + 16 * c, o[p][c]);
}

#define PV_NC(NP) (nc == 4 ? pv_pairs(NP, 4, e, S, n, keys, V0, D, d0, out)   \
                   : nc == 2 ? pv_pairs(NP, 2, e, S, n, keys, V0, D, d0, out) \
                   : pv_pairs(NP, 1, e, S, n, keys, V0, D, d0, out))
static void pv_group(int np, int nc, const float *e, int64_t S, int64_t n, const int64_t *keys,
                     const uint16_t *V0, int64_t D, int64_t d0, float *out) {
    switch (np) {
    case 1: PV_NC(1); break;
    case 2: PV_NC(2); break;
    case 3: PV_NC(3); break;
    case 4: PV_NC(4); break;
    case 5: PV_NC(5); break;
    default: PV_NC(6); break;
    }
}
#undef PV_NC

/* The scores of P <= S pairs on keys[0..n) (q[p]: pair p's query, C vectors of 16), S per key into sc (S = 4, 8
   or 16, a constant here, so the network and its inputs stay in registers); returns their max per pair. */
static inline __attribute__((always_inline)) __m512 qk_scores(int S, int P, int64_t C, const float *const *q,
                                                              const int64_t *keys, int64_t n, const uint16_t *K0,
                                                              int64_t D, float scale, __m512i to_pairs, float *sc) {
    __m512 acc[16], row[16], mxv = _mm512_set1_ps(-INFINITY), scv = _mm512_set1_ps(scale);
    for (int64_t k = 0; k < n; k++) {
        const uint16_t *kr = K0 + keys[k] * D;
        if (k + PREFETCH < n) prefetch_row(K0 + keys[k + PREFETCH] * D, D);
        for (int64_t c = 0; c < C; c++) row[c] = load_bf16x16(kr + 16 * c);
        for (int p = 0; p < S; p++) {
            __m512 a = _mm512_setzero_ps();
            if (p < P)
                for (int64_t c = 0; c < C; c++) a = _mm512_fmadd_ps(_mm512_loadu_ps(q[p] + 16 * c), row[c], a);
            acc[p] = a;
        }
        __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(to_pairs, reduce_pairs(acc, S)), scv);
        if (S == 4) _mm_storeu_ps(sc + 4 * k, _mm512_castps512_ps128(s));
        else if (S == 8) _mm256_storeu_ps(sc + 8 * k, _mm512_castps512_ps256(s));
        else _mm512_storeu_ps(sc + 16 * k, s);
        mxv = _mm512_max_ps(mxv, s);
    }
    return mxv;
}

#if DEC_AMX
/* 32 floats (x0: the first 16) as bf16 hi = their rounding and lo = the rounding of what is left, so that
   hi + lo carries ~16 of their 24 bits into TDPBF16PS */
static inline void split_bf16(__m512 x0, __m512 x1, __m512i *hi, __m512i *lo) {
    *hi = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
    __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(*hi)), 16));
    __m512 h1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(*hi, 1)), 16));
    *lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1), _mm512_sub_ps(x0, h0));
}

/* qk_scores on AMX: S scores per key into sc (pairs from P on are 0), their max per pair in lanes 0..S-1. Keys
   16 at a time are tile A (rows read in place where the list runs on by one, else gathered), the queries as
   bf16 channel pairs tile B, the scores tile C (16 keys x S), for D / 32 channel blocks in order. */
static __m512 amx_scores(int S, int P, int64_t D, const float *const *q, const int64_t *keys, int64_t n,
                         const uint16_t *K0, float scale, float *sc) {
    int64_t CB = D / 32;
    /* tiles: 0 scores (and 3, resident queries); 1 keys (and 2, resident queries); queries 2, 3 per channel
       block, or resident 4-7 where head_dim <= 64 (their high and low parts of both channel blocks, loaded once:
       reloading them for every 16 keys waited on the products still reading them) */
    tile_config cfg = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = (uint16_t)(4 * S);
    }
    cfg.colsb[1] = 64;
    if (CB <= 2) cfg.colsb[2] = 64;
    _tile_loadconfig(&cfg);
    /* [channel block][high, low][channel pair][pair][2]: each query channel as the sum of two bf16 values (its
       rounding and the rounding of the rest), so the scores keep ~16 of float32's 24 bits of the query */
    uint16_t qt[8 * 2 * 16 * 32] __attribute__((aligned(64)));
    memset(qt, 0, sizeof(uint16_t) * (size_t)(CB * 2 * 16 * 2 * S));
    __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_epi32(S));   /* a channel pair's dword in each B row */
    for (int64_t cb = 0; cb < CB; cb++)
        for (int p = 0; p < P; p++) {   /* 32 channels: 16 pairs, high and low parts, into column p */
            __m512i hi, lo;
            split_bf16(_mm512_loadu_ps(q[p] + 32 * cb), _mm512_loadu_ps(q[p] + 32 * cb + 16), &hi, &lo);
            _mm512_i32scatter_epi32(qt + (cb * 2 + 0) * 32 * S + 2 * p, rows, hi, 4);
            _mm512_i32scatter_epi32(qt + (cb * 2 + 1) * 32 * S + 2 * p, rows, lo, 4);
        }
    if (CB <= 2) {   /* tiles 4, 5 (and 6, 7): the queries' parts, in block order */
        _tile_loadd(4, qt, 4 * S);
        _tile_loadd(5, qt + 32 * S, 4 * S);
        if (CB == 2) {
            _tile_loadd(6, qt + 2 * 32 * S, 4 * S);
            _tile_loadd(7, qt + 3 * 32 * S, 4 * S);
        }
    }
    uint16_t gathered[16 * 256] __attribute__((aligned(64)));
    float part[16 * 16] __attribute__((aligned(64)));
    __m512 mxv = _mm512_set1_ps(-INFINITY), scv = _mm512_set1_ps(scale);
    /* one dependent chain of products per 16 keys: with resident queries, block j + 1's products (into the other
       of tiles 0 and 3) are issued before block j's scores are stored and scaled, so the two overlap */
    const int lag = CB <= 2;
    int64_t blocks = (n + 15) / 16;
#define AMX_QK(C)                                                                                              \
    do {                                                                                                       \
        _tile_zero(C);                                                                                         \
        _tile_loadd(1, A, 2 * D);                                                                              \
        _tile_dpbf16ps(C, 1, 4);                                                                               \
        _tile_dpbf16ps(C, 1, 5);                                                                               \
        if (CB == 2) {                                                                                         \
            _tile_loadd(2, A + 32, 2 * D);                                                                     \
            _tile_dpbf16ps(C, 2, 6);                                                                           \
            _tile_dpbf16ps(C, 2, 7);                                                                           \
        }                                                                                                      \
    } while (0)
    for (int64_t j = 0; j < blocks + lag; j++) {
        if (j < blocks) {
            int64_t k0 = 16 * j, rows = n - k0 < 16 ? n - k0 : 16;
            const uint16_t *A = gathered;
            if (rows == 16 && keys[k0 + 15] - keys[k0] == 15) {
                A = K0 + keys[k0] * D;
            } else {
                for (int64_t i = 0; i < 16; i++) {
                    if (i < rows) memcpy(gathered + i * D, K0 + keys[k0 + i] * D, sizeof(uint16_t) * (size_t)D);
                    else memset(gathered + i * D, 0, sizeof(uint16_t) * (size_t)D);
                }
            }
            if (lag) {   /* the same products in the same order, on the resident query tiles */
                if (j & 1) AMX_QK(3);
                else AMX_QK(0);
            } else {
                _tile_zero(0);
                for (int64_t cb = 0; cb < CB; cb++) {
                    _tile_loadd(1, A + 32 * cb, 2 * D);
                    _tile_loadd(2, qt + (cb * 2 + 0) * 32 * S, 4 * S);
                    _tile_loadd(3, qt + (cb * 2 + 1) * 32 * S, 4 * S);
                    _tile_dpbf16ps(0, 1, 2);
                    _tile_dpbf16ps(0, 1, 3);
                }
            }
        }
        int64_t done = j - lag;   /* the block whose scores are stored now */
        if (done < 0) continue;
        int64_t k0 = 16 * done, rows = n - k0 < 16 ? n - k0 : 16;
        float *s = sc + k0 * S, *dst = rows == 16 ? s : part;
        if (lag && (done & 1)) _tile_stored(3, dst, 4 * S);
        else _tile_stored(0, dst, 4 * S);
        if (rows < 16) memcpy(s, part, sizeof(float) * (size_t)(rows * S));
        int64_t m = rows * S, i = 0;     /* lane j of each 16 holds pair j % S */
        for (; i + 16 <= m; i += 16) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(s + i), scv);
            _mm512_storeu_ps(s + i, v);
            mxv = _mm512_max_ps(mxv, v);
        }
        if (i < m) {
            __mmask16 rest = (__mmask16)((1u << (m - i)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(rest, s + i), scv);
            _mm512_mask_storeu_ps(s + i, rest, v);
            mxv = _mm512_mask_max_ps(mxv, rest, mxv, v);
        }
    }
#undef AMX_QK
    float lanes[16];
    _mm512_storeu_ps(lanes, mxv);
    for (int j = S; j < 16; j++)
        if (lanes[j] > lanes[j % S]) lanes[j % S] = lanes[j];
    return _mm512_loadu_ps(lanes);
}
#endif

#if DEC_AMX
/* rows r[0..15] of a 16 x 16 float matrix -> its transpose, in place (4 butterfly rounds: round h swaps the
   off-diagonal h x h blocks of each 2h x 2h block) */
static inline void transpose16(__m512 *r) {
    static const int32_t ix[4][16] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
        {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
        {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
        {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
    static const int32_t iy[4][16] = {
        {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
        {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
        {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
        {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
    for (int round = 0, h = 8; h >= 1; round++, h /= 2) {
        __m512i jx = _mm512_loadu_si512(ix[round]), jy = _mm512_loadu_si512(iy[round]);
        for (int i = 0; i < 16; i++) {
            if (i & h) continue;
            __m512 x = r[i], y = r[i + h];
            r[i] = _mm512_permutex2var_ps(x, jx, y);
            r[i + h] = _mm512_permutex2var_ps(x, jy, y);
        }
    }
}

/* For 16 pairs (a prompt chunk's tokens): the softmax numerators of the first `blocks` blocks of 32 keys, from
   the scores in sc (16 per key) and the maxima mp, straight into amx_values' weight tiles in pbuf (no gathers,
   no second pass over the scores); returns their sums in key order, lane by lane. The same operations as the
   unfused path (exp16 of score - max, sums key after key, split_bf16 of each pair's 32 weights), so the same
   bits. */
static __m512 softmax_weights16(const float *sc, int64_t blocks, __m512 mp, uint16_t *pbuf) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m512 r[32];
        for (int k = 0; k < 32; k++) {
            r[k] = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + (32 * b + k) * 16), mp));
            acc = _mm512_add_ps(acc, r[k]);
        }
        transpose16(r);        /* r[p]: pair p's weights of keys 0..15 of the block */
        transpose16(r + 16);   /* r[16 + p]: of keys 16..31 */
        for (int p = 0; p < 16; p++) {
            __m512i hi, lo;
            split_bf16(r[p], r[16 + p], &hi, &lo);
            _mm512_store_si512(pbuf + ((b * 2 + 0) * 16 + p) * 32, hi);
            _mm512_store_si512(pbuf + ((b * 2 + 1) * 16 + p) * 32, lo);
        }
    }
    return acc;
}

/* out[p][c] (256 floats per pair) = sum over the L keys of e[k][p] * V row keys[k], for S pairs (e: S floats per
   key, zero from L to the next multiple of 32), on AMX: the weights as two bf16 parts (tiles A: S pairs x 32
   keys), V rows two by two interleaved (tiles B: 16 key pairs x 16 channels), four channel tiles C at a time,
   32 keys per step in list order. An output's bits depend on its pair's weights and the keys at each list
   position only, so a token gets the same sums from a chunk's shared list (its unseen keys weigh 0) as from
   its own list; not past a sliding window, whose lists start at a moving position (those layers keep
   pv_group). pbuf: (L / 32 + 1) * 2 * S * 32 bf16, whose first `ready` blocks the caller wrote already
   (softmax_weights16). */
static void amx_values(int S, const float *e, const int64_t *keys, int64_t L, const uint16_t *V0, int64_t D,
                       float *out, uint16_t *pbuf, int64_t ready) {
    int64_t nb = (L + 31) / 32;
    __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(S));
    for (int64_t b = ready; b < nb; b++)   /* [block][high, low][pair][32 keys] (the first `ready` are there) */
        for (int p = 0; p < S; p++) {
            const float *base = e + b * 32 * S + p;
            __m512i hi, lo;
            split_bf16(_mm512_i32gather_ps(idx, base, 4), _mm512_i32gather_ps(idx, base + 16 * S, 4), &hi, &lo);
            _mm512_store_si512(pbuf + ((b * 2 + 0) * S + p) * 32, hi);
            _mm512_store_si512(pbuf + ((b * 2 + 1) * S + p) * 32, lo);
        }
    tile_config cfg = {.palette = 1};
    for (int i = 0; i < 4; i++) {   /* 0-3: sums of 16 channels each; 4, 5: weights high, low; 6, 7: values */
        cfg.rows[i] = (uint8_t)S;
        cfg.colsb[i] = 64;
    }
    cfg.rows[4] = cfg.rows[5] = (uint8_t)S;
    cfg.colsb[4] = cfg.colsb[5] = 64;
    cfg.rows[6] = cfg.rows[7] = 16;
    cfg.colsb[6] = cfg.colsb[7] = 64;
    _tile_loadconfig(&cfg);
    /* value rows two by two: lanes 2i, 2i + 1 of a B row are channel i of keys 2r, 2r + 1 */
    __m512i even = _mm512_setr_epi32(0x200000, 0x210001, 0x220002, 0x230003, 0x240004, 0x250005, 0x260006,
                                     0x270007, 0x280008, 0x290009, 0x2A000A, 0x2B000B, 0x2C000C, 0x2D000D,
                                     0x2E000E, 0x2F000F);
    __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(16));
    /* the B tiles of block b are written while block b - 1's tile products run (tile loads of freshly stored
       lines wait for the stores) */
    uint16_t vb[2][4][16 * 32] __attribute__((aligned(64)));
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
        int ncc = D - c0 >= 64 ? 4 : 2;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t b = 0; b <= nb; b++) {
            if (b < nb) {
                uint16_t (*w)[16 * 32] = vb[b & 1];
                for (int r = 0; r < 16; r++) {
                    int64_t k = 32 * b + 2 * r;
                    for (int h = 0; h < ncc / 2; h++) {   /* 32 channels: two B rows */
                        __m512i v0 = k < L ? _mm512_loadu_si512(V0 + keys[k] * D + c0 + 32 * h)
                                           : _mm512_setzero_si512();
                        __m512i v1 = k + 1 < L ? _mm512_loadu_si512(V0 + keys[k + 1] * D + c0 + 32 * h)
                                               : _mm512_setzero_si512();
                        _mm512_store_si512(w[2 * h] + 32 * r, _mm512_permutex2var_epi16(v0, even, v1));
                        _mm512_store_si512(w[2 * h + 1] + 32 * r, _mm512_permutex2var_epi16(v0, odd, v1));
                    }
                }
            }
            if (b == 0) continue;
            int64_t a = b - 1;
            uint16_t (*w)[16 * 32] = vb[a & 1];
            _tile_loadd(4, pbuf + (a * 2 + 0) * S * 32, 64);
            _tile_loadd(5, pbuf + (a * 2 + 1) * S * 32, 64);
            _tile_loadd(6, w[0], 64);
            _tile_loadd(7, w[1], 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(0, 5, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(1, 5, 7);
            if (ncc == 4) {
                _tile_loadd(6, w[2], 64);
                _tile_loadd(7, w[3], 64);
                _tile_dpbf16ps(2, 4, 6);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, out + c0, 256 * 4);
        _tile_stored(1, out + c0 + 16, 256 * 4);
        if (ncc == 4) {
            _tile_stored(2, out + c0 + 32, 256 * 4);
            _tile_stored(3, out + c0 + 48, 256 * 4);
        }
    }
}
#endif

/* tests: the scaled scores of P <= 16 queries (float32 [P, D]) on keys[0..n) of K (bf16 rows of D) into out
   [n, P], from amx_scores where amx and AMX is on (returns 1), else dot products one by one (returns 0) */
int tq_attention_scores(const float *q, int64_t P, const uint16_t *K, const int64_t *keys, int64_t n, int64_t D,
                        float scale, float *out, int amx) {
    const float *qp[16];
    for (int64_t p = 0; p < P; p++) qp[p] = q + p * D;
#if DEC_AMX
    if (amx && tq_amx_on && P <= 16 && D % 32 == 0 && D <= 256) {
        int S = P <= 4 ? 4 : P <= 8 ? 8 : 16;
        float *sc = malloc(sizeof(float) * (size_t)(S * (n + 16)));
        if (!sc) return -3;
        amx_scores(S, (int)P, D, qp, keys, n, K, scale, sc);
        _tile_release();
        for (int64_t k = 0; k < n; k++)
            for (int64_t p = 0; p < P; p++) out[k * P + p] = sc[k * S + p];
        free(sc);
        return 1;
    }
#else
    (void)amx;
#endif
    for (int64_t k = 0; k < n; k++)
        for (int64_t p = 0; p < P; p++) out[k * P + p] = dot_f32_bf16(qp[p], K + keys[k] * D, D) * scale;
    return 0;
}

/* tests: out [P, D] = e [L, P] times the value rows keys[0..L) of V (bf16 rows of D), from amx_values where
   amx and AMX is on (returns 1), else key by key (returns 0) */
int tq_attention_values(const float *e, int64_t P, const uint16_t *V, const int64_t *keys, int64_t L, int64_t D,
                        float *out, int amx) {
#if DEC_AMX
    if (amx && tq_amx_on && P <= 16 && D % 32 == 0 && D <= 256) {
        int S = P <= 4 ? 4 : P <= 8 ? 8 : 16;
        int64_t end = (L + 31) / 32 * 32;
        float *sc = calloc((size_t)(S * end), sizeof(float)), *o = aligned_alloc(64, sizeof(float) * 16 * 256);
        uint16_t *pbuf = aligned_alloc(64, sizeof(uint16_t) * (size_t)(2 * S * end));
        if (!sc || !o || !pbuf) return -3;
        for (int64_t k = 0; k < L; k++)
            for (int64_t p = 0; p < P; p++) sc[k * S + p] = e[k * P + p];
        amx_values(S, sc, keys, L, V, D, o, pbuf, 0);
        _tile_release();
        for (int64_t p = 0; p < P; p++) memcpy(out + p * D, o + p * 256, sizeof(float) * (size_t)D);
        free(sc);
        free(o);
        free(pbuf);
        return 1;
    }
#else
    (void)amx;
#endif
    memset(out, 0, sizeof(float) * (size_t)(P * D));
    for (int64_t k = 0; k < L; k++)
        for (int64_t p = 0; p < P; p++) axpy_bf16(out + p * D, e[k * P + p], V + keys[k] * D, D);
    return 0;
}

/* qk_scores with S as a constant (4, 8 or 16); on AMX where the forward uses it */
static __m512 qk_scores_s(int S, int P, int64_t C, const float *const *q, const int64_t *keys, int64_t n,
                          const uint16_t *K0, int64_t D, float scale, __m512i to_pairs, float *sc, int amx) {
#if DEC_AMX
    if (amx) return amx_scores(S, P, D, q, keys, n, K0, scale, sc);
#else
    (void)amx;
#endif
    return S == 4 ? qk_scores(4, P, C, q, keys, n, K0, D, scale, to_pairs, sc)
         : S == 8 ? qk_scores(8, P, C, q, keys, n, K0, D, scale, to_pairs, sc)
         : qk_scores(16, P, C, q, keys, n, K0, D, scale, to_pairs, sc);
}

/* sum[p] += e[0][p] + e[1][p] + ... in key order, for the S pairs of rows of S floats (sum holds the sums of
   the keys before e: zeros, or softmax_weights16's) */
static void key_order_sums(int64_t S, const float *e, int64_t n, float *sum) {
    if (S == 4) {
        __m128 a = _mm_loadu_ps(sum);
        for (int64_t k = 0; k < n; k++) a = _mm_add_ps(a, _mm_loadu_ps(e + 4 * k));
        _mm_storeu_ps(sum, a);
    } else if (S == 8) {
        __m256 a = _mm256_loadu_ps(sum);
        for (int64_t k = 0; k < n; k++) a = _mm256_add_ps(a, _mm256_loadu_ps(e + 8 * k));
        _mm256_storeu_ps(sum, a);
    } else {
        __m512 a = _mm512_loadu_ps(sum);
        for (int64_t k = 0; k < n; k++) a = _mm512_add_ps(a, _mm512_loadu_ps(e + 16 * k));
        _mm512_storeu_ps(sum, a);
    }
}

/* Tokens t0 .. t0+nt-1 of one row, heads of kv head g (P = nt * G <= 16 pairs; pair p: token t0 + p / G, head
   g * G + p % G). Token t0 reads keys[0..n) and token t0+i those and then the new tokens t0+1 .. t0+i (a causal
   chunk), so each pair reads its keys in the order attention_task lists them. sc: 16 * n floats. Needs
   D % 16 == 0, D <= 256. The scores are kept S = 4, 8 or 16 (>= P) per key, so one token's 3 or 4 heads
   (decoding) exponentiate 4 keys per vector, as the per-head loop does 16 keys of one head. */
static void grouped_tokens(fwd *f, int64_t t0, int64_t nt, int64_t g, int64_t G, int64_t *keys,
                           int64_t n, const uint16_t *K0, const uint16_t *V0, float *sc, uint16_t *pbuf) {
    const tq_model *m = f->m;
    const tq_batch *b = f->b;
    int64_t D = m->head_dim, H = m->heads, C = D / 16;
    int P = (int)(nt * G);
    int64_t S = P <= 4 ? 4 : P <= 8 ? 8 : 16;
    float scale = (float)m->attn_scale;
    const float *q[16];
    int order[16];
    for (int p = 0; p < 16; p++) order[p] = lane_of(p);   /* the network's lanes back to pair order */
    for (int p = 0; p < P; p++) q[p] = f->qkv + (t0 + p / G) * f->qkv_n + (g * G + p % G) * D;
    __m512i to_pairs = _mm512_loadu_si512(order);
    /* a sliding window: token t0 + i no longer sees the first drop[p] keys of the list (pair p = its heads),
       whose scores are left out of its max and whose numerators are 0 (adding +0 changes no sum's bits) */
    int64_t drop[16] = {0}, lead = 0, window = f->layer->window;
    for (int p = 0; p < P && window > 0; p++) {
        int64_t first = b->positions[t0] - window + 1, now = first + p / G;
        drop[p] = (now > 0 ? now : 0) - (first > 0 ? first : 0);
        if (drop[p] > lead) lead = drop[p];
    }
    float lead_mx[16];
    if (lead) {
        qk_scores_s((int)S, P, C, q, keys, lead, K0, D, scale, to_pairs, sc, (int)f->amx);
        for (int p = 0; p < 16; p++) {
            lead_mx[p] = -INFINITY;
            for (int64_t k = p < P ? drop[p] : lead; k < lead; k++)
                if (sc[k * S + p] > lead_mx[p]) lead_mx[p] = sc[k * S + p];
        }
    }
    __m512 mxv = qk_scores_s((int)S, P, C, q, keys + lead, n - lead, K0, D, scale, to_pairs, sc + lead * S,
                             (int)f->amx);
    /* each later token's own new keys (at most nt - 1), scored one by one as the per-head loop does (on AMX:
       all pairs on all of them at once, amx_scores' bits being the same for any set of pairs and keys) */
    float mx[16], tail[16][16], sum[16], new_sc[16 * 16];
    _mm512_storeu_ps(mx, mxv);
#if DEC_AMX
    if (f->amx && nt > 1) {
        int64_t new_keys[16];
        for (int64_t j = 1; j < nt; j++) new_keys[j - 1] = b->slots[t0 + j];
        amx_scores((int)S, P, D, q, new_keys, nt - 1, K0, scale, new_sc);
    }
#endif
    for (int p = 0; p < 16; p++) {
        if (lead && lead_mx[p] > mx[p]) mx[p] = lead_mx[p];
        float best = p < P && n ? mx[p] : p < P ? -INFINITY : 0.0f;
        for (int64_t j = 1; p < P && j <= p / G; j++) {
            float v = f->amx ? new_sc[(j - 1) * S + p] : dot_f32_bf16(q[p], K0 + b->slots[t0 + j] * D, D) * scale;
            tail[p][j - 1] = v;
            if (v > best) best = v;
        }
        mx[p] = best;
    }
    /* softmax numerators (lane-wise: S-float rows of keys, 16 floats at a time), then their sums in key order */
    float pattern[16];
    for (int j = 0; j < 16; j++) pattern[j] = mx[j % S];
    __m512 mp = _mm512_loadu_ps(pattern);
    int64_t total = S * n, i = 0, ready = 0;   /* ready: blocks of 32 keys whose weights are in pbuf */
    memset(sum, 0, sizeof sum);
#if DEC_AMX
    if (f->amx && window == 0 && S == 16) {   /* a chunk's tokens: whole blocks fused into amx_values' tiles */
        ready = n / 32;
        _mm512_storeu_ps(sum, softmax_weights16(sc, ready, mp, pbuf));
        i = 16 * 32 * ready;
    }
#endif
    for (; i + 16 <= total; i += 16)
        _mm512_storeu_ps(sc + i, exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + i), mp)));
    if (i < total) {
        __mmask16 rest = (__mmask16)((1u << (total - i)) - 1);
        _mm512_mask_storeu_ps(sc + i, rest, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(rest, sc + i), mp)));
    }
    for (int p = 0; p < P; p++)
        for (int64_t k = 0; k < drop[p]; k++) sc[k * S + p] = 0.0f;
    key_order_sums(S, sc + S * 32 * ready, n - 32 * ready, sum);   /* after the fused blocks' sums, in order */
    for (int p = 0; p < P; p++) {
        int64_t extra = p / G;
        for (int64_t j = 0; j < extra; j++) tail[p][j] -= mx[p];
        exp_inplace(tail[p], extra);
        for (int64_t j = 0; j < extra; j++) sum[p] += tail[p][j];
    }
    /* out = sum of e * V over the shared keys (pairs in groups of up to 6, 64 channels at a time), the tails */
    float out[16 * 256] __attribute__((aligned(64)));
#if DEC_AMX
    if (f->amx && window == 0) {   /* on AMX: the tails appended to the list, weight 0 where a pair sees none */
        int64_t L = n + nt - 1, end = (L + 31) / 32 * 32;
        for (int64_t j = 1; j < nt; j++) {
            keys[n + j - 1] = b->slots[t0 + j];
            for (int p = 0; p < S; p++) sc[(n + j - 1) * S + p] = p < P && j <= p / G ? tail[p][j - 1] : 0.0f;
        }
        memset(sc + L * S, 0, sizeof(float) * (size_t)((end - L) * S));
        amx_values((int)S, sc, keys, L, V0, D, out, pbuf, ready);
        for (int p = 0; p < P; p++) {
            int64_t t = t0 + p / G;
            float inv = 1.0f / sum[p], *o = out + p * 256;
            uint16_t *dst = f->attn + t * H * D + (g * G + p % G) * D;
            for (int64_t d = 0; d < D; d++) dst[d] = f2bf(o[d] * inv);
        }
        return;
    }
#else
    (void)pbuf;
#endif
    memset(out, 0, sizeof(float) * 256 * (size_t)P);
    for (int64_t d0 = 0; d0 < D;) {
        int nc = D - d0 >= 64 ? 4 : D - d0 >= 32 ? 2 : 1;
        for (int p0 = 0; p0 < P; p0 += 6)
            pv_group(P - p0 < 6 ? P - p0 : 6, nc, sc + p0, S, n, keys, V0, D, d0, out + p0 * 256);
        d0 += 16 * nc;
    }
    for (int p = 0; p < P; p++) {
        int64_t extra = p / G, t = t0 + extra;
        float *o = out + p * 256;
        for (int64_t j = 1; j <= extra; j++) axpy_bf16(o, tail[p][j - 1], V0 + b->slots[t0 + j] * D, D);
        float inv = 1.0f / sum[p];
        uint16_t *dst = f->attn + t * H * D + (g * G + p % G) * D;
        for (int64_t d = 0; d < D; d++) dst[d] = f2bf(o[d] * inv);
    }
}
#endif

#if DEC_AVX2
/* out[p] += e[k * 8 + p] * V row k, key by key, for NP pairs and NC * 8 channels from d0 (accumulators in
   registers: NP <= 3, NC <= 4, NP * NC <= 9) */
static inline __attribute__((always_inline)) void pv_pairs8(int NP, int NC, const float *e, int64_t n,
                                                            const int64_t *keys, const uint16_t *V0, int64_t D,
                                                            int64_t d0, float *out) {
    __m256 o[3][4], row[4];
    for (int p = 0; p < NP; p++)
        for (int c = 0; c < NC; c++) o[p][c] = _mm256_loadu_ps(out + p * 256 + d0 + 8 * c);
    for (int64_t k = 0; k < n; k++) {
        const uint16_t *vr = V0 + keys[k] * D + d0;
        for (int c = 0; c < NC; c++) row[c] = load_bf16x8(vr + 8 * c);
        for (int p = 0; p < NP; p++) {
            __m256 pp = _mm256_set1_ps(e[k * 8 + p]);
            for (int c = 0; c < NC; c++) o[p][c] = _mm256_fmadd_ps(pp, row[c], o[p][c]);
        }
    }
    for (int p = 0; p < NP; p++)
        for (int c = 0; c < NC; c++) _mm256_storeu_ps(out + p * 256 + d0 + 8 * c, o[p][c]);
}

/* out[p * 256 ..] += pair p's weighted V rows (weights e[k * 8 + p]) over all D channels, for P pairs, three at
   a time */
static void pv_all8(int P, const float *e, int64_t n, const int64_t *keys, const uint16_t *V0, int64_t D,
                    float *out) {
    for (int p0 = 0; p0 < P; p0 += 3) {
        int np = P - p0 < 3 ? P - p0 : 3;
        const float *e0 = e + p0;
        float *o = out + p0 * 256;
        /* np * nc accumulators, nc rows and a broadcast within AVX2's 16 registers (3 x 4 spilled one) */
        for (int64_t d0 = 0, nc; d0 < D; d0 += 8 * nc) {
            nc = np == 3 ? (D - d0 >= 24 ? 3 : D - d0 >= 16 ? 2 : 1) : (D - d0 >= 32 ? 4 : D - d0 >= 16 ? 2 : 1);
#define PV8(NP) (nc == 4 ? pv_pairs8(NP, 4, e0, n, keys, V0, D, d0, o)   \
                 : nc == 3 ? pv_pairs8(NP, 3, e0, n, keys, V0, D, d0, o) \
                 : nc == 2 ? pv_pairs8(NP, 2, e0, n, keys, V0, D, d0, o) \
                 : pv_pairs8(NP, 1, e0, n, keys, V0, D, d0, o))
            if (np == 3) PV8(3);
            else if (np == 2) PV8(2);
            else PV8(1);
#undef PV8
        }
    }
}

/* sc[8k + p] = pair p's scaled score of key k (lanes past NP 0); returns the lanes' maxima. Each dot product is
   an 8-lane fmadd chain over the channels in order (dot_f32_bf16's operations), summed by sums8 (hsum8's order,
   lane by lane). The channel loop runs outside the pair loop, so the NP chains are in flight together (one chain
   at a time waited on each fmadd's latency: a prompt chunk's attention took 1.3-1.8x as long) */
static inline __attribute__((always_inline)) __m256 qk_pairs8(const int NP, const float *const *q,
                                                              const int64_t *keys, int64_t n, const uint16_t *K0,
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
        __m256 s = _mm256_mul_ps(sums8(acc), scv);
        _mm256_storeu_ps(sc + 8 * k, s);
        mxv = _mm256_max_ps(mxv, s);
    }
    return mxv;
}

/* Attention on 8 lanes (AVX2). Tokens t0 .. t0+nt-1 of a plain causal chunk (no key dropped by a window; nt = 1:
   a token alone, decoding or a verify row, over any key list, sparse ones too), the G heads of kv head g: P =
   nt * G <= 8 pairs (pair p: token t0 + p / G, head g * G + p % G). Token t0 reads keys[0..n), token t0+i those
   and then the new tokens t0+1 .. t0+i, as attention_task lists them. Each K and V row is loaded once for all
   pairs, and the pairs' dot products are summed together by sums8 (hsum8's order, lane by lane), so every pair
   gets the bits of dot_f32_bf16's chain then hsum8, the scale, the max, exp, the sum in key order and out += p *
   v key by key, whichever tokens share its call: a token's bits in a chunk, a verify chain or alone are the
   same. A token alone keeps P = G of 8 lanes busy in the softmax, and still measured 1.05-1.08x faster than a
   per-head layout whose sums over keys ran one scalar add at a time (decode steps at 2-6k keys). sc: 8 * n
   floats. */
static void grouped_tokens8(fwd *f, int64_t t0, int64_t nt, int64_t g, int64_t G, const int64_t *keys,
                            int64_t n, const uint16_t *K0, const uint16_t *V0, float *sc) {
    const tq_model *m = f->m;
    const tq_batch *b = f->b;
    int64_t D = m->head_dim, H = m->heads, C = D / 8;
    int P = (int)(nt * G);
    float scale = (float)m->attn_scale;
    const float *q[8];
    for (int p = 0; p < P; p++) q[p] = f->qkv + (t0 + p / G) * f->qkv_n + (g * G + p % G) * D;
    __m256 mxv;
    switch (P) {   /* the pair count as a constant: the pairs' chains in registers */
    case 1: mxv = qk_pairs8(1, q, keys, n, K0, C, scale, sc); break;
    case 2: mxv = qk_pairs8(2, q, keys, n, K0, C, scale, sc); break;
    case 3: mxv = qk_pairs8(3, q, keys, n, K0, C, scale, sc); break;
    case 4: mxv = qk_pairs8(4, q, keys, n, K0, C, scale, sc); break;
    case 5: mxv = qk_pairs8(5, q, keys, n, K0, C, scale, sc); break;
    case 6: mxv = qk_pairs8(6, q, keys, n, K0, C, scale, sc); break;
    case 7: mxv = qk_pairs8(7, q, keys, n, K0, C, scale, sc); break;
    default: mxv = qk_pairs8(8, q, keys, n, K0, C, scale, sc); break;
    }
    /* each later token's own new keys (at most nt - 1), one by one */
    float mx[8], tail[8][8], sum[8];
    _mm256_storeu_ps(mx, mxv);
    for (int p = 0; p < P; p++)
        for (int64_t j = 1; j <= p / G; j++) {
            tail[p][j - 1] = dot_f32_bf16(q[p], K0 + b->slots[t0 + j] * D, D) * scale;
            if (tail[p][j - 1] > mx[p]) mx[p] = tail[p][j - 1];
        }
    for (int p = P; p < 8; p++) mx[p] = 0.0f;
    __m256 mp = _mm256_loadu_ps(mx), total = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k++) {   /* numerators, and their sums in key order */
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + 8 * k), mp));
        _mm256_storeu_ps(sc + 8 * k, e);
        total = _mm256_add_ps(total, e);
    }
    _mm256_storeu_ps(sum, total);
    for (int p = 0; p < P; p++) {
        int64_t extra = p / G;
        for (int64_t j = 0; j < extra; j++) tail[p][j] -= mx[p];
        exp_inplace(tail[p], extra);
        for (int64_t j = 0; j < extra; j++) sum[p] += tail[p][j];
    }
    float out[8 * 256];
    memset(out, 0, sizeof(float) * 256 * (size_t)P);
    pv_all8(P, sc, n, keys, V0, D, out);
    for (int p = 0; p < P; p++) {
        int64_t extra = p / G, t = t0 + extra;
        float *o = out + p * 256;
        for (int64_t j = 1; j <= extra; j++) axpy_bf16(o, tail[p][j - 1], V0 + b->slots[t0 + j] * D, D);
        float inv = 1.0f / sum[p];
        uint16_t *dst = f->attn + t * H * D + (g * G + p % G) * D;
        for (int64_t d = 0; d < D; d++) dst[d] = f2bf(o[d] * inv);
    }
}
#endif

/* ---- sparse attention (tq_sparse) ------------------------------------------------------------------------ */

/* Quest's bound on q.k over one page: sum over d of max(q_d min_d, q_d max_d) (mn: the page's min row, then its
   max row), in a fixed order (16 lanes, or 8 on AVX2, then their reduction) */
static inline float page_bound(const float *q, const uint16_t *mn, int64_t D) {
    const uint16_t *mx = mn + D;
    int64_t i = 0;
    float s = 0;
#if DEC_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= D; i += 16) {
        __m512 qq = _mm512_loadu_ps(q + i);
        acc = _mm512_add_ps(acc, _mm512_max_ps(_mm512_mul_ps(qq, load_bf16x16(mn + i)),
                                               _mm512_mul_ps(qq, load_bf16x16(mx + i))));
    }
    s = _mm512_reduce_add_ps(acc);
#elif DEC_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= D; i += 8) {
        __m256 qq = _mm256_loadu_ps(q + i);
        acc = _mm256_add_ps(acc, _mm256_max_ps(_mm256_mul_ps(qq, load_bf16x8(mn + i)),
                                               _mm256_mul_ps(qq, load_bf16x8(mx + i))));
    }
    s = hsum8(acc);
#endif
    for (; i < D; i++) {
        float a = q[i] * bf2f(mn[i]), b = q[i] * bf2f(mx[i]);
        s += a > b ? a : b;
    }
    return s;
}

/* bounds of n pages (bounds: [n, 2, D] bf16) for query q [D]: what the decoder ranks pages by (for tests) */
void tq_page_bounds(const float *q, const uint16_t *bounds, int64_t n, int64_t D, float *out) {
    for (int64_t p = 0; p < n; p++) out[p] = page_bound(q, bounds + p * 2 * D, D);
}

/* a float's bits as an unsigned key in the floats' order: larger float, larger key, and equal floats (-0 and
   +0 too: x + 0 makes -0 +0) equal keys. No NaN. */
static inline uint32_t order_key(float x) {
    uint32_t u;
    x += 0.0f;
    memcpy(&u, &x, 4);
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

/* The k-th largest of key[0..n) (1 <= k <= n) by radix selection: a histogram of the top 11 bits finds the
   bucket holding it, whose keys are gathered (into tmp, n uint32) and narrowed on the next 11 bits, then on the
   last 10. Counting has no data-dependent branches: several times faster than a quickselect over thousands of
   keys. *take: how many keys equal to it are among the k largest (the rest of the k are larger). */
static uint32_t kth_key(const uint32_t *key, int64_t n, int64_t k, uint32_t *tmp, int64_t *take) {
    static const int shift[3] = {21, 10, 0}, width[3] = {11, 11, 10};
    uint32_t hist[2][2048], prefix = 0;
    const uint32_t *src = key;
    int64_t m = n;
    for (int pass = 0; pass < 3; pass++) {
        int64_t buckets = (int64_t)1 << width[pass], mask = buckets - 1, i = 0;
        memset(hist, 0, sizeof hist);
        for (; i + 1 < m; i += 2) {      /* two histograms: repeated buckets do not wait on each other */
            hist[0][(src[i] >> shift[pass]) & mask]++;
            hist[1][(src[i + 1] >> shift[pass]) & mask]++;
        }
        if (i < m) hist[0][(src[i] >> shift[pass]) & mask]++;
        int64_t b = buckets - 1;
        while ((int64_t)(hist[0][b] + hist[1][b]) < k) k -= hist[0][b] + hist[1][b], b--;
        prefix |= (uint32_t)b << shift[pass];
        if (pass == 2) break;
        uint32_t high = ~(((uint32_t)1 << shift[pass]) - 1);
        int64_t kept = 0;
        i = 0;
#if DEC_AVX512   /* the bucket's keys, 16 compared and packed at a time */
        for (; i + 16 <= m; i += 16) {
            __m512i u = _mm512_loadu_si512(src + i);
            __mmask16 in = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32((int)high)),
                                                   _mm512_set1_epi32((int)prefix));
            /* compress into a register, then store: a compressing store is slow on AMD */
            _mm512_storeu_si512(tmp + kept, _mm512_maskz_compress_epi32(in, u));
            kept += __builtin_popcount(in);
        }
#endif
        for (; i < m; i++)
            if ((src[i] & high) == prefix) tmp[kept++] = src[i];
        src = tmp, m = kept;
    }
    *take = k;
    return prefix;
}

#if DEC_AVX512
/* which of 16 order keys are among the k largest: those above the k-th (thr), and the first *take equal to it */
static inline __mmask16 top_lanes(__m512i u, uint32_t thr, int64_t *take) {
    __m512i t = _mm512_set1_epi32((int)thr);
    __mmask16 sel = _mm512_cmpgt_epu32_mask(u, t), eq = _mm512_cmpeq_epu32_mask(u, t);
    for (; eq && *take > 0; (*take)--, eq &= eq - 1) sel |= eq & -eq;
    return sel;
}
#endif

/* flags[i] = 1 for the k largest of score[0..n), ties to the lower index; tmp: 2n uint32 of scratch */
static void mark_top(const float *score, int64_t n, int64_t k, uint32_t *tmp, uint8_t *flags) {
    for (int64_t i = 0; i < n; i++) tmp[i] = order_key(score[i]);
    int64_t take, i = 0;
    uint32_t thr = kth_key(tmp, n, k, tmp + n, &take);
#if DEC_AVX512
    for (; i + 16 <= n; i += 16) {
        __mmask16 sel = top_lanes(_mm512_loadu_si512(tmp + i), thr, &take);
        _mm_storeu_si128((__m128i *)(flags + i), _mm_maskz_set1_epi8(sel, 1));
    }
#endif
    for (; i < n; i++) flags[i] = tmp[i] > thr || (tmp[i] == thr && take-- > 0);
}

/* mark_top for tests: flags of the k largest of score[0..n), ties to the lower index */
void tq_mark_top(const float *score, int64_t n, int64_t k, uint8_t *flags) {
    uint32_t *tmp = malloc(sizeof(uint32_t) * 2 * (size_t)n);
    mark_top(score, n, k, tmp, flags);
    free(tmp);
}

/* Double Sparsity's labels are int8: a vector of C values (a key's chosen channels, or a query's) becomes
   round(x * 127 / absmax) with the scale absmax / 127 (all zeros, scale 0, when absmax is 0 or not finite).
   Returns the scale; out gets C4 = C rounded up to 4 values, the padding 0. */
static float quantize_label(const float *x, int64_t C, int8_t *out) {
    float mx = 0;
    for (int64_t c = 0; c < C; c++) mx = fabsf(x[c]) > mx ? fabsf(x[c]) : mx;
    int ok = mx > 0 && isfinite(mx);
    float inv = ok ? 127.0f / mx : 0;
    for (int64_t c = 0; c < LABEL_C4(C); c++) out[c] = c < C && ok ? (int8_t)nearbyintf(x[c] * inv) : 0;
    return ok ? mx / 127.0f : 0;
}

/* key i (of 16) of a label block gets its quantized channels (each + 128, as unsigned bytes, 4 channels of a
   key together: [C4 / 4][16 keys][4]) and its scale (after them: [16] floats) */
static void write_label(const float *x, int64_t C, uint8_t *blk, int64_t i) {
    int8_t v[512];
    float scale = quantize_label(x, C, v);
    for (int64_t c = 0; c < LABEL_C4(C); c++) blk[(c / 4) * 4 * LABEL_BLOCK + i * 4 + c % 4] = (uint8_t)(v[c] + 128);
    memcpy(blk + LABEL_C4(C) * LABEL_BLOCK + i * 4, &scale, 4);
}

/* labels of n keys (keys [n, C] floats) into blocks (for tests) */
void tq_write_labels(const float *keys, int64_t n, int64_t C, uint8_t *labels) {
    for (int64_t s = 0; s < n; s++)
        write_label(keys + s * C, C, labels + s / LABEL_BLOCK * LABEL_STRIDE(C), s % LABEL_BLOCK);
}

/* A query's side of the label score: its int8 channels packed 4 to a word, and 128 times their sum (the
   unsigned labels' offset, taken off again) */
typedef struct { uint32_t packed[128]; int32_t offset; int64_t groups; } label_query;

static void prepare_label_query(const float *qs, int64_t C, label_query *lq) {
    int8_t v[512];
    quantize_label(qs, C, v);   /* the query's own scale ranks nothing: dropped */
    lq->groups = LABEL_C4(C) / 4;
    lq->offset = 0;
    for (int64_t c = 0; c < LABEL_C4(C); c++) lq->offset += 128 * v[c];
    memcpy(lq->packed, v, (size_t)LABEL_C4(C));
}

/* Double Sparsity's scores of one block of 16 keys: the exact integer dot product of the query's and each key's
   int8 channels (4 channels a step: vpdpbusd where the CPU has it), times the key's scale */
static inline void label_block(const label_query *lq, const uint8_t *blk, float *lane) {
    const float *scale = (const float *)(blk + lq->groups * 4 * LABEL_BLOCK);
#if DEC_AVX512 && defined(__AVX512VNNI__)
    __m512i acc = _mm512_set1_epi32(-lq->offset);
    for (int64_t j = 0; j < lq->groups; j++)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(blk + j * 4 * LABEL_BLOCK),
                                  _mm512_set1_epi32((int)lq->packed[j]));
    _mm512_storeu_ps(lane, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(scale)));
#elif DEC_AVX2
    /* 8 keys a vector; without VNNI, the signed channels (byte ^ 128) go the way of q8_matmul.c's Q8_0 codes:
       their magnitudes times the query's values carrying their signs, at most 128 x 127 per product, so the
       int16 pairs cannot overflow and the integer sums are exact (the offset is not needed) */
    const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(-128);
    __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t j = 0; j < lq->groups; j++) {
        __m256i qv = _mm256_set1_epi32((int)lq->packed[j]);
        for (int h = 0; h < 2; h++) {
            __m256i k = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + j * 4 * LABEL_BLOCK + 32 * h)),
                                         flip);
            __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(k), _mm256_sign_epi8(qv, k));
            acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(pairs, ones));
        }
    }
    for (int h = 0; h < 2; h++)
        _mm256_storeu_ps(lane + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[h]), _mm256_loadu_ps(scale + 8 * h)));
#else
    const int8_t *q = (const int8_t *)lq->packed;
    for (int64_t i = 0; i < LABEL_BLOCK; i++) {
        int32_t acc = -lq->offset;
        for (int64_t c = 0; c < lq->groups * 4; c++)
            acc += q[c] * (int32_t)blk[(c / 4) * 4 * LABEL_BLOCK + i * 4 + c % 4];
        lane[i] = (float)acc * scale[i];
    }
#endif
}

/* the order keys of the label scores of slots [first, end) into out[0..end-first) (labels: one (layer, row,
   kv head)'s label blocks) */
static void label_keys(const label_query *lq, const uint8_t *labels, int64_t stride, int64_t first, int64_t end,
                       uint32_t *out) {
    for (int64_t b = first / LABEL_BLOCK; b * LABEL_BLOCK < end; b++) {
        float lane[LABEL_BLOCK];
        label_block(lq, labels + b * stride, lane);
#if DEC_AVX512
        if (b * LABEL_BLOCK >= first && (b + 1) * LABEL_BLOCK <= end) {   /* a whole block: order_key on 16 lanes */
            __m512i u = _mm512_castps_si512(_mm512_add_ps(_mm512_loadu_ps(lane), _mm512_setzero_ps()));
            __m512i neg = _mm512_srai_epi32(u, 31);
            u = _mm512_xor_si512(u, _mm512_or_si512(neg, _mm512_set1_epi32((int)0x80000000u)));
            _mm512_storeu_si512(out + b * LABEL_BLOCK - first, u);
            continue;
        }
#endif
        int64_t lo = b * LABEL_BLOCK < first ? first : b * LABEL_BLOCK;
        int64_t hi = (b + 1) * LABEL_BLOCK > end ? end : (b + 1) * LABEL_BLOCK;
        for (int64_t s = lo; s < hi; s++) out[s - first] = order_key(lane[s % LABEL_BLOCK]);
    }
}

/* Double Sparsity's choice: the k slots of [first, end) whose labels score highest (ties to the lower slot),
   ascending, into chosen; returns their number (k, or all when fewer). rank: 2 (end - first) uint32. */
static int64_t label_top(const float *qs, int64_t C, const uint8_t *labels, int64_t first, int64_t end, int64_t k,
                         uint32_t *rank, int64_t *chosen) {
    int64_t n = end - first, take, kept = 0;
    if (k >= n) {
        for (int64_t s = first; s < end; s++) chosen[kept++] = s;
        return kept;
    }
    label_query lq;
    prepare_label_query(qs, C, &lq);
    label_keys(&lq, labels, LABEL_STRIDE(C), first, end, rank);
    uint32_t thr = kth_key(rank, n, k, rank + n, &take);
    int64_t i = 0;
#if DEC_AVX512   /* 16 slots at a time: those above the k-th, and the first `take` equal to it (the stores write
                    whole vectors; what lies past `kept` is overwritten or past the list) */
    for (; i + 16 <= n; i += 16) {
        __mmask16 sel = top_lanes(_mm512_loadu_si512(rank + i), thr, &take);
        __m512i slot = _mm512_add_epi64(_mm512_set1_epi64(first + i), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
        _mm512_storeu_si512(chosen + kept, _mm512_maskz_compress_epi64((__mmask8)sel, slot));
        kept += __builtin_popcount(sel & 0xFF);
        slot = _mm512_add_epi64(slot, _mm512_set1_epi64(8));
        _mm512_storeu_si512(chosen + kept, _mm512_maskz_compress_epi64((__mmask8)(sel >> 8), slot));
        kept += __builtin_popcount(sel >> 8);
    }
#endif
    for (; i < n; i++)
        if (rank[i] > thr || (rank[i] == thr && take-- > 0)) chosen[kept++] = first + i;
    return kept;
}

/* label_top over slots [0, n) (for tests) */
int64_t tq_label_top(const float *qs, const uint8_t *labels, int64_t n, int64_t C, int64_t k, int64_t *chosen) {
    uint32_t *rank = malloc(sizeof(uint32_t) * 2 * (size_t)n);
    int64_t kept = label_top(qs, C, labels, 0, n, k, rank, chosen);
    free(rank);
    return kept;
}

/* label scores of slots [0, n) (for tests) */
void tq_label_scores(const float *qs, const uint8_t *labels, int64_t n, int64_t C, float *out) {
    label_query lq;
    prepare_label_query(qs, C, &lq);
    for (int64_t b = 0; b * LABEL_BLOCK < n; b++) {
        float lane[LABEL_BLOCK];
        label_block(&lq, labels + b * LABEL_STRIDE(C), lane);
        for (int64_t s = b * LABEL_BLOCK; s < n && s < (b + 1) * LABEL_BLOCK; s++) out[s] = lane[s % LABEL_BLOCK];
    }
}

/* the label blocks of layer l, cache row `row`, kv head g */
static uint8_t *label_blocks(const fwd *f, int64_t l, int64_t row, int64_t g) {
    const tq_sparse *sp = f->sparse;
    int64_t blocks = sp->max_pages / LABEL_BLOCK;
    return sp->labels + ((l * f->c->batch + row) * f->m->kv_heads + g) * blocks * LABEL_STRIDE(sp->channels);
}

/* Quest: a page's key min/max (Double Sparsity: a key's label), per layer, cache row and kv head, for the pages
   (slots) a row has newly committed */
typedef struct { fwd *f; int64_t n_jobs; const int64_t *job; } bounds_args;   /* job: (row, first page, end) */

static void bounds_task(void *p, int64_t i0, int64_t i1) {
    bounds_args *a = p;
    fwd *f = a->f;
    const tq_model *m = f->m;
    const tq_sparse *sp = f->sparse;
    int64_t D = m->head_dim, Hkv = m->kv_heads, P = sp->page;
    for (int64_t i = i0; i < i1; i++) {
        int64_t l = i / (a->n_jobs * Hkv), j = i / Hkv % a->n_jobs, g = i % Hkv;
        if (sp->layers[l] == LAYER_DENSE || m->layers[l].window > 0) continue;
        int64_t row = a->job[3 * j];
        const uint16_t *K0 = f->c->k + (((l * f->c->batch + row) * Hkv + g) * f->c->cap) * D;
        if (sp->method == SPARSE_DOUBLE) {   /* labels: the key's chosen channels, block-wise channel-major */
            int64_t C = sp->channels;
            const int64_t *ch = sp->channel_index + (l * Hkv + g) * C;
            uint8_t *lab = label_blocks(f, l, row, g);
            for (int64_t s = a->job[3 * j + 1]; s < a->job[3 * j + 2]; s++) {
                float x[512];
                for (int64_t c = 0; c < C; c++) x[c] = bf2f(K0[s * D + ch[c]]);
                write_label(x, C, lab + (s / LABEL_BLOCK) * LABEL_STRIDE(C), s % LABEL_BLOCK);
            }
            continue;
        }
        uint16_t *out = sp->bounds + (((l * f->c->batch + row) * Hkv + g) * sp->max_pages) * 2 * D;
        for (int64_t pg = a->job[3 * j + 1]; pg < a->job[3 * j + 2]; pg++) {
            for (int64_t d = 0; d < D; d++) {
                uint16_t lo = K0[pg * P * D + d], hi = lo;
                for (int64_t s = 1; s < P; s++) {
                    uint16_t x = K0[(pg * P + s) * D + d];
                    if (bf2f(x) < bf2f(lo)) lo = x;
                    if (bf2f(x) > bf2f(hi)) hi = x;
                }
                out[pg * 2 * D + d] = lo;
                out[pg * 2 * D + D + d] = hi;
            }
        }
    }
}

static void update_bounds(fwd *f) {
    const tq_batch *b = f->b;
    const tq_sparse *sp = f->sparse;
    int64_t *job = malloc(sizeof(int64_t) * 3 * b->T), n_jobs = 0;
    for (int64_t t = 0; t < b->T; t++) {     /* each row's committed pages: below its tokens' least prefix */
        int64_t row = b->rows[t], end = b->prefix[t] / sp->page, j = 0;
        while (j < n_jobs && job[3 * j] != row) j++;
        if (j == n_jobs) {
            job[3 * j] = row, job[3 * j + 1] = sp->bounded[row], job[3 * j + 2] = end;
            n_jobs++;
        } else if (end < job[3 * j + 2]) {
            job[3 * j + 2] = end;
        }
    }
    bounds_args a = {f, n_jobs, job};
    tq_parallel_for(bounds_task, &a, f->m->n_layers * n_jobs * f->m->kv_heads, 1);
    for (int64_t j = 0; j < n_jobs; j++)
        if (job[3 * j + 2] > sp->bounded[job[3 * j]]) sp->bounded[job[3 * j]] = job[3 * j + 2];
    free(job);
}

/* TidalDecode's score of each of the row's keys: its attention probability summed over the group's heads */
static void attention_mass(fwd *f, int64_t t, int64_t g, const int64_t *keys, int64_t n, const uint16_t *K0,
                           float *logit, float *mass) {
    const tq_model *m = f->m;
    int64_t D = m->head_dim, G = m->heads / m->kv_heads;
    float scale = (float)m->attn_scale;
    memset(mass, 0, sizeof(float) * n);
    for (int64_t h = g * G; h < (g + 1) * G; h++) {
        const float *q = f->qkv + t * f->qkv_n + h * D;
        float mx = -INFINITY, sum = 0;
        for (int64_t k = 0; k < n; k++) {
            logit[k] = dot_f32_bf16(q, K0 + keys[k] * D, D) * scale;
            if (logit[k] > mx) mx = logit[k];
        }
        for (int64_t k = 0; k < n; k++) logit[k] -= mx;
        exp_inplace(logit, n);
        for (int64_t k = 0; k < n; k++) sum += logit[k];
        for (int64_t k = 0; k < n; k++) mass[k] += logit[k] / sum;
    }
}

/* ---- MInference (prefill) ------------------------------------------------------------------------------ */

/* The key indices (ascending) a row with n keys (itself the last, n - 1) reads under ``pattern`` (VS, A-shape
   or block) of kv head g: written to out, returns their count. Cost: the chosen columns and diagonals (VS),
   the key blocks of the row's query block (block), nothing per unread key. */
static int64_t mi_select(const fwd *f, int64_t g, int64_t pattern, int64_t n, int64_t *out) {
    const tq_sparse *sp = f->sparse;
    const mi_head *h = &f->mi[g];
    int64_t k = 0, self = n - 1;
    if (pattern == PATTERN_ASHAPE) {
        int64_t head = sp->vertical < n ? sp->vertical : n, tail = n - sp->slash > head ? n - sp->slash : head;
        for (int64_t i = 0; i < head; i++) out[k++] = i;
        for (int64_t i = tail; i < n; i++) out[k++] = i;
        return k;
    }
    if (pattern == PATTERN_BLOCK) {
        const uint8_t *row = h->blocks + (self / MI_BLOCK - f->mi_qb0) * f->mi_kb;
        for (int64_t kb = 0; kb <= self / MI_BLOCK; kb++)
            if (row[kb])
                for (int64_t i = kb * MI_BLOCK; i < (kb + 1) * MI_BLOCK && i < n; i++) out[k++] = i;
        return k;
    }
    /* vertical-slash: merge the columns < n (ascending) with the keys self - offset (offsets descending) */
    int64_t i = 0, j = h->n_slash - 1;
    while (j >= 0 && h->slash[j] > self) j--;
    while ((i < h->n_vert && h->vert[i] < n) || j >= 0) {
        int64_t a = i < h->n_vert && h->vert[i] < n ? h->vert[i] : INT64_MAX;
        int64_t b = j >= 0 ? self - h->slash[j] : INT64_MAX;
        int64_t idx = a < b ? a : b;
        if (a == idx) i++;
        if (b == idx) j--;
        out[k++] = idx;
    }
    return k;
}

/* probabilities of query q over keys 0..n-1 of K0 (softmax of the scaled dot products), into p */
static void mi_probs(const fwd *f, const float *q, const uint16_t *K0, int64_t n, float *p) {
    int64_t D = f->m->head_dim;
    float scale = (float)f->m->attn_scale, mx = -INFINITY, sum = 0;
    for (int64_t i = 0; i < n; i++) {
        p[i] = dot_f32_bf16(q, K0 + i * D, D) * scale;
        if (p[i] > mx) mx = p[i];
    }
    for (int64_t i = 0; i < n; i++) p[i] -= mx;
    exp_inplace(p, n);
    for (int64_t i = 0; i < n; i++) sum += p[i];
    float inv = 1.0f / sum;
    for (int64_t i = 0; i < n; i++) p[i] *= inv;
}

/* ascending indices of the k best of score[0..n) into out (ties to the lower index) */
static int64_t mi_top(const float *score, int64_t n, int64_t k, uint32_t *tmp, uint8_t *flags, int64_t *out) {
    if (k > n) k = n;
    if (k <= 0) return 0;
    mark_top(score, n, k, tmp, flags);
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++)
        if (flags[i]) out[c++] = i;
    return c;
}

/* The chunk's choice for kv heads g0..g1 of the current layer (see tq_sparse), before its attention runs. */
static void mi_estimate(void *p, int64_t g0, int64_t g1) {
    fwd *f = p;
    const tq_model *m = f->m;
    const tq_sparse *sp = f->sparse;
    const tq_batch *b = f->b;
    int64_t D = m->head_dim, Hkv = m->kv_heads, G = m->heads / Hkv, T = b->T, P0 = f->mi_start, N = P0 + T;
    int64_t l = f->layer_index, nkb = f->mi_kb, R = sp->last_q < T ? sp->last_q : T;
    float *vs = malloc(sizeof(float) * N), *ss = malloc(sizeof(float) * N), *pr = malloc(sizeof(float) * N);
    float *tmp = malloc(sizeof(float) * N), *kmean = malloc(sizeof(float) * nkb * D), qmean[512];
    uint8_t *flags = malloc(N);
    uint32_t *rank = malloc(sizeof(uint32_t) * 2 * N);   /* mark_top's scratch */
    int64_t *idx = malloc(sizeof(int64_t) * N);
    for (int64_t g = g0; g < g1; g++) {
        int64_t pattern = sp->patterns[l * Hkv + g];
        const uint16_t *K0 = cache_at(f, f->c->k, b->rows[0], g, 0);
        mi_head *h = &f->mi[g];
        if (pattern == PATTERN_VS || pattern == PATTERN_SEARCH) {
            memset(vs, 0, sizeof(float) * N);
            memset(ss, 0, sizeof(float) * N);
            for (int64_t r = T - R; r < T; r++) {       /* the last rows' attention, by column and by offset */
                int64_t n = P0 + r + 1;
                for (int64_t hh = g * G; hh < (g + 1) * G; hh++) {
                    mi_probs(f, f->qkv + r * f->qkv_n + hh * D, K0, n, pr);
                    for (int64_t i = 0; i < n; i++) {
                        vs[i] += pr[i];
                        ss[n - 1 - i] += pr[i];
                    }
                }
            }
            for (int64_t i = 0; i < sp->sinks && i < N; i++) vs[i] = INFINITY;
            for (int64_t o = 0; o < sp->window && o < N; o++) ss[o] = INFINITY;
            h->n_vert = mi_top(vs, N, sp->vertical, rank, flags, h->vert);
            h->n_slash = mi_top(ss, N, sp->slash, rank, flags, h->slash);
        }
        if (pattern == PATTERN_BLOCK || pattern == PATTERN_SEARCH) {
            for (int64_t kb = 0; kb < nkb; kb++) {     /* mean-pooled keys of each 64-key block */
                int64_t lo = kb * MI_BLOCK, hi = lo + MI_BLOCK < N ? lo + MI_BLOCK : N;
                float *km = kmean + kb * D;
                memset(km, 0, sizeof(float) * D);
                for (int64_t i = lo; i < hi; i++)
                    for (int64_t d = 0; d < D; d++) km[d] += bf2f(K0[i * D + d]);
                for (int64_t d = 0; d < D; d++) km[d] /= (float)(hi - lo);
            }
            for (int64_t qb = f->mi_qb0; qb <= (N - 1) / MI_BLOCK; qb++) {   /* the chunk's query blocks */
                int64_t lo = qb * MI_BLOCK > P0 ? qb * MI_BLOCK : P0;
                int64_t hi = (qb + 1) * MI_BLOCK < N ? (qb + 1) * MI_BLOCK : N;
                memset(qmean, 0, sizeof(float) * D);
                for (int64_t i = lo; i < hi; i++)      /* the group's queries summed: a sum of the heads' scores */
                    for (int64_t hh = g * G; hh < (g + 1) * G; hh++)
                        for (int64_t d = 0; d < D; d++) qmean[d] += f->qkv[(i - P0) * f->qkv_n + hh * D + d];
                for (int64_t d = 0; d < D; d++) qmean[d] /= (float)(hi - lo);
                for (int64_t kb = 0; kb <= qb; kb++) tmp[kb] = dot_f32(qmean, kmean + kb * D, D);
                tmp[0] = tmp[qb] = INFINITY;
                uint8_t *row = h->blocks + (qb - f->mi_qb0) * nkb;
                mark_top(tmp, qb + 1, sp->blocks < qb + 1 ? sp->blocks : qb + 1, rank, row);
            }
        }
        if (pattern == PATTERN_SEARCH && T > R) {      /* calibration: each pattern's recall on sampled rows */
            double *rec = sp->recall + (l * Hkv + g) * 4;
            for (int64_t s = 0; s < MI_SAMPLES; s++) {
                int64_t t = (s + 1) * (T - R) / (MI_SAMPLES + 1), n = P0 + t + 1;
                if (n <= sp->vertical + sp->slash) continue;   /* every pattern reads all of it */
                for (int64_t hh = g * G; hh < (g + 1) * G; hh++) {
                    mi_probs(f, f->qkv + t * f->qkv_n + hh * D, K0, n, pr);
                    for (int64_t pat = PATTERN_VS; pat <= PATTERN_BLOCK; pat++) {
                        int64_t c = mi_select(f, g, pat, n, idx);
                        double kept = 0;
                        for (int64_t k = 0; k < c; k++) kept += pr[idx[k]];
                        rec[pat - 1] += kept;
                    }
                    rec[3] += 1;
                }
            }
        }
    }
    free(vs); free(ss); free(pr); free(tmp); free(kmean); free(flags); free(rank); free(idx);
}

/* The keys a sparse layer's row t (kv head g) reads: keys[0..n) filtered in place (order kept); returns the
   new count. score, tmp: cap floats of scratch; rank: 2 cap uint32; keep: cap bytes. */
static int64_t sparse_keys(fwd *f, int64_t t, int64_t g, int64_t *keys, int64_t n, const uint16_t *K0,
                           float *score, float *tmp, uint32_t *rank, uint8_t *keep, int64_t *idx) {
    const tq_sparse *sp = f->sparse;
    const tq_model *m = f->m;
    int64_t l = f->layer_index, role = sp->layers[l], D = m->head_dim, Hkv = m->kv_heads, G = m->heads / Hkv;
    if (role == LAYER_DENSE || f->layer->window > 0) return n;
    if (sp->method == SPARSE_MINFERENCE) {
        int64_t pattern = sp->patterns[l * Hkv + g];
        if (pattern == PATTERN_DENSE || pattern == PATTERN_SEARCH || f->b->positions[t] >= sp->dense_from) return n;
        int64_t kept = mi_select(f, g, pattern, n, idx);
        for (int64_t k = 0; k < kept; k++) keys[k] = keys[idx[k]];   /* idx ascending: idx[k] >= k */
        return kept;
    }
    int64_t P = sp->method == SPARSE_QUEST ? sp->page : 1;
    int64_t first = (sp->sinks + P - 1) / P, end = (n - sp->window) / P;   /* candidate units [first, end) */
    if (end > f->b->prefix[t] / P) end = f->b->prefix[t] / P;            /* committed keys only */
    int64_t cands = end - first;
    uint8_t *chosen = f->chosen ? f->chosen + (t * Hkv + g) * (f->c->cap + f->b->T) : NULL;
    if (sp->method == SPARSE_TIDAL && role == LAYER_SPARSE) {           /* reuse the last selection */
        int64_t kept = 0;
        for (int64_t i = 0; i < n; i++)
            if (chosen[i]) keys[kept++] = keys[i];
        return kept;
    }
    if (cands <= sp->select) {                                           /* everything fits: dense */
        if (chosen) memset(chosen, 1, n);
        return n;
    }
    if (sp->method == SPARSE_DOUBLE) {
        int64_t C = sp->channels;
        const int64_t *ch = sp->channel_index + (l * Hkv + g) * C;
        float qs[512];
        for (int64_t c = 0; c < C; c++) {
            float s = 0;
            for (int64_t h = g * G; h < (g + 1) * G; h++) s += f->qkv[t * f->qkv_n + h * D + ch[c]];
            qs[c] = s;
        }
        const uint8_t *labels = label_blocks(f, l, f->b->rows[t], g);
        int64_t kept = first + label_top(qs, C, labels, first, end, sp->select, rank, keys + first);
        for (int64_t i = end; i < n; i++) keys[kept++] = keys[i];
        return kept;
    }
    if (sp->method == SPARSE_QUEST) {
        const uint16_t *bounds = sp->bounds + (((l * f->c->batch + f->b->rows[t]) * Hkv + g) * sp->max_pages) * 2 * D;
        for (int64_t p = 0; p < cands; p++) {
            float best = -INFINITY;
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                float s = page_bound(f->qkv + t * f->qkv_n + h * D, bounds + (first + p) * 2 * D, D);
                if (s > best) best = s;
            }
            score[p] = best;
        }
        mark_top(score, cands, sp->select, rank, keep);
        int64_t kept = 0;
        for (int64_t i = 0; i < n; i++)
            if (i < first * P || i >= end * P || keep[i / P - first]) keys[kept++] = keys[i];
        return kept;
    }
    /* TidalDecode selection layer: rank by full attention, remember the choice, attend densely here */
    attention_mass(f, t, g, keys, n, K0, tmp, score);
    mark_top(score + first, cands, sp->select, rank, keep);
    for (int64_t i = 0; i < n; i++) chosen[i] = i < first || i >= end || keep[i - first];
    return n;
}

/* attention of token t over its keys, for the query heads of one key head: tasks are (t, kv head) pairs */
/* How many tokens from t (up to te) read t's keys and then the chunk's new tokens after t, up to themselves: the
   run grouped_tokens takes together. Plain causal chunks of one row, past no sliding window; under MInference,
   its dense layers and heads, and block-sparse heads within one query block whose diagonal block is chosen
   (mi_select's lists then grow by the new tokens only). */
static int64_t shared_run(const fwd *f, int64_t t, int64_t g, int64_t te) {
    const tq_batch *b = f->b;
    const tq_sparse *sp = f->sparse;
    int64_t window = f->layer->window, nt = 1;
    /* under a sliding window, each next token drops the list's leading keys as its window moves on: positions
       must be the slots (an uncompressed cache) and run on by one, so the drop is the window's move */
    while (t + nt < te && b->rows[t + nt] == b->rows[t] && b->prefix[t + nt] == b->prefix[t] &&
           !(window > 0 && (nt >= window || b->positions[t + nt] != b->slots[t + nt] ||
                            b->positions[t + nt] != b->positions[t] + nt)))
        nt++;
    if (!sp || nt == 1) return nt;
    if (sp->record || sp->method != SPARSE_MINFERENCE) return 1;
    int64_t l = f->layer_index, pattern = sp->patterns[l * f->m->kv_heads + g];
    if (sp->layers[l] == LAYER_DENSE || window > 0 || pattern == PATTERN_DENSE || pattern == PATTERN_SEARCH ||
        b->positions[t] >= sp->dense_from)
        return nt;   /* every key (positions only grow along the chunk) */
    if (pattern != PATTERN_BLOCK) return 1;
    int64_t qb = b->slots[t] / MI_BLOCK, k = 1;
    if (!f->mi[g].blocks[(qb - f->mi_qb0) * f->mi_kb + qb]) return 1;
    while (k < nt && b->slots[t + k] / MI_BLOCK == qb && b->positions[t + k] < sp->dense_from) k++;
    return k;
}

/* Scratch memory of the calling thread, kept between calls and grown when a call needs more: attention runs
   once per layer and forward, and fresh buffers of hundreds of KB each time cost page faults. part[i] gets
   sizes[i] bytes (64-byte aligned; NULL for 0). A pool thread keeps the largest block it needed until exit. */
static void thread_scratch(const size_t *sizes, void **part, int n) {
    static __thread char *block;
    static __thread size_t have;
    size_t need = 0;
    for (int i = 0; i < n; i++) need += (sizes[i] + 63) & ~(size_t)63;
    if (need > have) {
        free(block);
        block = aligned_alloc(64, need);
        if (!block) abort();   /* out of memory inside a kernel task: nothing sane to go on with */
        have = need;
    }
    for (size_t i = 0, at = 0; i < (size_t)n; at += (sizes[i] + 63) & ~(size_t)63, i++)
        part[i] = sizes[i] ? block + at : NULL;
}

static void attention_task(void *p, int64_t i0, int64_t i1) {
    fwd *f = p;
    const tq_model *m = f->m;
    const tq_batch *b = f->b;
    int64_t D = m->head_dim, H = m->heads, Hkv = m->kv_heads, G = H / Hkv, T = b->T;
    int64_t window = f->layer->window;
    float scale = (float)m->attn_scale;
    int64_t cap = f->c->cap + T;
    float out[512];
    /* scratch from the thread's arena: keys, scores (one row per head of the group; grouped_tokens: 16 per key),
       and the sparse selection's buffers */
    size_t sizes[9] = {sizeof(int64_t) * cap, sizeof(float) * cap * (G > 8 ? 1 : G), sizeof(float) * 16 * (cap + 32)};
    if (f->amx) sizes[8] = sizeof(uint16_t) * 2 * 16 * (cap + 64);   /* amx_values' weights */
    if (f->sparse) {
        sizes[3] = sizes[4] = sizeof(float) * cap;
        sizes[5] = sizeof(uint32_t) * 2 * cap;
        sizes[6] = cap;
        sizes[7] = f->mi ? sizeof(int64_t) * cap : 0;
    }
    void *part[9];
    thread_scratch(sizes, part, 9);
    int64_t *keys = part[0];
    float *score = part[1], *pair_score = part[2], *sel_score = part[3], *sel_tmp = part[4];
    uint32_t *rank = part[5];
    uint8_t *keep = part[6];
    int64_t *idx = part[7];
#if !DEC_AVX512 && !DEC_AVX2
    (void)pair_score;   /* the grouped layouts' scores: only the SIMD builds have them */
#endif
    int64_t B = f->block;   /* tokens per item: a plain causal chunk's tokens share their keys */
    for (int64_t i = i0; i < i1; i++)
    for (int64_t t = i / Hkv * B, te = t + B < T ? t + B : T, g = i % Hkv; t < te; t++) {
        int64_t row = b->rows[t], pos = b->positions[t];
        /* the keys it sees, in order: its row's first prefix[t] slots (within the window), then new tokens */
        int64_t n = 0, lo = 0;
        if (window > 0 && pos - window + 1 > 0) lo = pos - window + 1;
        for (int64_t s = lo; s < b->prefix[t]; s++) keys[n++] = s;
        int64_t last = b->mask ? T : t + 1;   /* without a mask only earlier new tokens are seen */
        for (int64_t j = 0; j < last; j++)
            if (sees(b, t, j) && !(window > 0 && pos - b->positions[j] >= window)) keys[n++] = b->slots[j];
        const uint16_t *K0 = cache_at(f, f->c->k, row, g, 0), *V0 = cache_at(f, f->c->v, row, g, 0);
#if DEC_AVX512
        int64_t seen = n;   /* keys it sees; a sparse layer reads fewer */
#endif
        if (f->sparse) n = sparse_keys(f, t, g, keys, n, K0, sel_score, sel_tmp, rank, keep, idx);
        if (f->sparse && f->sparse->record) {   /* tests: the slots this row read */
            uint8_t *rec = f->sparse->record + ((f->layer_index * Hkv + g) * T + t) * (f->mi_start + T);
            for (int64_t k = 0; k < n; k++) rec[keys[k]] = 1;
        }
#if DEC_AVX512
        int64_t nt = B > 1 && (lo == 0 || b->positions[t] == b->slots[t]) ? shared_run(f, t, g, te) : 1;
        if (f->grouped && (nt > 1 || n == seen || G > 8 || f->amx)) {   /* it and the next tokens sharing its keys */
            grouped_tokens(f, t, nt, g, G, keys, n, K0, V0, pair_score, part[8]);
            t += nt - 1;
            continue;
        }
        if (D % 16 == 0 && D <= 256 && G <= 8) {   /* a sparse list alone: measured faster this way */
            grouped_heads(f, t, g, G, keys, n, K0, V0, score, cap);
            continue;
        }
#elif DEC_AVX2
        if (D % 8 == 0 && D <= 256 && G <= 8) {
            int64_t nt = B > 1 ? shared_run(f, t, g, te) : 1;
            while (nt > 1 && window > 0 && b->positions[t + nt - 1] - window + 1 > 0) nt--;   /* none dropped */
            grouped_tokens8(f, t, nt, g, G, keys, n, K0, V0, pair_score);   /* it and the next tokens sharing its keys */
            t += nt - 1;
            continue;
        }
#endif
        for (int64_t h = g * G; h < (g + 1) * G; h++) {
            const float *q = f->qkv + t * f->qkv_n + h * D;
            float mx = -INFINITY;
            for (int64_t k = 0; k < n; k++) {
                score[k] = dot_f32_bf16(q, K0 + keys[k] * D, D) * scale;
                if (score[k] > mx) mx = score[k];
            }
            for (int64_t k = 0; k < n; k++) score[k] -= mx;
            exp_inplace(score, n);
            float sum = 0;
            for (int64_t k = 0; k < n; k++) sum += score[k];
            memset(out, 0, sizeof(float) * D);
            for (int64_t k = 0; k < n; k++) axpy_bf16(out, score[k], V0 + keys[k] * D, D);
            float inv = 1.0f / sum;
            uint16_t *dst = f->attn + t * H * D + h * D;
            for (int64_t d = 0; d < D; d++) dst[d] = f2bf(out[d] * inv);
        }
    }
#if DEC_AMX
    if (f->amx) _tile_release();   /* no tile state left for the OS to save at each switch */
#endif
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

/* act(gate) * up for tokens t0..t1, into bf16: SiLU x / (1 + e^-x), or GELU's tanh form with
   tanh(y) = 1 - 2 / (1 + e^2y) */
static void mlp_act(void *p, int64_t t0, int64_t t1) {
    fwd *f = p;
    int64_t I = f->m->inter;
    for (int64_t t = t0; t < t1; t++) {
        const float *g = f->gu + t * 2 * I, *u = g + I;
        uint16_t *o = f->act + t * I;
        int64_t i = 0;
#if DEC_AVX512
        __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= I; i += 16) {
            __m512 x = _mm512_loadu_ps(g + i), a;
            if (f->m->gelu) {
                __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                         _mm512_add_ps(x, _mm512_mul_ps(_mm512_set1_ps(0.044715f),
                                                                        _mm512_mul_ps(_mm512_mul_ps(x, x), x))));
                __m512 th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f),
                                                             _mm512_add_ps(one, exp16(_mm512_add_ps(y, y)))));
                a = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(one, th));
            } else {
                a = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
            }
            __m512 r = _mm512_mul_ps(a, _mm512_loadu_ps(u + i));
            _mm256_storeu_si256((__m256i *)(o + i), (__m256i)_mm512_cvtneps_pbh(r));
        }
#elif DEC_AVX2
        __m256 one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= I; i += 8) {
            __m256 x = _mm256_loadu_ps(g + i), a;
            if (f->m->gelu) {
                __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                         _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(0.044715f),
                                                                        _mm256_mul_ps(_mm256_mul_ps(x, x), x))));
                __m256 th = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f),
                                                             _mm256_add_ps(one, exp8(_mm256_add_ps(y, y)))));
                a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, th));
            } else {
                a = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
            }
            store_bf16x8(o + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = f2bf((f->m->gelu ? gelu_tanh(g[i]) : silu(g[i])) * u[i]);
    }
}

/* x += norm(y) (or y): the residual add after attention / MLP, then the next norm's bf16 input */
typedef struct { fwd *f; const float *post, *next; } residual_args;

static void residual_task(void *p, int64_t t0, int64_t t1) {
    residual_args *a = p;
    fwd *f = a->f;
    int64_t Hd = f->m->hidden;
    for (int64_t t = t0; t < t1; t++) {
        float *x = f->x + t * Hd, *y = f->tmp + t * Hd;
        if (a->post) rms_norm(y, a->post, Hd, f->m->eps, y, NULL);
        for (int64_t i = 0; i < Hd; i++) x[i] += y[i];
        if (a->next) rms_norm(x, a->next, Hd, f->m->eps, NULL, f->xn + t * Hd);
    }
}

static void norm_task(void *p, int64_t t0, int64_t t1) {
    residual_args *a = p;
    fwd *f = a->f;
    int64_t Hd = f->m->hidden;
    for (int64_t t = t0; t < t1; t++) rms_norm(f->x + t * Hd, a->next, Hd, f->m->eps, NULL, f->xn + t * Hd);
}

int tq_forward_sparse(const tq_model *m, tq_cache *c, const tq_batch *b, const tq_sparse *sparse) {
    int64_t T = b->T, Hd = m->hidden, D = m->head_dim, I = m->inter;
    int64_t qkv_n = (m->heads + 2 * m->kv_heads) * D;
    if (T <= 0 || D > 512 || m->heads % m->kv_heads) return -1;
    for (int64_t r = 0; b->logit_rows && r < b->n_logits; r++)
        if (b->logit_rows[r] < 0 || b->logit_rows[r] >= T) return -2;
    for (int64_t t = 0; t < T; t++)
        if (b->rows[t] < 0 || b->rows[t] >= c->batch || b->slots[t] < 0 || b->slots[t] >= c->cap ||
            b->prefix[t] < 0 || b->prefix[t] > c->cap || b->positions[t] < 0 || b->positions[t] >= m->rope_len ||
            b->tokens[t] < 0 || b->tokens[t] >= m->embed.N)
            return -2;
    fwd f = {.m = m, .c = c, .b = b, .qkv_n = qkv_n, .sparse = sparse};
    if (sparse) {
        if (sparse->method < SPARSE_QUEST || sparse->method > SPARSE_DOUBLE) return -4;
        if (sparse->record && sparse->method != SPARSE_MINFERENCE) return -4;
        if (sparse->method == SPARSE_MINFERENCE) {   /* one plain chunk of one sequence: slots prefix..prefix+T */
            if (b->mask || sparse->last_q < 1) return -4;
            for (int64_t t = 0; t < T; t++)
                if (b->rows[t] != b->rows[0] || b->prefix[t] != b->prefix[0] || b->slots[t] != b->prefix[0] + t)
                    return -4;
            f.mi_start = b->prefix[0];
            f.mi_qb0 = f.mi_start / MI_BLOCK;
            f.mi_kb = (f.mi_start + T + MI_BLOCK - 1) / MI_BLOCK;
            int64_t N = f.mi_start + T, nqb = (N - 1) / MI_BLOCK - f.mi_qb0 + 1;
            f.mi = calloc((size_t)m->kv_heads, sizeof(mi_head));
            if (!f.mi) return -3;
            for (int64_t g = 0; g < m->kv_heads; g++) {
                f.mi[g].vert = malloc(sizeof(int64_t) * N);
                f.mi[g].slash = malloc(sizeof(int64_t) * N);
                f.mi[g].blocks = calloc((size_t)(nqb * f.mi_kb), 1);
                if (!f.mi[g].vert || !f.mi[g].slash || !f.mi[g].blocks) return -3;
            }
        } else if (sparse->method == SPARSE_QUEST) {
            if (sparse->page < 1 || sparse->max_pages * sparse->page < c->cap) return -4;
            update_bounds(&f);
        } else if (sparse->method == SPARSE_DOUBLE) {
            int64_t C = sparse->channels;
            if (sparse->page != 1 || C < 1 || C > D || !sparse->labels || !sparse->channel_index ||
                sparse->max_pages % LABEL_BLOCK || sparse->max_pages < c->cap)
                return -4;
            for (int64_t i = 0; i < m->n_layers * m->kv_heads * C; i++)
                if (sparse->channel_index[i] < 0 || sparse->channel_index[i] >= D) return -4;
            update_bounds(&f);
        } else {
            f.chosen = malloc((size_t)(T * m->kv_heads * (c->cap + T)));
            if (!f.chosen) return -3;
        }
    }
    /* grouped_tokens: a token's G heads together; the tokens of a plain causal chunk (no mask) also share their
       keys, 16 / G at a time, where every key is read (dense attention, MInference's dense layers) */
    f.block = 1;
#if DEC_AVX512 || DEC_AVX2
    int64_t G = m->heads / m->kv_heads;
#endif
#if DEC_AVX512
    f.grouped = D % 16 == 0 && D <= 256 && G <= 16;
    if (f.grouped && !b->mask && (!sparse || sparse->method == SPARSE_MINFERENCE)) f.block = 16 / G;
    f.amx = tq_amx_on && f.grouped && D % 32 == 0;
#elif DEC_AVX2
    if (D % 8 == 0 && D <= 256 && G <= 4 && !b->mask && !sparse) f.block = 8 / G;   /* grouped_tokens8 */
#endif
    int64_t width = Hd > I ? Hd : I;
    f.x = malloc(sizeof(float) * T * Hd);
    f.tmp = malloc(sizeof(float) * T * Hd);
    f.qkv = malloc(sizeof(float) * T * qkv_n);
    f.gu = malloc(sizeof(float) * T * 2 * I);
    f.xn = malloc(sizeof(uint16_t) * T * width);
    f.attn = malloc(sizeof(uint16_t) * T * m->heads * D);
    f.act = malloc(sizeof(uint16_t) * T * I);
    if (!f.x || !f.tmp || !f.qkv || !f.gu || !f.xn || !f.attn || !f.act) return -3;

    /* embeddings: rows of the table, as bf16 (the bf16 path's values), times the model's scale */
    tq_dequantize((int)m->embed.fmt, m->embed.data, m->embed.row_bytes, T, m->embed.K, b->tokens, f.xn, 1, 0);
    for (int64_t i = 0; i < T * Hd; i++) f.x[i] = bf2f(f.xn[i]) * (float)m->embed_scale;

    int64_t grain = T >= 16 ? 4 : T;    /* few tokens: one thread does the small per-token work */
    residual_args ra = {&f, NULL, m->layers[0].attn_norm};
    tq_parallel_for(norm_task, &ra, T, grain);
    double t0 = now_s(), t1;
#define PHASE(P) (t1 = now_s(), profile[P] += t1 - t0, t0 = t1)
    PHASE(P_EMBED);
    for (int64_t l = 0; l < m->n_layers; l++) {
        const tq_layer *L = &m->layers[l];
        f.layer = L;
        f.layer_index = l;
        linear(&L->qkv, f.xn, T, f.qkv);
        PHASE(P_QKV);
        tq_parallel_for(qkv_token, &f, T, grain);
        PHASE(P_ROPE);
        if (f.mi && sparse->layers[l] != LAYER_DENSE && L->window == 0)
            tq_parallel_for(mi_estimate, &f, m->kv_heads, 1);   /* counted as attention */
        tq_parallel_for_dynamic(attention_task, &f, (T + f.block - 1) / f.block * m->kv_heads, 1);
        PHASE(P_ATTENTION);
        linear(&L->o, f.attn, T, f.tmp);
        ra = (residual_args){&f, L->post_attn_norm, L->mlp_norm};
        tq_parallel_for(residual_task, &ra, T, grain);
        PHASE(P_OUT);
        linear(&L->gate_up, f.xn, T, f.gu);
        tq_parallel_for(mlp_act, &f, T, grain);
        PHASE(P_MLP_UP);
        linear(&L->down, f.act, T, f.tmp);
        ra = (residual_args){&f, L->post_mlp_norm, l + 1 < m->n_layers ? m->layers[l + 1].attn_norm : NULL};
        tq_parallel_for(residual_task, &ra, T, grain);
        PHASE(P_MLP_DOWN);
    }
    /* final norm; logits for the rows asked for */
    int64_t n_out = b->logit_rows ? b->n_logits : T;
    for (int64_t r = 0; r < n_out; r++) {
        int64_t t = b->logit_rows ? b->logit_rows[r] : r;
        rms_norm(f.x + t * Hd, m->final_norm, Hd, m->eps, NULL, f.xn + r * Hd);
    }
    if (b->logits && n_out > 0) linear(&m->lm_head, f.xn, n_out, b->logits);
    PHASE(P_HEAD);
#undef PHASE
    profile_calls++;
    if (b->hidden)
        for (int64_t t = 0; t < T; t++) rms_norm(f.x + t * Hd, m->final_norm, Hd, m->eps, b->hidden + t * Hd, NULL);
    free(f.x); free(f.tmp); free(f.qkv); free(f.gu); free(f.xn); free(f.attn); free(f.act); free(f.chosen);
    for (int64_t g = 0; f.mi && g < m->kv_heads; g++) {
        free(f.mi[g].vert); free(f.mi[g].slash); free(f.mi[g].blocks);
    }
    free(f.mi);
    return 0;
}

int tq_forward(const tq_model *m, tq_cache *c, const tq_batch *b) { return tq_forward_sparse(m, c, b, NULL); }
