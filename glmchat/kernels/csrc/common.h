/* What gemv.c (AVX-512) and gemv_avx2.c (AVX2) share: bf16 rounding, the weight stream's prefetch,
 * x in 8 bits per group (see gemv.c for the layouts), and int8's blocking, which needs no vector code. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The integer products (gemm_q8 in gemv.c and gemv_avx2.c) hand their blocks of 64 weight rows
 * out 4 at a time to whichever thread is free, not in equal halves: the two cores of this VM read
 * memory at different rates (a plain read, per product: 10.8-13.7 GB/s on the first, 7.2-12.2 on the
 * second, slower in each of the 12 timed), and with equal halves the faster one waited 0.18-0.36 ms
 * on average at the end of every product. Xeon, 2 threads, in turns: full-size int4 decode in one
 * process swapping the libraries 1.02-1.11x as fast over 8 pairs (medians 1.03x and 1.04x); int4
 * decode products from memory 1.05-1.10x (blocks handed out 1, 2 or 4 at a time), gemv_avx2.c's
 * 1.05-1.08x; int8 decode 0.91-1.03x (4 pairs, median 1.01x). The bf16 decode product (gemv_bf16.h)
 * keeps equal halves: the same change gave 0.92-1.02x there (4 pairs). */

/* Software prefetch of the weight streams, into L2 (T1): ~1.4x faster from DRAM than without it.
 * PF_DIST bytes ahead. 2048 on a Xeon with AMX (2 threads, in turns): one-row decode products of 8
 * full-size layers from memory took 0.94-0.96x the time (int4) and 0.92-0.94x (int8) of 4096's,
 * bf16 0.97x, but full-size int4 decode in one process swapping the two libraries ran at 0.98x
 * (median of 4 pairs, 7.67 against 7.84 tok/s), so 4096 stays.
 * Into L2 rather than L1: measured on an AMD EPYC (2 threads, 16 layer products in turns with the
 * alternatives, median time, three runs) bf16 0.79-0.88x and int4 0.95-0.98x the time with T0.
 * One row of x over blocked int4 codes was then one sequential stream per thread (four since
 * 2026-12-08, see gemv.c's int4_one_row_blocks: not measured on AMD since), which an AMD EPYC's
 * own prefetchers follow at the speed one row consumes it: 113 full-size layer products took
 * 0.85-0.88x the time without it when the host's memory was fast, 0.98x when it was slow (2 threads,
 * median of 20-50 ratios to the prefetching kernel run just before and after; with 4 or 8 rows,
 * 1.34x and 1.42x without it), but a Xeon's with AMX not (24 full-size layer products, 0.61 GB of
 * codes, 0.88-0.91x the time with it): gemv.c's INT4_ONE_ROW_PREFETCH, set per CPU vendor by
 * glmchat.kernels.cpu (other vendors' CPUs take the prefetch, unmeasured). */
#ifndef PF_DIST
#define PF_DIST 4096
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PF_DIST, PF_HINT)

#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) /* round to nearest even, like torch */
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

INLINE void store(uint16_t *y, const uint16_t *bias, int64_t n, float v)
{
    y[n] = f32_to_bf16(bias ? v + bf16_to_f32(bias[n]) : v);
}

#define Q8_GROUP 128 /* int8: x's quantization group */

typedef struct {
    const int8_t *xq;    /* [groups, rows, G]: group-major, so that a panel's rows of x lie together;
                            rows: M, or M rounded up to whole tiles (AMX's), the extra rows zeros */
    const float *xs;     /* [M, groups]: the group's scale */
    const float *xz;     /* [M, groups]: xs * the sum of xq over the group (what the zeros multiply) */
    int64_t M, K, G, groups, rows;
} q8_x;

INLINE const int8_t *xq_row(const q8_x *X, int64_t g, int64_t m) /* row m of x in group g */
{
    return X->xq + (g * X->rows + m) * X->G;
}

typedef int (*quantize_x8_fn)(const uint16_t *x, q8_x *X, int8_t *xq, float *xs, float *xz, int nthreads);

/* X for the product of M rows of x with an int8 or int4 weight [N, K] in groups of G columns, x
 * quantized by each source's `quantize` into *mem (the caller frees it), its rows laid out in
 * whole tiles of `tile` rows: 0; -2 for a shape the kernels do not take, -1 without memory, -3
 * when x holds an inf or NaN (then nothing to free). */
static int q8_prepare(const uint16_t *x, int64_t M, int64_t N, int64_t K, int64_t G, int int8, int64_t tile,
                      quantize_x8_fn quantize, int nthreads, q8_x *X, char **mem)
{
    if (G % 4 || G > 128 || (!int8 && (K % G || N % 64)))
        return -2;
    *X = (q8_x){.M = M, .K = K, .G = G, .groups = (K + G - 1) / G, .rows = (M + tile - 1) / tile * tile};
    const int64_t padded = X->groups * G * X->rows;
    *mem = malloc((size_t)(padded + 8 * M * X->groups));
    if (!*mem)
        return -1;
    if (quantize(x, X, (int8_t *)*mem, (float *)(*mem + padded), (float *)(*mem + padded + 4 * M * X->groups),
                 nthreads)) {
        free(*mem);
        return -3;
    }
    for (int64_t g = 0; g < X->groups && X->rows > M; g++)
        memset((int8_t *)xq_row(X, g, M), 0, (size_t)((X->rows - M) * G));
    return 0;
}

/* int8 codes q[N, K] row-major into the blocked layout the products read (see the top of gemv.c). */
void glm_block_int8(const int8_t *q, uint8_t *blocked, int64_t N, int64_t K, int nthreads)
{
    const int64_t steps = (K + 3) / 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < (N + 63) / 64; b++)
        for (int64_t t0 = 0; t0 < steps; t0 += 16) { /* 64 rows x 64 columns at a time: whole cache lines */
            uint32_t *out = (uint32_t *)blocked + (b * steps + t0) * 64;
            const int64_t n = t0 + 16 <= steps ? 16 : steps - t0;
            for (int64_t r = 0; r < 64; r++) {
                const int8_t *row = q + (64 * b + r) * K + 4 * t0;
                if (64 * b + r < N && 4 * (t0 + n) <= K)
                    for (int64_t t = 0; t < n; t++) {
                        uint32_t word;
                        memcpy(&word, row + 4 * t, 4);
                        out[t * 64 + r] = word ^ 0x80808080u;
                    }
                else /* past N or at a ragged end of K: 0 codes (128 stored) where there is no weight */
                    for (int64_t t = 0; t < n; t++) {
                        uint8_t word[4] = {128, 128, 128, 128};
                        for (int64_t j = 0; j < 4 && 64 * b + r < N && 4 * (t0 + t) + j < K; j++)
                            word[j] = (uint8_t)(row[4 * t + j] ^ 0x80);
                        memcpy(out + t * 64 + r, word, 4);
                    }
            }
        }
}

/* ------------------------------------------------------------------------------------------ */
INLINE float round_bf16(float v) /* v rounded to bf16, as a float */
{
    return bf16_to_f32(f32_to_bf16(v));
}

/* One token per row: the fused projection qkv [B, (H + 2G) * D] split into heads, q [B, H, D] and
 * k [B, G, D] with rotary positions on their first `rot` channels in interleaved pairs, v [B, G, D]
 * copied; rope [B, rot / 2, 2] (cos, sin). As PyTorch computes it in bf16: each product and each
 * sum rounded to bf16 (products of two bf16 values are exact in float, so the results are the
 * same bits). */
int glm_rotary_heads(const uint16_t *qkv, const uint16_t *rope, uint16_t *q, uint16_t *k, uint16_t *v, int64_t B,
                     int64_t H, int64_t G, int64_t D, int64_t rot)
{
    if (rot % 2 || rot > D)
        return -2;
    const int64_t width = (H + 2 * G) * D;
    for (int64_t b = 0; b < B; b++) {
        const uint16_t *in = qkv + b * width, *cs = rope + b * rot;
        for (int64_t h = 0; h < H + G; h++) {
            const uint16_t *x = in + h * D;
            uint16_t *out = h < H ? q + (b * H + h) * D : k + (b * G + h - H) * D;
            for (int64_t j = 0; j < rot / 2; j++) {
                float x0 = bf16_to_f32(x[2 * j]), x1 = bf16_to_f32(x[2 * j + 1]);
                float c = bf16_to_f32(cs[2 * j]), s = bf16_to_f32(cs[2 * j + 1]);
                out[2 * j] = f32_to_bf16(round_bf16(x0 * c) - round_bf16(x1 * s));
                out[2 * j + 1] = f32_to_bf16(round_bf16(x1 * c) + round_bf16(x0 * s));
            }
            memcpy(out + rot, x + rot, (size_t)(D - rot) * 2);
        }
        memcpy(v + b * G * D, in + (H + G) * D, (size_t)(G * D) * 2);
    }
    return 0;
}
