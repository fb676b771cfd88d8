/* Matrix products for decode steps: y[r][o] = sum_i W[o][i] * x[r][i].
 *
 * The weights are read once per call whatever the number of rows (one weight row, or a
 * tile of six for more than two rows of x, stays in the L1 cache while every row of x
 * passes over it), so a step of 1 to 32 sequences costs about one read of the weights.
 *
 * Every output is the same sum in the same order whatever the number of rows and
 * whatever tile computed it: sixteen lanes of fused multiply-adds over the input, in
 * blocks of sixteen, then one fixed reduction of the lanes. A sequence's result is
 * therefore the same bits alone or in any batch. (It is not the bits of torch's own
 * kernels, which sum in another order: the difference is rounding, about 1e-7 relative.)
 *
 * Weight formats: float32, bfloat16 and float16 rows, and GGUF's Q8_0, Q4_0, Q4_1,
 * Q4_K and Q6_K blocks, dequantized in registers to exactly the float32 values that
 * gguf-py's dequantize gives (one rounding per product, in the same order: see each
 * format). Built by lime_mqtt/model/kernels.py with the machine's own compiler.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) {
    /* a fixed tree: halves, then quarters, ... */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
#else
#define LANES 16
typedef struct { float v[LANES]; } vec;
static inline vec vzero(void) { vec z; memset(&z, 0, sizeof z); return z; }
static inline vec vload(const float *p) { vec z; memcpy(z.v, p, sizeof z.v); return z; }
static inline vec vfma(vec a, vec b, vec c) {
    for (int l = 0; l < LANES; l++) c.v[l] = fmaf(a.v[l], b.v[l], c.v[l]);
    return c;
}
static inline float vsum(vec v) {
    float h[8], q[4];
    for (int l = 0; l < 8; l++) h[l] = v.v[l] + v.v[l + 8];
    for (int l = 0; l < 4; l++) q[l] = h[l] + h[l + 4];
    float a = q[0] + q[2], b = q[1] + q[3];
    return a + b;
}
#endif

/* ---- weight rows to float32, LANES values at a time ------------------------------- */

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* GGML's type numbers */
enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q6_K = 14, BF16 = 30 };

/* Dequantize one weight row of `n` values into `out` (float32, n a multiple of the
 * format's block). The formulas are gguf-py's (gguf/quants.py), product by product. */
static void row_to_f32(int fmt, const uint8_t *row, int64_t n, float *out) {
    switch (fmt) {
    case F32: memcpy(out, row, (size_t)n * 4); return;
    case BF16: { const uint16_t *p = (const uint16_t *)row; for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(p[i]); return; }
    case F16: { const uint16_t *p = (const uint16_t *)row; for (int64_t i = 0; i < n; i++) out[i] = f16_to_f32(p[i]); return; }
    case Q8_0: /* 34 bytes: f16 d, 32 int8 q; w = d * q */
        for (int64_t b = 0; b < n / 32; b++) {
            const uint8_t *blk = row + b * 34;
            uint16_t dh; memcpy(&dh, blk, 2);
            float d = f16_to_f32(dh);
            const int8_t *q = (const int8_t *)(blk + 2);
            for (int j = 0; j < 32; j++) out[b * 32 + j] = d * (float)q[j];
        }
        return;
    case Q4_0: /* 18 bytes: f16 d, 16 bytes of nibbles (low: 0-15, high: 16-31); w = d * (q - 8) */
        for (int64_t b = 0; b < n / 32; b++) {
            const uint8_t *blk = row + b * 18;
            uint16_t dh; memcpy(&dh, blk, 2);
            float d = f16_to_f32(dh);
            for (int j = 0; j < 16; j++) {
                out[b * 32 + j] = d * (float)((int)(blk[2 + j] & 0x0f) - 8);
                out[b * 32 + j + 16] = d * (float)((int)(blk[2 + j] >> 4) - 8);
            }
        }
        return;
    case Q4_1: /* 20 bytes: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m */
        for (int64_t b = 0; b < n / 32; b++) {
            const uint8_t *blk = row + b * 20;
            uint16_t dh, mh; memcpy(&dh, blk, 2); memcpy(&mh, blk + 2, 2);
            float d = f16_to_f32(dh), m = f16_to_f32(mh);
            for (int j = 0; j < 16; j++) {
                float lo = d * (float)(blk[4 + j] & 0x0f), hi = d * (float)(blk[4 + j] >> 4);
                out[b * 32 + j] = lo + m;
                out[b * 32 + j + 16] = hi + m;
            }
        }
        return;
    case Q4_K: /* 144 bytes per 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles */
        for (int64_t b = 0; b < n / 256; b++) {
            const uint8_t *blk = row + b * 144;
            uint16_t dh, mh; memcpy(&dh, blk, 2); memcpy(&mh, blk + 2, 2);
            float d = f16_to_f32(dh), dmin = f16_to_f32(mh);
            const uint8_t *s = blk + 4, *qs = blk + 16;
            uint8_t sc[8], mn[8];
            for (int j = 0; j < 4; j++) {
                sc[j] = s[j] & 0x3f;
                mn[j] = s[j + 4] & 0x3f;
                sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
                mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
            }
            for (int g = 0; g < 8; g++) {
                float dl = d * (float)sc[g], ml = dmin * (float)mn[g];
                const uint8_t *q = qs + (g / 2) * 32;
                int shift = (g % 2) * 4;
                for (int j = 0; j < 32; j++) {
                    float v = dl * (float)((q[j] >> shift) & 0x0f);
                    out[b * 256 + g * 32 + j] = v - ml;
                }
            }
        }
        return;
    case Q6_K: /* 210 bytes per 256: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, f16 d */
        for (int64_t b = 0; b < n / 256; b++) {
            const uint8_t *blk = row + b * 210;
            const uint8_t *ql = blk, *qh = blk + 128;
            const int8_t *sc = (const int8_t *)(blk + 192);
            uint16_t dh; memcpy(&dh, blk + 208, 2);
            float d = f16_to_f32(dh);
            float *o = out + b * 256;
            for (int half = 0; half < 2; half++) {
                const uint8_t *l = ql + half * 64, *h = qh + half * 32;
                for (int j = 0; j < 128; j++) {
                    /* value j of this half: which of 4 groups of 32, and its position */
                    int grp = j / 32, k = j % 32;
                    uint8_t byte = l[k + (grp & 1) * 32];
                    int low = grp >= 2 ? byte >> 4 : byte & 0x0f;
                    int high = (h[k] >> (2 * grp)) & 3;
                    int q = (low | (high << 4)) - 32;
                    float scale = d * (float)sc[half * 8 + j / 16];
                    o[half * 128 + j] = scale * (float)q;
                }
            }
        }
        return;
    }
}

/* Bytes of one weight row of `n` values. */
static int64_t row_bytes(int fmt, int64_t n) {
    switch (fmt) {
    case F32: return n * 4;
    case BF16: case F16: return n * 2;
    case Q8_0: return n / 32 * 34;
    case Q4_0: return n / 32 * 18;
    case Q4_1: return n / 32 * 20;
    case Q4_K: return n / 256 * 144;
    case Q6_K: return n / 256 * 210;
    }
    return -1;
}

/* Dot products of TO weight rows (float32, zero-padded to a multiple of LANES) with TR
 * rows of x; the same instruction sequence per output for any TO and TR. Instantiated
 * for each constant TO, TR (so that the accumulators live in registers). */
#ifndef TILE_O
#define TILE_O 6
#endif
#ifndef TILE_R
#define TILE_R 4
#endif
#define NARROW_ROWS 2 /* the default of narrow_rows */

static inline __attribute__((always_inline)) void tile(const float *const *w, const int to, const float *x,
                                                       int64_t xstride, const int tr, int64_t npad, float *y,
                                                       int64_t ystride, int64_t o0) {
    vec acc[TILE_R][TILE_O];
    for (int r = 0; r < tr; r++)
        for (int o = 0; o < to; o++) acc[r][o] = vzero();
    for (int64_t i = 0; i < npad; i += LANES) {
        vec wv[TILE_O];
        for (int o = 0; o < to; o++) wv[o] = vload(w[o] + i);
        for (int r = 0; r < tr; r++) {
            vec xv = vload(x + r * xstride + i);
            for (int o = 0; o < to; o++) acc[r][o] = vfma(wv[o], xv, acc[r][o]);
        }
    }
    for (int r = 0; r < tr; r++)
        for (int o = 0; o < to; o++) y[r * ystride + o0 + o] = vsum(acc[r][o]);
}

#define TILE_CASE(TO, TR) \
    case (TO) * 16 + (TR): tile(w, TO, x, xstride, TR, npad, y, ystride, o0); return;
#define TILE_ROW(TO) TILE_CASE(TO, 1) TILE_CASE(TO, 2) TILE_CASE(TO, 3) TILE_CASE(TO, 4)

static void tile_any(const float *const *w, int to, const float *x, int64_t xstride, int tr, int64_t npad,
                     float *y, int64_t ystride, int64_t o0) {
    switch (to * 16 + tr) {
        TILE_ROW(1) TILE_ROW(2) TILE_ROW(3) TILE_ROW(4) TILE_ROW(5) TILE_ROW(6)
    }
}

/* y[rows][out] = x[rows][n] . W[out][n]^T for W in format `fmt`, rows of `row_stride`
 * bytes (0: packed). `xpad`: rows x copied with zero padding to npad, given by the
 * caller (rows * npad floats); `scratch`: TILE_O * npad floats. Returns 0, or -1 for an
 * unknown format or a width the format's blocks do not divide. */
/* ---- a pool of threads for large products ---------------------------------------- *
 * The output rows of a product are split between the threads in whole tiles; each output
 * is still one thread's fixed-order sum, so the bits do not depend on the thread count. */

#define MAX_THREADS 64
#define PARALLEL_MIN (1 << 18) /* weights (out * n) below which one thread does it all */

typedef struct {
    int fmt;
    const uint8_t *weight;
    int64_t row_stride, out, n, npad, rows, chunk;
    const float *xpad;
    float *y;
    int threads;
} linear_job;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_owner = PTHREAD_MUTEX_INITIALIZER; /* one parallel product at a time */
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static int pool_workers = 0, pool_active = 1, pool_pending = 0;
static uint64_t pool_generation = 0;
static linear_job pool_job;
/* Up to this many rows of x, linear_range reads one weight row at a time; set once, before
 * any product, by lime_set_narrow_rows (kernels.py times both ways on the machine). */
static int narrow_rows = NARROW_ROWS;

static void linear_range(const linear_job *j, int64_t begin, int64_t end, float *scratch) {
    const float *w[TILE_O];
    /* Up to narrow_rows rows of x: one weight row at a time, so that the weights are read
     * as one plain stream (on some machines the prefetcher follows six short streams side by
     * side badly: SmolLM2's one-row products ran about 25% slower that way on one, 10% faster
     * on another). More rows: six weight rows at once, each loaded once for every row of x.
     * Either way each output is the same sum in the same order (see tile), so the bits do
     * not change. */
    const int64_t step = j->rows <= narrow_rows ? 1 : TILE_O;
    for (int64_t o0 = begin; o0 < end; o0 += step) {
        int to = end - o0 < step ? (int)(end - o0) : (int)step;
        for (int o = 0; o < to; o++) {
            const uint8_t *src = j->weight + (o0 + o) * j->row_stride;
            float *dst = scratch + o * j->npad;
            if (j->fmt == F32 && j->npad == j->n) dst = (float *)src; /* read in place */
            else {
                row_to_f32(j->fmt, src, j->n, dst);
                for (int64_t i = j->n; i < j->npad; i++) dst[i] = 0.0f;
            }
            w[o] = dst;
        }
        for (int64_t r0 = 0; r0 < j->rows; r0 += TILE_R) {
            int tr = j->rows - r0 < TILE_R ? (int)(j->rows - r0) : TILE_R;
            tile_any(w, to, j->xpad + r0 * j->npad, j->npad, tr, j->npad, j->y + r0 * j->out, j->out, o0);
        }
    }
}

static void *pool_worker(void *arg) {
    int index = (int)(intptr_t)arg; /* 1 .. pool_workers; the caller is 0 */
    uint64_t seen = 0;
    float *scratch = NULL;
    int64_t capacity = 0;
    for (;;) {
        pthread_mutex_lock(&pool_lock);
        while (pool_generation == seen) pthread_cond_wait(&pool_wake, &pool_lock);
        seen = pool_generation;
        linear_job job = pool_job;
        pthread_mutex_unlock(&pool_lock);
        if (index >= job.threads) continue;
        if (capacity < TILE_O * job.npad) {
            free(scratch);
            capacity = TILE_O * job.npad;
            scratch = malloc((size_t)capacity * sizeof(float));
        }
        int64_t begin = index * job.chunk, end = begin + job.chunk < job.out ? begin + job.chunk : job.out;
        if (begin < end && scratch) linear_range(&job, begin, end, scratch);
        pthread_mutex_lock(&pool_lock);
        if (--pool_pending == 0) pthread_cond_signal(&pool_done);
        pthread_mutex_unlock(&pool_lock);
    }
    return NULL;
}

/* Use `threads` threads (the caller's included) for large products; returns the count set. */
int lime_set_threads(int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    pthread_mutex_lock(&pool_lock);
    while (pool_workers < threads - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, pool_worker, (void *)(intptr_t)(pool_workers + 1)) != 0) break;
        pthread_detach(thread);
        pool_workers++;
    }
    pool_active = threads <= pool_workers + 1 ? threads : pool_workers + 1;
    pthread_mutex_unlock(&pool_lock);
    return pool_active;
}

/* Write back and drop [p, p + bytes) from every cache level, so that the next read of it
 * comes from memory, as a decode step's weights do (kernels.py's probe). Returns 0, or -1
 * where this machine has no such instruction for user code (the caches keep it). */
int lime_flush(const uint8_t *p, int64_t bytes) {
#if defined(__x86_64__) || defined(__i386__)
    for (int64_t i = 0; i < bytes; i += 64) __builtin_ia32_clflush(p + i);
    __builtin_ia32_mfence();
    return 0;
#elif defined(__aarch64__)
    for (int64_t i = 0; i < bytes; i += 64) __asm__ volatile("dc civac, %0" : : "r"(p + i) : "memory");
    __asm__ volatile("dsb ish" : : : "memory");
    return 0;
#else
    (void)p;
    (void)bytes;
    return -1;
#endif
}

/* Rows of x up to which products read one weight row at a time (negative: unchanged);
 * returns the value now in force. Call it before any product, not during one. */
int lime_set_narrow_rows(int rows) {
    if (rows >= 0) narrow_rows = rows;
    return narrow_rows;
}

int lime_linear(int fmt, const uint8_t *weight, int64_t row_stride, int64_t out, int64_t n,
                const float *x, int64_t rows, float *y, float *xpad, float *scratch) {
    int64_t rb = row_bytes(fmt, n);
    if (rb < 0) return -1;
    if ((fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1) && n % 32) return -1;
    if ((fmt == Q4_K || fmt == Q6_K) && n % 256) return -1;
    if (row_stride == 0) row_stride = rb;
    int64_t npad = (n + LANES - 1) / LANES * LANES;
    for (int64_t r = 0; r < rows; r++) {
        memcpy(xpad + r * npad, x + r * n, (size_t)n * 4);
        for (int64_t i = n; i < npad; i++) xpad[r * npad + i] = 0.0f;
    }
    linear_job job = {fmt, weight, row_stride, out, n, npad, rows, out, xpad, y, 1};
    int threads = out * n >= PARALLEL_MIN ? pool_active : 1;
    /* Another caller's product holds the pool (two shards on two threads): do this one alone. */
    if (threads > 1 && pthread_mutex_trylock(&pool_owner) == 0) {
        int64_t tiles = (out + TILE_O - 1) / TILE_O;
        job.chunk = (tiles + threads - 1) / threads * TILE_O;
        job.threads = threads;
        pthread_mutex_lock(&pool_lock);
        pool_job = job;
        pool_pending = threads - 1;
        pool_generation++;
        pthread_cond_broadcast(&pool_wake);
        pthread_mutex_unlock(&pool_lock);
        linear_range(&job, 0, job.chunk < out ? job.chunk : out, scratch);
        pthread_mutex_lock(&pool_lock);
        while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_lock);
        pthread_mutex_unlock(&pool_lock);
        pthread_mutex_unlock(&pool_owner);
        return 0;
    }
    linear_range(&job, 0, out, scratch);
    return 0;
}

/* Rows `index[k]` of a weight matrix of `n` columns, dequantized to float32 (embedding
 * lookups and tests). */
int lime_rows(int fmt, const uint8_t *weight, int64_t row_stride, int64_t n, const int64_t *index,
              int64_t count, float *out) {
    int64_t rb = row_bytes(fmt, n);
    if (rb < 0) return -1;
    if (row_stride == 0) row_stride = rb;
    for (int64_t k = 0; k < count; k++) row_to_f32(fmt, weight + index[k] * row_stride, n, out + k * n);
    return 0;
}

/* ---- attention, float32 --------------------------------------------------------------- */

/* q . k in a fixed order: LANES-wide fused multiply-adds when dim allows, else in turn. */
static inline float dot(const float *a, const float *b, int64_t dim) {
    if (dim % LANES == 0) {
        vec acc = vzero();
        for (int64_t d = 0; d < dim; d += LANES) acc = vfma(vload(a + d), vload(b + d), acc);
        return vsum(acc);
    }
    float s = 0.0f;
    for (int64_t d = 0; d < dim; d++) s += a[d] * b[d];
    return s;
}

/* One head of one row: softmax over keys [start, stop) of (q . k) * scale (soft-capped
 * when softcap > 0), times the values, divided by the softmax's sum at the end. k and v:
 * [positions][dim] of its kv head. */
static void attend_head(const float *qh, const float *kh, const float *vh, int64_t start, int64_t stop,
                        int64_t dim, float scale, float softcap, float *scores, float *oh) {
    float top = -INFINITY;
    for (int64_t t = start; t < stop; t++) {
        float s = dot(qh, kh + t * dim, dim) * scale;
        if (softcap > 0.0f) s = tanhf(s / softcap) * softcap;
        scores[t - start] = s;
        if (s > top) top = s;
    }
    float total = 0.0f;
    for (int64_t t = start; t < stop; t++) {
        float p = expf(scores[t - start] - top);
        scores[t - start] = p;
        total += p;
    }
    for (int64_t d = 0; d < dim; d++) oh[d] = 0.0f;
    for (int64_t t = start; t < stop; t++) {
        float p = scores[t - start];
        const float *vr = vh + t * dim;
        for (int64_t d = 0; d < dim; d++) oh[d] += p * vr[d];
    }
    float inverse = 1.0f / total;
    for (int64_t d = 0; d < dim; d++) oh[d] = oh[d] * inverse;
}

/* ---- one whole decoder layer, float32 activations ----------------------------------- */

typedef struct {
    int32_t fmt;
    int64_t stride;         /* bytes per row (0: packed) */
    const uint8_t *data;
    int64_t out, n;
    const float *bias;      /* NULL: none */
} lime_matrix;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, rot;
    float eps, scale, softcap;
    int32_t sandwich, qk_norm, act; /* act: 0 silu, 1 gelu (tanh approximation) */
    lime_matrix q, k, v, o, gate, up, down;
    const float *in_norm, *post_attn_norm, *pre_mlp_norm, *post_mlp_norm, *q_norm, *k_norm;
} lime_layer_t;

typedef struct {
    int64_t rows;
    const float *cos, *sin;      /* [rows][rot] */
    float *const *kbase, *const *vbase; /* per row: its sequence's cache, layer 0 */
    const int64_t *stride;       /* per row: positions the cache holds (capacity) */
    const int64_t *layer_elems;  /* per row: floats per layer of its cache */
    const int64_t *pos;          /* per row: its position */
} lime_step_t;

static void rms_norm_rows(const float *x, int64_t rows, int64_t n, const float *w, float eps, float *y) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += xr[i + l] * xr[i + l];
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += acc[l];
        for (; i < n; i++) sum += xr[i] * xr[i];
        float rs = 1.0f / sqrtf(sum / (float)n + eps);
        for (i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * rs);
    }
}

static int project_rows(const lime_matrix *m, const float *x, int64_t rows, float *y, float *xpad, float *scratch) {
    int status = lime_linear(m->fmt, m->data, m->stride, m->out, m->n, x, rows, y, xpad, scratch);
    if (status == 0 && m->bias)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t o = 0; o < m->out; o++) y[r * m->out + o] = y[r * m->out + o] + m->bias[o];
    return status;
}

static void rope(float *v, int64_t heads, int64_t dim, int64_t rot, const float *c, const float *s) {
    int64_t half = rot / 2;
    float tmp[1024];
    for (int64_t h = 0; h < heads; h++) {
        float *x = v + h * dim;
        for (int64_t i = 0; i < rot; i++) {
            float other = i < half ? -x[i + half] : x[i - half];
            tmp[i] = x[i] * c[i] + other * s[i];
        }
        memcpy(x, tmp, (size_t)rot * 4);
    }
}

/* x [rows][hidden] in place: norm, attention (this layer's keys and values written into
 * each row's cache at its position first), residual, norm, MLP, residual; the operations
 * of transformers' decoder layers in their order. `window`: positions a row attends to
 * (0: all). `work`: lime_layer_work() floats. */
int lime_layer(const lime_layer_t *L, const lime_step_t *S, int64_t offset, int64_t window, float *x,
               float *work) {
    int64_t R = S->rows, H = L->hidden, D = L->head_dim, QW = L->heads * D, KW = L->kv_heads * D, I = L->inter;
    if (D > 1024 || L->kv_heads <= 0 || L->heads % L->kv_heads) return -1;
    int64_t widest = (H > I ? H : I) > QW ? (H > I ? H : I) : QW;
    int64_t npad = (widest + LANES - 1) / LANES * LANES;
    float *h = work, *q = h + R * H, *k = q + R * QW, *v = k + R * KW, *att = v + R * KW, *a = att + R * QW;
    float *g = a + R * H, *u = g + R * I, *xpad = u + R * I, *scratch = xpad + R * npad, *scores = scratch + 6 * npad;
    int st = 0;
    rms_norm_rows(x, R, H, L->in_norm, L->eps, h);
    st |= project_rows(&L->q, h, R, q, xpad, scratch);
    st |= project_rows(&L->k, h, R, k, xpad, scratch);
    st |= project_rows(&L->v, h, R, v, xpad, scratch);
    if (st) return -1;
    if (L->qk_norm) {
        rms_norm_rows(q, R * L->heads, D, L->q_norm, L->eps, q);
        rms_norm_rows(k, R * L->kv_heads, D, L->k_norm, L->eps, k);
    }
    int64_t group = L->heads / L->kv_heads;
    for (int64_t r = 0; r < R; r++) {
        rope(q + r * QW, L->heads, D, L->rot, S->cos + r * L->rot, S->sin + r * L->rot);
        rope(k + r * KW, L->kv_heads, D, L->rot, S->cos + r * L->rot, S->sin + r * L->rot);
        float *kc = S->kbase[r] + offset * S->layer_elems[r], *vc = S->vbase[r] + offset * S->layer_elems[r];
        for (int64_t j = 0; j < L->kv_heads; j++) {
            memcpy(kc + (j * S->stride[r] + S->pos[r]) * D, k + r * KW + j * D, (size_t)D * 4);
            memcpy(vc + (j * S->stride[r] + S->pos[r]) * D, v + r * KW + j * D, (size_t)D * 4);
        }
    }
    for (int64_t r = 0; r < R; r++) {
        const float *kc = S->kbase[r] + offset * S->layer_elems[r], *vc = S->vbase[r] + offset * S->layer_elems[r];
        int64_t stop = S->pos[r] + 1, start = window > 0 && stop > window ? stop - window : 0;
        for (int64_t hh = 0; hh < L->heads; hh++) {
            const float *qh = q + r * QW + hh * D;
            const float *kh = kc + (hh / group) * S->stride[r] * D, *vh = vc + (hh / group) * S->stride[r] * D;
            attend_head(qh, kh, vh, start, stop, D, L->scale, L->softcap, scores, att + r * QW + hh * D);
        }
    }
    if (project_rows(&L->o, att, R, a, xpad, scratch)) return -1;
    if (L->sandwich) rms_norm_rows(a, R, H, L->post_attn_norm, L->eps, a);
    for (int64_t i = 0; i < R * H; i++) x[i] = x[i] + a[i];
    rms_norm_rows(x, R, H, L->sandwich ? L->pre_mlp_norm : L->post_attn_norm, L->eps, h);
    st |= project_rows(&L->gate, h, R, g, xpad, scratch);
    st |= project_rows(&L->up, h, R, u, xpad, scratch);
    if (st) return -1;
    for (int64_t i = 0; i < R * I; i++) {
        float z = g[i], act;
        if (L->act == 1) act = 0.5f * z * (1.0f + tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z)));
        else act = z / (1.0f + expf(-z));
        g[i] = act * u[i];
    }
    if (project_rows(&L->down, g, R, a, xpad, scratch)) return -1;
    if (L->sandwich) rms_norm_rows(a, R, H, L->post_mlp_norm, L->eps, a);
    for (int64_t i = 0; i < R * H; i++) x[i] = x[i] + a[i];
    return 0;
}

/* A shard's layers one after another on the same x, in one call from Python: layer i (its
 * offset in the shard) is lime_layer(layers[i], steps[i], i, windows[i], x, works[i]). A
 * call from Python costs tens of microseconds once a layer's weights have streamed through
 * the caches, and a shard makes one per step instead of one per layer. 0, or -1 - i when
 * layer i refuses. */
int lime_layers(int64_t n, const lime_layer_t *const *layers, const lime_step_t *const *steps,
                const int64_t *windows, float *x, float *const *works) {
    for (int64_t i = 0; i < n; i++)
        if (lime_layer(layers[i], steps[i], i, windows[i], x, works[i]) != 0) return (int)(-1 - i);
    return 0;
}

/* The model's final RMS norm of `rows` rows of x (n wide) into y (x itself allowed): the
 * arithmetic of the layers' own norms. */
int lime_rms_norm(const float *x, int64_t rows, int64_t n, const float *w, float eps, float *y) {
    rms_norm_rows(x, rows, n, w, eps, y);
    return 0;
}

/* Floats of `work` lime_layer needs for `rows` rows and contexts up to `longest`. */
int64_t lime_layer_work(const lime_layer_t *L, int64_t rows, int64_t longest) {
    int64_t H = L->hidden, QW = L->heads * L->head_dim, KW = L->kv_heads * L->head_dim, I = L->inter;
    int64_t widest = (H > I ? H : I) > QW ? (H > I ? H : I) : QW;
    int64_t npad = (widest + LANES - 1) / LANES * LANES;
    return rows * (2 * H + 2 * QW + 2 * KW + 2 * I + npad) + 6 * npad + longest + 64;
}
