/* Matrix products on x86-64 CPUs with AVX-512 (F, BW, BF16, VBMI, VNNI): glm_gemv_bf16 for bf16
 * decode steps (a few rows), glm_gemm_int8 and glm_gemm_int4 for every int8 and int4 product,
 * decode steps and prompts alike (with AMX's integer tiles from 6 rows of x on, where the CPU
 * and the compiler have them).
 *
 * Every kernel computes y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for rows x[m], with x, y and
 * bias in bf16 and float32 sums (int8/int4: exact int32 sums per group of columns over x in 8 bits
 * per group, see there). Each row goes through the same instructions
 * whatever the other rows are, so a row's result does not depend on how many rows share the call
 * (the server's batch invariance).
 * W is one of:
 *   bf16  w[N, K] row-major.
 *   int8  blocked codes c[ceil(N/64), ceil(K/4), 64, 4] uint8 (glmchat.kernels.cpu.block_int8),
 *         c[b, t, r, j] = q[64b + r, 4t + j] + 128 (128 past N or K), scales s[N] bf16:
 *         W[n, k] = q[n, k] * s[n]. A vector of 64 bytes holds 4 columns of 16 rows, the operand
 *         the integer products take, so the codes stream from memory straight into them.
 *   int4  blocked codes c[N/64, K/4, 128] uint8 (glmchat.kernels.cpu.block_int4, from PyTorch's CPU
 *         int4 layout): byte (b, t, 64i + 4j + c), i < 2, j < 16, c < 4, holds in its low nibble
 *         the code q of row 64b+16i+j at column 4t+c and in its high nibble that of row
 *         64b+32+16i+j. Blocked scales sz[N/64, K/G, 64, 2] bf16 (glmchat.kernels.cpu.block_int4_scales)
 *         hold (scale, zero) of row 64b+r for group g of G columns at sz[b, g, r]:
 *         W[n, k] = (q - 8) * scale + zero. Each 64 bytes hold 4 columns of 16 rows per lane in
 *         both nibbles, the operand of the integer products once the nibbles are apart; a block's
 *         scales lie together, in the order its groups are read.
 * Weight rows are split into tiles (4 or 8 rows for the bf16 kernel, 64-row blocks for the others);
 * OpenMP threads take contiguous ranges of tiles, so each thread streams through one stretch of the
 * weights once, the rows of x taking turns on each tile while it is in cache.
 */
#include "common.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512BF16__) || !defined(__AVX512VBMI__) || \
    !defined(__AVX512VNNI__)
#error "these kernels need AVX-512 F/BW/BF16/VBMI/VNNI"
#endif

#define TILE 3 /* bf16: weight rows per tile (x is loaded once for all of them), XROWS x TILE sums */
#define TILE1 8 /* bf16 with one row of x: 113 full-size layer products took 260-265 ms against 277-293
                   with TILE (EPYC, 2 threads, in turns); 8 rows of x over 8 weight rows spill registers */

/* ------------------------------------------------------------------------------------------ */
/* bf16: vdpbf16ps multiplies 32 bf16 pairs into 16 float sums per instruction. */

/* bf16: rows of x per pass over a tile; each has its own accumulators. 8 rows over tiles of 3 weight
 * rows (24 accumulators) against 4 over 4: the products of 4 full-size layers took 0.81-0.86x the
 * time with 8 rows of x (two runs), 0.92x with 16, 0.97x with 4 and the same with 2 (Xeon with AMX, 2
 * threads, in turns; 2 over 6, 4 over 5 or 6, 6 over 4 and 8 over 2 between the two). */
#define XROWS 8

/* out[m][r] = x row m . weight row r, for m < R (<= XROWS) rows of x at x (stride K) and the
 * `rows` weight rows at w. Each (m, r) sum takes the same instructions in the same order whatever
 * R and rows are, so a row's result never depends on the rows computed beside it. */
INLINE void bf16_tile(const uint16_t *x, int R, const uint16_t *w, int64_t K, int rows, float out[XROWS][TILE1])
{
    __m512 acc[XROWS][TILE1];
    for (int m = 0; m < R; m++)
        for (int r = 0; r < rows; r++)
            acc[m][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[TILE1];
        for (int r = 0; r < rows; r++) {
            PREFETCH(w + r * K + k);
            wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
        }
        for (int m = 0; m < R; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
            for (int r = 0; r < rows; r++)
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
        }
    }
    if (k < K) { /* masked loads read zeros past the end */
        __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
        for (int m = 0; m < R; m++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
            for (int r = 0; r < rows; r++)
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k), xv);
        }
    }
    for (int m = 0; m < R; m++)
        for (int r = 0; r < rows; r++)
            out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

#include "gemv_bf16.h"

/* ------------------------------------------------------------------------------------------ */
/* bf16 to float, 16 at a time, and the mask of a row's last, partial vector. */

INLINE __m512 bf16x16_to_ps(__m256i h)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INLINE __m512 load16_bf16(const uint16_t *x)
{
    return bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)x));
}

INLINE __m512 maskz_load16_bf16(__mmask16 mask, const uint16_t *x) /* zeros where mask is clear */
{
    return bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, x));
}

INLINE __mmask16 first16(int64_t left) /* the first min(left, 16) lanes */
{
    return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
}

/* ------------------------------------------------------------------------------------------ */
/* int8 and int4 products: integer products over x in 8 bits, tile by tile.
 * Each row of x is quantized per group of G columns, x[k] ~ xs[g] * xq[k] with xq int8 (round to
 * nearest, the group's largest |x| maps to 127), like llama.cpp's q8 activations: one integer
 * product per weight and row.
 * The weights are never dequantized as a whole: for one 64-row block and one group of columns at
 * a time, their codes are taken as unsigned bytes (c = q for int4, q + 128 for int8; W = c * s + z
 * per row and group), 4 columns of 16 rows per vector, which stay in L1 while every row of x, 4 at
 * a time, multiplies them with vpdpbusd (4 u8 x s8 products per lane). int8 codes are stored that
 * way (blocked); int4 codes two per byte in that order (blocked), unpacked into a panel:
 *   y[m, n] += xs * (s[n] * sum c xq + z[n] * sum xq)    (exact int32 sums, float per group).
 * Each row of x takes the same instructions whatever the other rows are, so its result does not
 * depend on how many rows share the call. int4 with up to DIRECT_ROWS rows (decode steps) unpacks
 * the codes in registers as they stream from memory rather than into a panel: the same integer
 * sums and float epilogue, so the same results. */

#define QROWS 4 /* rows of x per pass over a panel: 16 int32 accumulators */
#ifndef INT4_ONE_ROW_PREFETCH
#define INT4_ONE_ROW_PREFETCH 1 /* see glmchat.kernels.cpu.DEFINES and PF_DIST */
#endif
#ifndef DIRECT_ROWS
#define DIRECT_ROWS 48 /* int4 up to this many rows: codes unpacked in registers per pass of 4 rows, no panel.
                           113 full-size layer products, in turns, best of 3: 20-48 rows 0.74-0.96x the panel's
                           time, 64 level, 128 the panel ahead (EPYC, 2 threads) */
#endif


typedef struct {                 /* int4: one 64-row block, one group of columns */
    __m512i c[128 / 4 * 4];      /* [steps][4]: vector v holds rows 16v..16v+15, 4 columns per lane */
    float s[64], z[64];
} panel;

/* x's rows in 8 bits per group (the last group may be shorter, padded with zeros; lengths multiples
 * of 4). -1 when x holds an inf or NaN. */
static int quantize_x8(const uint16_t *x, q8_x *X, int8_t *xq, float *xs, float *xz, int nthreads)
{
    const int64_t M = X->M, K = X->K, G = X->G, groups = X->groups;
    int bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : bad) if (M > 1)
    for (int64_t m = 0; m < M; m++) {
        const __m512 inf = _mm512_set1_ps(__builtin_inff());
        for (int64_t g = 0; g < groups && !bad; g++) {
            int64_t k0 = g * G, end = k0 + G < K ? k0 + G : K;
            int8_t *out = xq + (g * X->rows + m) * G - k0;
            __m512 top = _mm512_setzero_ps();
            for (int64_t k = k0; k < end; k += 16) {
                __mmask16 mask = first16(end - k);
                __m512 a = _mm512_abs_ps(maskz_load16_bf16(mask, x + m * K + k));
                bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ) != 0;
                top = _mm512_max_ps(top, a);
            }
            float big = _mm512_reduce_max_ps(top);
            const __m512 inv = _mm512_set1_ps(big > 0 ? 127.0f / big : 1.0f);
            __m512i sum = _mm512_setzero_si512();
            memset(out + end, 0, (size_t)(k0 + G - end));
            for (int64_t k = k0; k < end; k += 16) {
                __mmask16 mask = first16(end - k);
                __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(maskz_load16_bf16(mask, x + m * K + k), inv));
                _mm_mask_storeu_epi8(out + k, mask, _mm512_cvtepi32_epi8(v));
                sum = _mm512_add_epi32(sum, v);
            }
            xs[m * groups + g] = big > 0 ? big / 127.0f : 1.0f;
            xz[m * groups + g] = xs[m * groups + g] * (float)_mm512_reduce_add_epi32(sum);
        }
    }
    X->xq = xq, X->xs = xs, X->xz = xz;
    return bad ? -1 : 0;
}

/* o plus what one group adds to 16 outputs of a row from their integer sums acc: xs * (s * acc +
 * z * sum xq), with xz = xs * sum xq. The one float step of every path (int8, int4 of any row
 * count), so that a row's result never depends on the path it took. */
INLINE __m512 q8_group_step(__m512 o, __m512i acc, __m512 s, __m512 z, __m512 xs, __m512 xz)
{
    o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(s, xs), o);
    return _mm512_fmadd_ps(z, xz, o);
}

/* out[m] += what group g adds to rows m0+m of y, from the integer sums acc[m][v] of rows 16v.. of the
 * block (q8_group_step, the sums kept in out between groups). */
INLINE void q8_add_group(const q8_x *X, const float *s, const float *z, int64_t g, int64_t m0, int R,
                         __m512i acc[QROWS][4], float (*out)[64])
{
    for (int m = 0; m < R; m++) {
        int64_t i = (m0 + m) * X->groups + g;
        const __m512 xs = _mm512_set1_ps(X->xs[i]), xz = _mm512_set1_ps(X->xz[i]);
        for (int v = 0; v < 4; v++) {
            __m512 o = q8_group_step(_mm512_loadu_ps(out[m] + 16 * v), acc[m][v], _mm512_loadu_ps(s + 16 * v),
                                     _mm512_loadu_ps(z + 16 * v), xs, xz);
            _mm512_storeu_ps(out[m] + 16 * v, o);
        }
    }
}

/* Rows m0..m0+R-1 of x times the codes c of group g of a block (steps of 4 columns, 4 vectors each:
 * a panel, or int8's blocked codes, which `stream` prefetches from memory), added into out[m][64]. */
INLINE void q8_rows(const q8_x *X, const __m512i *codes, const float *s, const float *z, int64_t g, int64_t steps,
                    int64_t m0, int R, int stream, float (*out)[64])
{
    __m512i acc[QROWS][4];
    for (int m = 0; m < R; m++)
        for (int v = 0; v < 4; v++)
            acc[m][v] = _mm512_setzero_si512();
    const int8_t *x0 = xq_row(X, g, m0);
    for (int64_t t = 0; t < steps; t++) {
        const __m512i *c = codes + 4 * t;
        if (stream)
            for (int v = 0; v < 4; v++)
                PREFETCH(c + v);
        for (int m = 0; m < R; m++) {
            __m512i x4 = _mm512_set1_epi32(*(const int32_t *)(x0 + m * X->G + 4 * t));
            for (int v = 0; v < 4; v++)
                acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], _mm512_loadu_si512(c + v), x4);
        }
    }
    q8_add_group(X, s, z, g, m0, R, acc, out);
}

/* Every row of x times the codes of group g of a block, 4 rows at a time, then one by one; the
 * first pass streams int8's codes from memory, the later ones find them in L1. */
static void q8_group(const q8_x *X, const __m512i *codes, const float *s, const float *z, int64_t g, int64_t steps,
                     int stream, float (*out)[64])
{
    int64_t m0 = 0;
    for (; m0 + QROWS <= X->M; m0 += QROWS)
        q8_rows(X, codes, s, z, g, steps, m0, QROWS, stream && m0 == 0, out + m0);
    for (; m0 < X->M; m0++)
        q8_rows(X, codes, s, z, g, steps, m0, 1, stream && m0 == 0, out + m0);
}

/* The 4 code vectors (vector v: rows 16v..16v+15) of the 4 int4 columns whose 128 blocked bytes are
 * at p: low nibbles rows 16i+j, high nibbles rows 32+16i+j. */
INLINE void int4_codes(const uint8_t *p, __m512i c[4])
{
    const __m512i low4 = _mm512_set1_epi8(15);
    for (int i = 0; i < 2; i++) {
        __m512i bytes = _mm512_loadu_si512(p + 64 * i);
        c[i] = _mm512_and_si512(bytes, low4);
        c[2 + i] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
    }
}

/* Scale s and zero z of rows 16v..16v+15 of a block in group g, from the block's scales at sz:
 * W = (c - 8) * scale + zero = c * s + z. */
INLINE void int4_scale16(const uint16_t *sz, int64_t g, int v, __m512 *s, __m512 *z)
{
    __m512i pair = _mm512_loadu_si512(sz + (g * 64 + 16 * v) * 2);
    *s = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
    *z = _mm512_fmadd_ps(*s, _mm512_set1_ps(-8.0f), _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xffff0000u))));
}

INLINE void int4_scales(const uint16_t *sz, int64_t g, float *s, float *z)
{
    for (int v = 0; v < 4; v++) {
        __m512 scale, zero;
        int4_scale16(sz, g, v, &scale, &zero);
        _mm512_storeu_ps(s + 16 * v, scale);
        _mm512_storeu_ps(z + 16 * v, zero);
    }
}

/* A few rows (decode steps): the integer sums acc[m][v] (rows 16v.. of the block) of rows m0..m0+R-1
 * of x times int4 block `block`, group g, the codes unpacked in registers as they stream from memory
 * instead of into a panel. The same sums as a panel's: lanes multiply whole bytes (16 hi + lo) and
 * low nibbles, and the high nibbles' sums are their difference / 16, exactly, without shifting the
 * high nibbles out. */
INLINE void int4_direct_sums(const q8_x *X, const uint8_t *block, int64_t g, int64_t m0, int R,
                             __m512i acc[QROWS][4])
{
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512i whole[QROWS][2], low[QROWS][2];
    for (int m = 0; m < R; m++)
        for (int i = 0; i < 2; i++)
            whole[m][i] = low[m][i] = _mm512_setzero_si512();
    const int8_t *x0 = xq_row(X, g, m0);
    for (int64_t k = g * X->G, s4 = 0; k < (g + 1) * X->G; k += 4, s4 += 4) {
        if (R > 1 || INT4_ONE_ROW_PREFETCH) { /* see PF_DIST */
            PREFETCH(block + k * 32);
            PREFETCH(block + k * 32 + 64);
        }
        __m512i bytes[2], lo[2];
        for (int i = 0; i < 2; i++) {
            bytes[i] = _mm512_loadu_si512(block + k * 32 + 64 * i);
            lo[i] = _mm512_and_si512(bytes[i], low4);
        }
        for (int m = 0; m < R; m++) {
            __m512i x4 = _mm512_set1_epi32(*(const int32_t *)(x0 + m * X->G + s4));
            for (int i = 0; i < 2; i++) {
                whole[m][i] = _mm512_dpbusd_epi32(whole[m][i], bytes[i], x4);
                low[m][i] = _mm512_dpbusd_epi32(low[m][i], lo[i], x4);
            }
        }
    }
    for (int m = 0; m < R; m++)
        for (int i = 0; i < 2; i++) {
            acc[m][i] = low[m][i];
            acc[m][2 + i] = _mm512_srai_epi32(_mm512_sub_epi32(whole[m][i], low[m][i]), 4);
        }
}

INLINE void int4_direct_rows(const q8_x *X, const uint8_t *block, const float *s, const float *z, int64_t g,
                             int64_t m0, int R, float (*out)[64])
{
    __m512i acc[QROWS][4];
    int4_direct_sums(X, block, g, m0, R, acc);
    q8_add_group(X, s, z, g, m0, R, acc, out);
}

/* Every row of x times int4 block b, group g, unpacking in registers: 4 rows at a time, then the
 * rest, in constant counts (with a run-time count the accumulators would live on the stack). */
static void int4_direct_group(const q8_x *X, const uint8_t *block, const float *s, const float *z, int64_t g,
                              float (*out)[64])
{
    int64_t m0 = 0, M = X->M;
    for (; m0 + QROWS <= M; m0 += QROWS)
        int4_direct_rows(X, block, s, z, g, m0, QROWS, out + m0);
    if (M - m0 == 3)
        int4_direct_rows(X, block, s, z, g, m0, 3, out + m0);
    else if (M - m0 == 2)
        int4_direct_rows(X, block, s, z, g, m0, 2, out + m0);
    else if (M - m0 == 1)
        int4_direct_rows(X, block, s, z, g, m0, 1, out + m0);
}

/* One row of x (a decode step alone) over n <= ONE_ROW_STREAMS consecutive whole blocks at once.
 * Each step of 4 columns reads all n blocks before the next step: n weight streams per thread, and
 * n times the independent integer sums to hide vpdpbusd's latency behind. Integer sums are exact,
 * so the order does not change them, and the float steps per group are q8_group_step's: the same
 * results as int4_direct_rows and q8_rows. The 112 one-row products of 28 full-size layers from
 * memory (Xeon with AMX, 2 threads, in turns, medians of 8-12) read at 0.90-0.93 of B (int4) and
 * 0.98 (int8) against 0.78-0.80 and 0.84 for two blocks one after the other within each group;
 * interleaved by step, 2 blocks gave 0.86, 4 0.88-0.92, 6 and 8 0.87; the prefetch of int4's scales
 * two groups ahead 0.90-0.94 against 0.89-0.92 without. A plain read of the same bytes in the same
 * order reaches 1.07-1.15 of B. */
#ifndef ONE_ROW_STREAMS
#define ONE_ROW_STREAMS 4
#endif
/* Into L1, 2 KB ahead: 0.97-0.98x the time of PREFETCH's (L2, 4 KB ahead) here, two runs */
#define ONE_ROW_PREFETCH(p) _mm_prefetch((const char *)(p) + 2048, _MM_HINT_T0)

static void int4_one_row_blocks(const q8_x *X, const uint8_t *first, const uint16_t *sz, int64_t K, int64_t n,
                                float (*out)[64])
{
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512 o[ONE_ROW_STREAMS][4];
    for (int s = 0; s < ONE_ROW_STREAMS; s++)
        for (int v = 0; v < 4; v++)
            o[s][v] = _mm512_setzero_ps();
    for (int64_t g = 0; g < X->groups; g++) {
        __m512i whole[ONE_ROW_STREAMS][2], low[ONE_ROW_STREAMS][2]; /* see int4_direct_sums */
        for (int s = 0; s < ONE_ROW_STREAMS; s++) {
            for (int i = 0; i < 2; i++)
                whole[s][i] = low[s][i] = _mm512_setzero_si512();
            if (s < n)
                for (int line = 0; line < 4; line++)
                    _mm_prefetch((const char *)(sz + s * X->groups * 128 + (g + 2) * 128) + 64 * line, _MM_HINT_T0);
        }
        const int8_t *x0 = xq_row(X, g, 0);
        for (int64_t k = g * X->G, s4 = 0; k < (g + 1) * X->G; k += 4, s4 += 4) {
            const __m512i x4 = _mm512_set1_epi32(*(const int32_t *)(x0 + s4));
            for (int s = 0; s < ONE_ROW_STREAMS && s < n; s++) {
                const uint8_t *p = first + (s * K + k) * 32;
                if (INT4_ONE_ROW_PREFETCH) {
                    ONE_ROW_PREFETCH(p);
                    ONE_ROW_PREFETCH(p + 64);
                }
                for (int i = 0; i < 2; i++) {
                    __m512i bytes = _mm512_loadu_si512(p + 64 * i);
                    whole[s][i] = _mm512_dpbusd_epi32(whole[s][i], bytes, x4);
                    low[s][i] = _mm512_dpbusd_epi32(low[s][i], _mm512_and_si512(bytes, low4), x4);
                }
            }
        }
        const __m512 xs = _mm512_set1_ps(X->xs[g]), xz = _mm512_set1_ps(X->xz[g]);
        for (int s = 0; s < ONE_ROW_STREAMS && s < n; s++)
            for (int v = 0; v < 4; v++) {
                __m512i acc = v < 2 ? low[s][v] : _mm512_srai_epi32(_mm512_sub_epi32(whole[s][v - 2], low[s][v - 2]), 4);
                __m512 scale, zero;
                int4_scale16(sz + s * X->groups * 128, g, v, &scale, &zero);
                o[s][v] = q8_group_step(o[s][v], acc, scale, zero, xs, xz);
            }
    }
    for (int s = 0; s < n; s++)
        for (int v = 0; v < 4; v++)
            _mm512_storeu_ps(out[s] + 16 * v, o[s][v]);
}

/* The int4 codes of block b, group g into a panel, with the block's scales sz. */
static void int4_panel(const uint8_t *blocked, const uint16_t *sz, int64_t K, int64_t G, int64_t b, int64_t g,
                       panel *P)
{
    for (int64_t s = 0; s < G / 4; s++) {
        const uint8_t *p = blocked + (b * K + g * G + 4 * s) * 32;
        PREFETCH(p);
        PREFETCH(p + 64);
        int4_codes(p, P->c + 4 * s);
    }
    int4_scales(sz, g, P->s, P->z);
}

/* int8's blocked codes of one group (steps of 4 columns) copied into a panel for AMX, prefetched as
 * they stream: the tile loads then read them from L1. Loaded into the tiles straight from memory,
 * the products of full-size layers took 1.14x the time with 16 rows of x, 1.07x with 64 and 1.03x
 * with 256 (12 or 28 layers, Xeon, 2 threads, in turns). */
static void int8_panel(const uint8_t *codes, int64_t steps, panel *P)
{
    for (int64_t t = 0; t < 4 * steps; t++) {
        PREFETCH(codes + 64 * t);
        P->c[t] = _mm512_loadu_si512(codes + 64 * t);
    }
}

/* Steps of 4 columns in group g (the last group of K may be short). */
INLINE int64_t group_steps(const q8_x *X, int64_t g)
{
    return ((g + 1) * X->G < X->K ? X->G : X->K - g * X->G + 3) / 4;
}

/* Scales s and zeros z of int8 block b: W = (c - 128) * scale; rows past N get 0. */
static void int8_scales(const uint16_t *scales, int64_t N, int64_t b, float *s, float *z)
{
    for (int64_t j = 0; j < 64; j++) {
        s[j] = 64 * b + j < N ? bf16_to_f32(scales[64 * b + j]) : 0.0f;
        z[j] = -128 * s[j];
    }
}

/* int8's one row of x over n <= ONE_ROW_STREAMS consecutive blocks b.. at once, as
 * int4_one_row_blocks: each step of 4 columns reads all n blocks. */
static void int8_one_row_blocks(const q8_x *X, const uint8_t *q, const uint16_t *scales, int64_t N, int64_t b,
                                int64_t n, float (*out)[64])
{
    float s[ONE_ROW_STREAMS][64], z[ONE_ROW_STREAMS][64];
    __m512 o[ONE_ROW_STREAMS][4];
    const int64_t steps_k = (X->K + 3) / 4;
    for (int64_t i = 0; i < n; i++) {
        int8_scales(scales, N, b + i, s[i], z[i]);
        for (int v = 0; v < 4; v++)
            o[i][v] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < X->groups; g++) {
        const int64_t steps = group_steps(X, g);
        __m512i acc[ONE_ROW_STREAMS][4];
        for (int i = 0; i < ONE_ROW_STREAMS; i++)
            for (int v = 0; v < 4; v++)
                acc[i][v] = _mm512_setzero_si512();
        const int8_t *x0 = xq_row(X, g, 0);
        const __m512i *codes = (const __m512i *)(q + (b * steps_k + g * X->G / 4) * 256);
        for (int64_t t = 0; t < steps; t++) {
            const __m512i x4 = _mm512_set1_epi32(*(const int32_t *)(x0 + 4 * t));
            for (int i = 0; i < ONE_ROW_STREAMS && i < n; i++) {
                const __m512i *c = codes + (i * steps_k + t) * 4;
                for (int v = 0; v < 4; v++) {
                    ONE_ROW_PREFETCH(c + v);
                    acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], _mm512_loadu_si512(c + v), x4);
                }
            }
        }
        const __m512 xs = _mm512_set1_ps(X->xs[g]), xz = _mm512_set1_ps(X->xz[g]);
        for (int i = 0; i < ONE_ROW_STREAMS && i < n; i++)
            for (int v = 0; v < 4; v++)
                o[i][v] = q8_group_step(o[i][v], acc[i][v], _mm512_loadu_ps(s[i] + 16 * v), _mm512_loadu_ps(z[i] + 16 * v),
                                        xs, xz);
    }
    for (int64_t i = 0; i < n; i++)
        for (int v = 0; v < 4; v++)
            _mm512_storeu_ps(out[i] + 16 * v, o[i][v]);
}

/* ------------------------------------------------------------------------------------------ */
/* AMX (Xeon since Sapphire Rapids): the same integer sums, 16 rows of x by 16 weight rows per tile
 * instruction. tdpbsud multiplies a tile of x's signed bytes (16 rows of up to 64 columns) by a
 * tile of unsigned codes laid out as in a panel or int8's blocked codes (one step of 4 columns per
 * 64-byte tile row, 16 weight rows x 4 columns), the layout AMX takes for its second operand: the
 * codes go from memory (int8) or the panel (int4) into the tiles as they are. The sums are exact
 * int32, as vpdpbusd's, and the float steps per group are q8_add_group's, so a row's result is bit
 * for bit the same whichever of the two computed it. */
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
/* From this many rows of x on, AMX; fewer go through vpdpbusd. Decode-sized products from memory
 * (Xeon, 2 threads, in turns, AMX against vpdpbusd): int4 4 rows 0.97-0.99x the time, 8 rows 0.79x,
 * 12 rows 0.68-0.71x; int8 4 rows 1.14-1.16x, 8 rows 1.02-1.03x, 12 rows 0.89-0.94x; int8 again once its
 * tiles were loaded from a panel (int8_panel): 4 rows 1.02x, 6 rows 0.95x, 8 rows 0.95x, 10 rows 0.86x
 * (12 layers, two pairs of turns each); int4 then: 4 rows 1.05-1.07x, 5 rows 0.99-1.01x, 6 rows
 * 0.92-0.93x, 7 rows 0.90-0.92x. */
#ifndef AMX_MIN_ROWS_INT4
#define AMX_MIN_ROWS_INT4 6
#endif
#ifndef AMX_MIN_ROWS_INT8
#define AMX_MIN_ROWS_INT8 6
#endif

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Whether this process may use AMX: Linux hands the tile state out on request (arch_prctl
 * ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); GLMCHAT_NO_AMX=1 keeps vpdpbusd (to compare). */
static int amx_allowed(void)
{
    static int state; /* 0 not asked yet, 1 yes, -1 no */
    if (!state) {
        const char *off = getenv("GLMCHAT_NO_AMX");
        state = (off && *off && strcmp(off, "0")) || syscall(SYS_arch_prctl, 0x1023, 18) ? -1 : 1;
    }
    return state > 0;
}

/* The columns one tile instruction takes: a group of G columns in equal pieces of at most 64. */
INLINE int64_t amx_piece(int64_t G)
{
    return G / ((G + 63) / 64);
}

/* Tiles 0-3: sums of 16 rows of x by 16 weight rows; 4, 5: x (16 rows of kb columns); 6, 7: codes
 * (kb / 4 steps of 4 columns of 16 weight rows), kb = amx_piece(G). With at most 16 rows of x
 * (amx16_start) tile 5 holds codes too. */
static void amx_configure(int64_t M, int64_t G)
{
    const int64_t kb = amx_piece(G);
    tile_config c = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        const int x_tile = t == 4 || (t == 5 && M > 16);
        c.rows[t] = t < 4 || x_tile ? 16 : (uint8_t)(kb / 4);
        c.colsb[t] = x_tile ? (uint16_t)kb : 64;
    }
    _tile_loadconfig(&c);
}

/* At most 16 rows of x: the sums of all 64 weight rows of a block (tiles 0-3) at once; issued here,
 * stored and added into out by amx16_finish, so that the next group's panel can be unpacked while
 * the tiles multiply. */
INLINE void amx16_start(const q8_x *X, const uint8_t *codes, int64_t g)
{
    const int64_t G = X->G, kb = amx_piece(G), pieces = G / kb;
    const int8_t *xa = xq_row(X, g, 0);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t p = 0; p < pieces; p++) {
        const uint8_t *c = codes + p * kb / 4 * 256;
        _tile_loadd(4, xa + p * kb, G);
        _tile_loadd(5, c, 256);
        _tile_loadd(6, c + 64, 256);
        _tile_loadd(7, c + 128, 256);
        _tile_dpbsud(0, 4, 5);
        _tile_dpbsud(1, 4, 6);
        _tile_dpbsud(2, 4, 7);
        _tile_loadd(5, c + 192, 256);
        _tile_dpbsud(3, 4, 5);
    }
}

INLINE void amx16_finish(const q8_x *X, const float *s, const float *z, int64_t g, float (*out)[64])
{
    int32_t acc[4][16][16] __attribute__((aligned(64)));
    _tile_stored(0, acc[0], 64);
    _tile_stored(1, acc[1], 64);
    _tile_stored(2, acc[2], 64);
    _tile_stored(3, acc[3], 64);
    for (int64_t m = 0; m < X->M; m++) {
        const int64_t at = m * X->groups + g;
        const __m512 xs = _mm512_set1_ps(X->xs[at]), xz = _mm512_set1_ps(X->xz[at]);
        for (int v = 0; v < 4; v++) {
            float *o = out[m] + 16 * v;
            _mm512_storeu_ps(o, q8_group_step(_mm512_loadu_ps(o), _mm512_load_si512(acc[v][m]),
                                              _mm512_loadu_ps(s + 16 * v), _mm512_loadu_ps(z + 16 * v), xs, xz));
        }
    }
}

/* Every row of x times the codes of group g of a block in a panel (step t of 4 columns at codes +
 * 256 t: int4's unpacked, int8's copied by int8_panel), added into out as q8_rows does: 32 rows of x
 * (the last tile filled up with x's zero rows) by 32 weight rows at a time, the group in pieces of
 * amx_piece(G) columns. */
static void amx_group(const q8_x *X, const uint8_t *codes, const float *s, const float *z, int64_t g,
                      float (*out)[64])
{
    int32_t acc[2][2][16][16] __attribute__((aligned(64)));
    const int64_t G = X->G, kb = amx_piece(G), pieces = G / kb;
    for (int64_t m0 = 0; m0 < X->M; m0 += 32) {
        const int two = m0 + 16 < X->M;
        const int8_t *xa = xq_row(X, g, m0);
        for (int v = 0; v < 4; v += 2) { /* weight rows 16v.. and 16(v + 1).. */
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t p = 0; p < pieces; p++) {
                const uint8_t *c = codes + p * kb / 4 * 256 + v * 64;
                _tile_loadd(6, c, 256);
                _tile_loadd(7, c + 64, 256);
                _tile_loadd(4, xa + p * kb, G);
                _tile_dpbsud(0, 4, 6);
                _tile_dpbsud(1, 4, 7);
                if (two) {
                    _tile_loadd(5, xa + 16 * G + p * kb, G);
                    _tile_dpbsud(2, 5, 6);
                    _tile_dpbsud(3, 5, 7);
                }
            }
            _tile_stored(0, acc[0][0], 64);
            _tile_stored(1, acc[0][1], 64);
            if (two) {
                _tile_stored(2, acc[1][0], 64);
                _tile_stored(3, acc[1][1], 64);
            }
            const __m512 s0 = _mm512_loadu_ps(s + 16 * v), s1 = _mm512_loadu_ps(s + 16 * v + 16);
            const __m512 z0 = _mm512_loadu_ps(z + 16 * v), z1 = _mm512_loadu_ps(z + 16 * v + 16);
            for (int i = 0; i < 1 + two; i++)
                for (int r = 0; r < 16 && m0 + 16 * i + r < X->M; r++) {
                    const int64_t m = m0 + 16 * i + r, at = m * X->groups + g;
                    const __m512 xs = _mm512_set1_ps(X->xs[at]), xz = _mm512_set1_ps(X->xz[at]);
                    float *o = out[m] + 16 * v;
                    _mm512_storeu_ps(o, q8_group_step(_mm512_loadu_ps(o), _mm512_load_si512(acc[i][0][r]), s0, z0, xs, xz));
                    _mm512_storeu_ps(o + 16, q8_group_step(_mm512_loadu_ps(o + 16), _mm512_load_si512(acc[i][1][r]), s1, z1, xs, xz));
                }
        }
    }
}

/* The panel of group g of block b for AMX: int4's codes unpacked with the block's scales, or int8's
 * codes copied (its scales are the block's, in P[0] already). */
static void amx_panel(const q8_x *X, const void *q, const uint16_t *block_sz, int64_t b, int64_t g, int int8, panel *P)
{
    if (int8)
        int8_panel((const uint8_t *)q + (b * ((X->K + 3) / 4) + g * X->G / 4) * 256, X->G / 4, P);
    else
        int4_panel(q, block_sz, X->K, X->G, b, g, P);
}

/* Block b for at most 16 rows of x through AMX, group by group, each group's panel filled while the
 * tiles multiply the one before (two panels, P[0] and P[1]). Decode-sized products of 12 full-size
 * layers from memory (Xeon, 2 threads, in turns, median of 5) took 0.91-0.92x the time of a panel
 * filled and then multiplied, group after group, with int4 (6 and 16 rows; 0.93x over 28 layers at
 * 8 rows) and 0.94-0.97x with int8 (6, 8, 16 rows). */
static void amx16_block(const q8_x *X, const void *q, const uint16_t *block_sz, int64_t b, int int8, panel P[2],
                        float (*out)[64])
{
    amx_panel(X, q, block_sz, b, 0, int8, P);
    for (int64_t g = 0; g < X->groups; g++) {
        panel *now = P + (g & 1);
        amx16_start(X, (const uint8_t *)now->c, g);
        if (g + 1 < X->groups)
            amx_panel(X, q, block_sz, b, g + 1, int8, P + ((g + 1) & 1));
        amx16_finish(X, int8 ? P->s : now->s, int8 ? P->z : now->z, g, out);
    }
}

/* Whether the product of M rows of x goes through AMX: at least AMX_MIN_ROWS_INT4/INT8 rows, every
 * group of G columns whole (int8: K a multiple of 128) and cut into pieces of a multiple of 4. */
static int amx_applies(int64_t M, int64_t K, int64_t G, int int8)
{
    return M >= (int8 ? AMX_MIN_ROWS_INT8 : AMX_MIN_ROWS_INT4) && K % G == 0 && amx_piece(G) % 4 == 0 && amx_allowed();
}
#define amx_release() _tile_release()
#else /* no AMX in this build: every product through vpdpbusd */
#define amx_applies(M, K, G, int8) 0
#define amx_configure(M, G) ((void)0)
#define amx16_block(X, q, block_sz, b, int8, P, out) ((void)0)
#define amx_group(X, codes, s, z, g, out) ((void)0)
#define amx_release() ((void)0)
#endif

/* Every row of x times the codes of group g of a block, laid out as a panel's (a panel, or for
 * vpdpbusd int8's blocked codes, which `stream` from memory): through AMX or vpdpbusd. Inlined here,
 * amx_group not forced either way: int4 products of 16 rows took 1.13-1.16x the time with amx_group
 * forced inline or kept out of line (Xeon, in turns), which is how the compiler left it. */
INLINE void group_product(const q8_x *X, const void *codes, const float *s, const float *z, int64_t g, int64_t steps,
                          int amx, int stream, float (*out)[64])
{
    if (amx)
        amx_group(X, codes, s, z, g, out);
    else
        q8_group(X, codes, s, z, g, steps, stream, out);
}

/* y = x Wᵀ (+ bias) for W int4 (int8 == 0) or int8 (blocked), x quantized per group of G columns. */
static int gemm_q8(const uint16_t *x, const void *q, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                   int64_t M, int64_t N, int64_t K, int64_t G, int int8, int nthreads)
{
    q8_x X;
    char *mem;
    const int amx = amx_applies(M, K, G, int8);
    const int rc = q8_prepare(x, M, N, K, G, int8, amx ? 16 : 1, quantize_x8, nthreads, &X, &mem);
    if (rc)
        return rc;
    const int64_t steps_k = (K + 3) / 4, blocks = (N + 63) / 64, per = M == 1 ? ONE_ROW_STREAMS : 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        panel *P = aligned_alloc(64, 2 * sizeof(panel)); /* two for amx16_block */
        float (*out)[64] = aligned_alloc(64, (size_t)(M > ONE_ROW_STREAMS ? M : ONE_ROW_STREAMS) * 64 * sizeof(float));
        failed = !P || !out;
        if (amx)
            amx_configure(M, G);
#pragma omp for schedule(dynamic, per < 4 ? 4 / per : 1) /* blocks to whichever thread is free: see common.h */
        for (int64_t b = 0; b < blocks; b += per) {
            if (failed)
                continue;
            const int64_t n = blocks - b < per ? blocks - b : per; /* blocks b..b+n-1, n > 1 with one row only */
            memset(out, 0, (size_t)(M * n) * 64 * sizeof(float)); /* the groups' sums add up in out */
            const uint16_t *block_sz = int8 ? NULL : scales + b * X.groups * 128; /* int4: the block's scales */
            if (M == 1 && !int8)
                int4_one_row_blocks(&X, (const uint8_t *)q + b * K * 32, block_sz, K, n, out);
            else if (M == 1)
                int8_one_row_blocks(&X, q, scales, N, b, n, out);
            else {
                if (int8)
                    int8_scales(scales, N, b, P->s, P->z);
                if (amx && M <= 16)
                    amx16_block(&X, q, block_sz, b, int8, P, out);
                else
                    for (int64_t g = 0; g < X.groups; g++) {
                        const int64_t steps = group_steps(&X, g);
                        if (int8) {
                            const void *codes = (const uint8_t *)q + (b * steps_k + g * G / 4) * 256;
                            if (amx) { /* AMX reads a panel; vpdpbusd streams the codes from memory itself */
                                int8_panel(codes, steps, P);
                                codes = P->c;
                            }
                            group_product(&X, codes, P->s, P->z, g, steps, amx, 1, out);
                        } else if (M <= DIRECT_ROWS && !amx) {
                            int4_scales(block_sz, g, P->s, P->z);
                            int4_direct_group(&X, (const uint8_t *)q + b * K * 32, P->s, P->z, g, out);
                        } else {
                            int4_panel(q, block_sz, K, G, b, g, P);
                            group_product(&X, P->c, P->s, P->z, g, steps, amx, 0, out);
                        }
                    }
            }
            for (int64_t m = 0; m < M * n; m++) /* out[m]: row m of x, or with one row block b + m */
                for (int64_t n0 = (b + m / M) * 64; n0 < (b + m / M) * 64 + 64 && n0 < N; n0 += 16) {
                    __mmask16 mask = first16(N - n0);
                    __m512 o = _mm512_loadu_ps(out[m] + n0 % 64);
                    if (bias)
                        o = _mm512_add_ps(o, maskz_load16_bf16(mask, bias + n0));
                    _mm256_mask_storeu_epi16(y + m % M * N + n0, mask, (__m256i)_mm512_cvtneps_pbh(o));
                }
        }
        if (amx)
            amx_release();
        free(P);
        free(out);
    }
    free(mem);
    return failed ? -1 : 0;
}

int glm_gemm_int4(const uint16_t *x, const uint8_t *blocked, const uint16_t *sz, const uint16_t *bias, uint16_t *y,
                  int64_t M, int64_t N, int64_t K, int64_t G, int nthreads)
{
    return gemm_q8(x, blocked, sz, bias, y, M, N, K, G, 0, nthreads);
}

/* int4 codes in PyTorch's CPU layout (bytes [N/64, K, 32]: byte (b, k, j) holds row 64b+j in its
 * low nibble, row 64b+32+j in its high one) into the blocked layout (see the top): within each
 * 128 bytes (4 columns of a block), the 4 bytes of each pair of rows side by side. */
void glm_block_int4(const uint8_t *packed, uint8_t *blocked, int64_t N, int64_t K, int nthreads)
{
    uint8_t gather[2][64];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 16; j++)
            for (int c = 0; c < 4; c++)
                gather[i][4 * j + c] = (uint8_t)(32 * c + 16 * i + j);
    const __m512i idx0 = _mm512_loadu_si512(gather[0]), idx1 = _mm512_loadu_si512(gather[1]);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t off = 0; off < N * K / 2; off += 128) {
        __m512i v0 = _mm512_loadu_si512(packed + off), v1 = _mm512_loadu_si512(packed + off + 64);
        _mm512_storeu_si512(blocked + off, _mm512_permutex2var_epi8(v0, idx0, v1));
        _mm512_storeu_si512(blocked + off + 64, _mm512_permutex2var_epi8(v0, idx1, v1));
    }
}


int glm_gemm_int8(const uint16_t *x, const uint8_t *blocked, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                  int64_t M, int64_t N, int64_t K, int nthreads)
{
    return gemm_q8(x, blocked, scales, bias, y, M, N, K, Q8_GROUP, 1, nthreads);
}

/* ------------------------------------------------------------------------------------------ */
/* Attention for decode steps (decode_attention.h): scores by vdpbf16ps. */

INLINE __m512 exp16(__m512 x) /* e^x, relative error ~1e-7 (Cephes' expf); NaN stays NaN */
{
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x); /* below, e^x is 0 in float anyway */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* x - n ln 2, in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* p * 2^n */
}

/* p[s] = softmax over s < n of scale * (q . k[s]), for one query head. */
INLINE void attention_weights(const uint16_t *qh, const uint16_t *kb, int64_t n, int64_t D, float scale, float *p)
{
    float top = -__builtin_inff();
    for (int64_t s = 0; s < n; s++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 32)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qh + d), (__m512bh)_mm512_loadu_si512(kb + s * D + d));
        p[s] = _mm512_reduce_add_ps(acc) * scale;
        top = p[s] > top ? p[s] : top;
    }
    const __m512 shift = _mm512_set1_ps(top);
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s += 16) {
        __mmask16 mask = first16(n - s);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p + s), shift));
        _mm512_mask_storeu_ps(p + s, mask, e);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t s = 0; s < n; s += 16) {
        __mmask16 mask = first16(n - s);
        _mm512_mask_storeu_ps(p + s, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, p + s), inv));
    }
}

/* out[h] = sum over s < n of p[h][s] * v[s] for H2 (1 or 2) query heads, D <= 128. */
INLINE void attention_values(const float *p, int64_t n, const uint16_t *vb, int64_t D, int H2, uint16_t *out)
{
    __m512 acc[2][8];
    const int64_t V = D / 16;
    for (int h = 0; h < H2; h++)
        for (int64_t j = 0; j < V; j++)
            acc[h][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s++)
        for (int64_t j = 0; j < V; j++) {
            __m512 vj = load16_bf16(vb + s * D + 16 * j);
            for (int h = 0; h < H2; h++)
                acc[h][j] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * n + s]), vj, acc[h][j]);
        }
    for (int h = 0; h < H2; h++)
        for (int64_t j = 0; j < V; j++)
            _mm256_storeu_si256((__m256i *)(out + h * D + 16 * j), (__m256i)_mm512_cvtneps_pbh(acc[h][j]));
}

static void attend_group(const uint16_t *q, const uint16_t *kb, const uint16_t *vb, int64_t n, int64_t D, int64_t rep,
                         float scale, float *p, uint16_t *out)
{
    for (int64_t h = 0; h < rep; h += 2) {
        int H2 = rep - h >= 2 ? 2 : 1;
        for (int i = 0; i < H2; i++)
            attention_weights(q + (h + i) * D, kb, n, D, scale, p + i * n);
        if (D == 128 && H2 == 2) /* constant sizes: the sums stay in registers */
            attention_values(p, n, vb, 128, 2, out + h * D);
        else
            for (int i = 0; i < H2; i++)
                attention_values(p + i * n, n, vb, D, 1, out + (h + i) * D);
    }
}

#include "decode_attention.h"

/* ------------------------------------------------------------------------------------------ */
/* The small steps of a decode step around the products, each in one pass, with PyTorch's bf16
 * rounding (glm_rotary_heads, in plain C, is in common.h). */

/* The MLP's activation: y[m, f] = silu(h[m, f]) * h[m, F + f] for h [M, 2F], as PyTorch computes
 * F.silu(gate) * up in bf16: silu in float, x / (1 + e^-x), rounded to bf16, then the product. */
int glm_swiglu(const uint16_t *h, uint16_t *y, int64_t M, int64_t F, int nthreads)
{
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static) if (M * F > 32768)
    for (int64_t m = 0; m < M; m++)
        for (int64_t f = 0; f < F; f += 16) {
            __mmask16 mask = first16(F - f);
            __m512 g = maskz_load16_bf16(mask, h + m * 2 * F + f), u = maskz_load16_bf16(mask, h + m * 2 * F + F + f);
            __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            s = bf16x16_to_ps((__m256i)_mm512_cvtneps_pbh(s)); /* silu rounded to bf16, as PyTorch keeps it */
            _mm256_mask_storeu_epi16(y + m * F + f, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(s, u)));
        }
    return 0;
}

/* RMSNorm of rows x [M, D]: y = w * (x * 1 / sqrt(mean(x^2) + eps)), in float in that order (as the
 * network's RMSNorm computes it), rounded to bf16 once; w bf16. */
int glm_rmsnorm(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t D, float eps, int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 16)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * D;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            __mmask16 mask = first16(D - d);
            __m512 v = maskz_load16_bf16(mask, xm + d);
            sum = _mm512_fmadd_ps(v, v, sum);
        }
        const float mean = _mm512_reduce_add_ps(sum) / (float)D;
        const __m512 r = _mm512_set1_ps(1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(mean + eps))));
        for (int64_t d = 0; d < D; d += 16) {
            __mmask16 mask = first16(D - d);
            __m512 v = _mm512_mul_ps(maskz_load16_bf16(mask, w + d), _mm512_mul_ps(maskz_load16_bf16(mask, xm + d), r));
            _mm256_mask_storeu_epi16(y + m * D + d, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
    return 0;
}

#include "decode_block.h"
