/* Argmax and top-k over rows of logits (float32 [T, V]): a vocabulary of 49k-262k entries per row makes
 * PyTorch's reductions cost ~40 us per 49k row on one thread, a real share of a 3 ms decode step. These scan
 * 16 lanes at a time (8 with AVX2). Ties go to the lowest index, as torch.argmax and torch.topk (sorted) break
 * them.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

static int64_t argmax_row(const float *x, int64_t V) {
    int64_t best = 0, i = 0;
    float m = x[0];
#if TQ_AVX512
    if (V >= 16) {
        __m512 vm = _mm512_loadu_ps(x);
        for (i = 16; i + 16 <= V; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + i));
        m = _mm512_reduce_max_ps(vm);
        for (; i < V; i++) m = x[i] > m ? x[i] : m;
        __m512 target = _mm512_set1_ps(m);      /* the first index holding the maximum */
        for (i = 0; i + 16 <= V; i += 16) {
            __mmask16 hit = _mm512_cmpeq_ps_mask(_mm512_loadu_ps(x + i), target);
            if (hit) return i + __builtin_ctz(hit);
        }
        for (; i < V; i++)
            if (x[i] == m) return i;
        return 0;    /* NaN rows */
    }
#elif TQ_AVX2
    if (V >= 8) {   /* the same scan 8 lanes at a time */
        __m256 vm = _mm256_loadu_ps(x);
        for (i = 8; i + 8 <= V; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
        m = hmax8(vm);
        for (; i < V; i++) m = x[i] > m ? x[i] : m;
        __m256 target = _mm256_set1_ps(m);
        for (i = 0; i + 8 <= V; i += 8) {
            int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
            if (hit) return i + __builtin_ctz((unsigned)hit);
        }
        for (; i < V; i++)
            if (x[i] == m) return i;
        return 0;    /* NaN rows */
    }
#endif
    for (i = 1; i < V; i++)
        if (x[i] > m) {
            m = x[i];
            best = i;
        }
    return best;
}

typedef struct { const float *x; int64_t V, ld, k; int64_t *out; } rows_args;

static void argmax_task(void *p, int64_t t0, int64_t t1) {
    rows_args *a = p;
    for (int64_t t = t0; t < t1; t++) a->out[t] = argmax_row(a->x + t * a->ld, a->V);
}

/* insert value y (index id) into the sorted list val/ids of n <= k entries if it is among the k largest so
   far (a later equal value stays behind: ties go to the lower index); floor_v: the smallest kept once full */
static inline void keep_top(float *val, int64_t *ids, int64_t *n, int64_t k, float *floor_v, float y, int64_t id) {
    if (*n == k && !(y > *floor_v)) return;
    int64_t pos = *n < k ? (*n)++ : k - 1;
    while (pos > 0 && y > val[pos - 1]) {
        val[pos] = val[pos - 1];
        ids[pos] = ids[pos - 1];
        pos--;
    }
    val[pos] = y;
    ids[pos] = id;
    if (*n == k) *floor_v = val[k - 1];
}

/* the k largest of a row, largest first (ties: lower index first): a sorted list of k, and a scan that only
   touches the list for entries above its smallest */
static void topk_row(const float *x, int64_t V, int64_t k, int64_t *ids) {
    float val[64];
    int64_t n = 0;
    float floor_v = -INFINITY;
    int64_t i = 0;
#if TQ_AVX512
    for (; i + 16 <= V; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __mmask16 over = n < k ? (__mmask16)0xffff : _mm512_cmp_ps_mask(v, _mm512_set1_ps(floor_v), _CMP_GT_OQ);
        while (over) {
            int lane = __builtin_ctz(over);
            over &= over - 1;
            keep_top(val, ids, &n, k, &floor_v, x[i + lane], i + lane);
        }
    }
#elif TQ_AVX2
    for (; i + 8 <= V; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        unsigned over = n < k ? 0xffu
                              : (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(floor_v), _CMP_GT_OQ));
        while (over) {
            int lane = __builtin_ctz(over);
            over &= over - 1;
            keep_top(val, ids, &n, k, &floor_v, x[i + lane], i + lane);
        }
    }
#endif
    for (; i < V; i++) keep_top(val, ids, &n, k, &floor_v, x[i], i);
}

static void topk_task(void *p, int64_t t0, int64_t t1) {
    rows_args *a = p;
    for (int64_t t = t0; t < t1; t++) topk_row(a->x + t * a->ld, a->V, a->k, a->out + t * a->k);
}

int tq_argmax_rows(const float *x, int64_t T, int64_t V, int64_t ld, int64_t *out) {
    if (V < 1) return -1;
    rows_args a = {x, V, ld, 1, out};
    tq_parallel_for(argmax_task, &a, T, 4);
    return 0;
}

int tq_topk_rows(const float *x, int64_t T, int64_t V, int64_t ld, int64_t k, int64_t *out) {
    if (k < 1 || k > 64 || k > V) return -1;
    rows_args a = {x, V, ld, k, out};
    tq_parallel_for(topk_task, &a, T, 4);
    return 0;
}

/* GGUF metadata: the end of an array of ``count`` strings (u64 length + bytes each) starting at ``pos`` of a
   buffer of ``size`` bytes, or -1 when it runs past the end. A 262k-token vocabulary takes 0.3 s to walk in
   Python; models/gguf_file.py skips its arrays with this. */
int64_t tq_skip_gguf_strings(const uint8_t *buf, int64_t size, int64_t pos, int64_t count) {
    for (int64_t i = 0; i < count; i++) {
        uint64_t n;
        if (pos + 8 > size) return -1;
        memcpy(&n, buf + pos, 8);
        if (n > (uint64_t)(size - pos - 8)) return -1;
        pos += 8 + (int64_t)n;
    }
    return pos;
}
