/* The kernels of gemv.c for x86-64 CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 1-3, Intel's
 * client cores): glm_gemv_bf16, glm_gemm_int8 and glm_gemm_int4 with the same arguments,
 * the same data layouts (see the top of gemv.c) and, for int4, the same arithmetic bit for bit.
 * cpu.py compiles this file where gemv.c's instructions are missing. It has the decode steps' small
 * kernels too (rotary, common.h's; SwiGLU, RMSNorm, attention) and so the one-call decode block
 * (decode_block.h).
 *
 * AVX2 has no integer dot product of 4 bytes (VNNI's vpdpbusd). vpmaddubsw multiplies 32 unsigned
 * by 32 signed bytes and adds adjacent pairs into 16 bits, vpmaddwd by ones adds adjacent 16-bit
 * pairs into 32: together the sum of each lane's 4 products, vpdpbusd's result, exact as long as a
 * pair's sum fits 16 bits. int4 codes (0..15) times x (-127..127) always fit. int8 codes do not as
 * unsigned bytes (255 * 127 * 2 > 32767), so here they are taken as signed bytes q = c - 128 and
 * the sign of x moved onto them (|x| times sign(x) * q, as llama.cpp does): the sums are those of
 * q, with no zero term, equal to gemv.c's up to the float rounding of the per-group step.
 * A 64-byte vector of the blocked layouts is two 32-byte ones here: lanes (int32) of 32-byte
 * vector v hold rows 8v..8v+7 of a 64-row block (int4: low nibbles; high nibbles rows 32+8v..).
 */
#include "common.h"

#if !defined(__AVX2__) || !defined(__FMA__)
#error "these kernels need AVX2 and FMA"
#endif

/* ------------------------------------------------------------------------------------------ */
/* bf16: each 16 bf16 of a weight row and of x are widened to two vectors of 8 floats (the same
 * shuffle for both, so the products pair up) and multiplied with FMA; the tail of a row past the
 * last 16 in scalar code. A sum takes the same instructions whatever the other rows are. */

#define TILE1 8 /* weight rows per tile with one row of x */
#define TILE 4  /* with more: XROWS x TILE sums in registers */
#define XROWS 2

INLINE void bf16x16_widen(const uint16_t *p, __m256 *lo, __m256 *hi)
{
    __m256i h = _mm256_loadu_si256((const __m256i *)p), zero = _mm256_setzero_si256();
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, h));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, h));
}

INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[m][r] = x row m . weight row r for m < R rows of x (stride K) and `rows` weight rows at w. */
INLINE void bf16_tile(const uint16_t *x, int R, const uint16_t *w, int64_t K, int rows, float out[XROWS][TILE1])
{
    __m256 acc[XROWS][TILE1];
    for (int m = 0; m < R; m++)
        for (int r = 0; r < rows; r++)
            acc[m][r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 xl[XROWS], xh[XROWS];
        for (int m = 0; m < R; m++)
            bf16x16_widen(x + m * K + k, &xl[m], &xh[m]);
        for (int r = 0; r < rows; r++) {
            PREFETCH(w + r * K + k);
            __m256 wl, wh;
            bf16x16_widen(w + r * K + k, &wl, &wh);
            for (int m = 0; m < R; m++)
                acc[m][r] = _mm256_fmadd_ps(wh, xh[m], _mm256_fmadd_ps(wl, xl[m], acc[m][r]));
        }
    }
    for (int m = 0; m < R; m++)
        for (int r = 0; r < rows; r++) {
            float sum = hsum8(acc[m][r]);
            for (int64_t j = k; j < K; j++)
                sum += bf16_to_f32(x[m * K + j]) * bf16_to_f32(w[r * K + j]);
            out[m][r] = sum;
        }
}

#include "gemv_bf16.h"

/* ------------------------------------------------------------------------------------------ */
/* int8 and int4: x in 8 bits per group of G columns (gemv.c's quantize_x8, the same values), then
 * for each 64-row block and group, the rows of x over the group's codes (streamed from memory by
 * the first, found in L1 by the others; int4 up to 3 rows at a time, its nibbles taken apart once
 * for them), 8 sums of 8 weight rows each per row of x, and the float step per group. */

INLINE __m256 bf16x8_to_ps(const uint16_t *p)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* x's rows in 8 bits per group (padded with zeros to whole groups); -1 when x holds an inf or NaN. */
static int quantize_x8(const uint16_t *x, q8_x *X, int8_t *xq, float *xs, float *xz, int nthreads)
{
    const int64_t M = X->M, K = X->K, G = X->G, groups = X->groups;
    int bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : bad) if (M > 1)
    for (int64_t m = 0; m < M; m++) {
        const __m256 inf = _mm256_set1_ps(__builtin_inff()), sign = _mm256_set1_ps(-0.0f);
        for (int64_t g = 0; g < groups && !bad; g++) {
            const uint16_t *row = x + m * K;
            int64_t k0 = g * G, end = k0 + G < K ? k0 + G : K, k;
            int8_t *out = xq + (g * X->rows + m) * G - k0;
            __m256 top = _mm256_setzero_ps();
            for (k = k0; k + 8 <= end; k += 8) {
                __m256 a = _mm256_andnot_ps(sign, bf16x8_to_ps(row + k));
                bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ)) != 0;
                top = _mm256_max_ps(top, a);
            }
            float big = 0.0f, lanes[8];
            _mm256_storeu_ps(lanes, top);
            for (int j = 0; j < 8; j++)
                big = lanes[j] > big ? lanes[j] : big;
            for (int64_t j = k; j < end; j++) {
                float a = __builtin_fabsf(bf16_to_f32(row[j]));
                bad |= !(a < __builtin_inff());
                big = a > big ? a : big;
            }
            const float inv = big > 0 ? 127.0f / big : 1.0f;
            int32_t sum = 0, q[8];
            memset(out + end, 0, (size_t)(k0 + G - end));
            for (k = k0; k + 8 <= end; k += 8) {
                _mm256_storeu_si256((__m256i *)q, _mm256_cvtps_epi32(_mm256_mul_ps(bf16x8_to_ps(row + k), _mm256_set1_ps(inv))));
                for (int j = 0; j < 8; j++)
                    out[k + j] = (int8_t)q[j], sum += q[j];
            }
            for (; k < end; k++) {
                int32_t v = (int32_t)__builtin_lrintf(bf16_to_f32(row[k]) * inv);
                out[k] = (int8_t)v, sum += v;
            }
            xs[m * groups + g] = big > 0 ? big / 127.0f : 1.0f;
            xz[m * groups + g] = xs[m * groups + g] * (float)sum;
        }
    }
    X->xq = xq, X->xs = xs, X->xz = xz;
    return bad ? -1 : 0;
}

/* The sums of one lane's 4 products, as vpdpbusd: u unsigned bytes, s signed. */
INLINE __m256i dot4(__m256i acc, __m256i u, __m256i s)
{
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

/* acc[a] (rows 8a.. of the block) += the one row of x (a decode step alone) times the int4 codes
 * of group g of a block, in one pass over the bytes as they stream from memory, prefetched into L2
 * (unlike gemv.c's one row: 112 full-size layer products of 28 layers took 0.80x the time with it,
 * 0.81x with PF_DIST 1024, 0.83x with 8192; Zen 3 EPYC, 2 threads, in turns). */
INLINE void int4_one_row_sums(const q8_x *X, const uint8_t *block, int64_t g, __m256i acc[8])
{
    const __m256i low4 = _mm256_set1_epi8(15);
    const int8_t *xm = xq_row(X, g, 0);
    for (int64_t k = g * X->G, s4 = 0; k < (g + 1) * X->G; k += 4, s4 += 4) {
        const uint8_t *p = block + k * 32;
        PREFETCH(p), PREFETCH(p + 64);
        __m256i x4 = _mm256_set1_epi32(*(const int32_t *)(xm + s4));
        for (int v = 0; v < 4; v++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + 32 * v));
            acc[v] = dot4(acc[v], _mm256_and_si256(bytes, low4), x4);
            acc[4 + v] = dot4(acc[4 + v], _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4), x4);
        }
    }
}

/* acc[r][a] += rows m..m+R-1 of x (R <= I4_ROWS) times the int4 codes of group g of a block, the
 * codes taken apart once for all R rows: the low nibbles (rows 0..31) in one pass, the high ones in
 * another (the bytes from L1 then), each vpmaddubsw's pairs added up in 16 bits over 8 steps of 4
 * columns (at most 8 * 2 * 15 * 127 = 30480: no overflow) before one vpmaddwd widens them. The same
 * exact sums as int4_one_row_sums, in fewer instructions per row. */
#define I4_ROWS 3 /* full-size layer products, against one row at a time: 8 rows 0.88-0.92x the time,
                     64 rows 0.84-0.91x (2 rows 0.99-1.07x, 4 as 3; Zen 3 EPYC, 2 threads, in turns) */
INLINE void int4_rows_sums(const q8_x *X, const uint8_t *block, int64_t g, int64_t m, int R, int stream,
                           __m256i acc[I4_ROWS][8])
{
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const int8_t *xm = xq_row(X, g, m);
    const uint8_t *p0 = block + g * X->G * 32;
    const int64_t steps = X->G / 4;
    for (int high = 0; high < 2; high++)
        for (int64_t s0 = 0; s0 < steps; s0 += 8) {
            __m256i part[I4_ROWS][4];
            for (int r = 0; r < R; r++)
                for (int v = 0; v < 4; v++)
                    part[r][v] = _mm256_setzero_si256();
            for (int64_t s = s0; s < s0 + 8 && s < steps; s++) {
                const uint8_t *p = p0 + 128 * s;
                if (stream && !high)
                    PREFETCH(p), PREFETCH(p + 64);
                __m256i codes[4];
                for (int v = 0; v < 4; v++) {
                    __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + 32 * v));
                    codes[v] = _mm256_and_si256(high ? _mm256_srli_epi16(bytes, 4) : bytes, low4);
                }
                for (int r = 0; r < R; r++) {
                    __m256i x4 = _mm256_set1_epi32(*(const int32_t *)(xm + r * X->G + 4 * s));
                    for (int v = 0; v < 4; v++)
                        part[r][v] = _mm256_add_epi16(part[r][v], _mm256_maddubs_epi16(codes[v], x4));
                }
            }
            for (int r = 0; r < R; r++)
                for (int v = 0; v < 4; v++)
                    acc[r][4 * high + v] = _mm256_add_epi32(acc[r][4 * high + v], _mm256_madd_epi16(part[r][v], ones));
        }
}

/* int4_rows_sums for R rows, in constant counts (with a run-time count the sums would live on the stack). */
static void int4_some_rows_sums(const q8_x *X, const uint8_t *block, int64_t g, int64_t m, int R, int stream,
                                __m256i acc[I4_ROWS][8])
{
    switch (R) {
    case 3: int4_rows_sums(X, block, g, m, 3, stream, acc); break;
    case 2: int4_rows_sums(X, block, g, m, 2, stream, acc); break;
    default: int4_rows_sums(X, block, g, m, 1, stream, acc);
    }
}

/* acc[a] += row m of x times the int8 codes of group g of a block (steps of 4 columns), the first
 * row prefetching them 1 KB ahead (56 full-size layer products of 14 layers, one row, against
 * PF_DIST's 4 KB, in turns: 0.89x, 0.93x and 0.92x the time; 2 KB 1.03x, 512 B 1.05x, none 0.98x; Zen 3
 * EPYC, 2 threads). */
#define INT8_PF_DIST 1024
INLINE void int8_sums(const q8_x *X, const uint8_t *codes, int64_t g, int64_t steps, int64_t m, int stream,
                      __m256i acc[8])
{
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const int8_t *xm = xq_row(X, g, m);
    for (int64_t t = 0; t < steps; t++) {
        const uint8_t *p = codes + 256 * t;
        if (stream)
            for (int i = 0; i < 4; i++)
                _mm_prefetch((const char *)(p + 64 * i) + INT8_PF_DIST, PF_HINT);
        __m256i x4 = _mm256_set1_epi32(*(const int32_t *)(xm + 4 * t)), ax = _mm256_abs_epi8(x4);
        for (int a = 0; a < 8; a++) {
            __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 32 * a)), flip);
            acc[a] = dot4(acc[a], ax, _mm256_sign_epi8(q, x4));
        }
    }
}

/* out[n] += what group g adds to a row from its sums acc (rows 8a..): gemv.c's q8_group_step. */
INLINE void add_group(const float *s, const float *z, float xs, float xz, const __m256i acc[8], float *out)
{
    const __m256 vxs = _mm256_set1_ps(xs), vxz = _mm256_set1_ps(xz);
    for (int a = 0; a < 8; a++) {
        __m256 o = _mm256_loadu_ps(out + 8 * a);
        o = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[a]), _mm256_mul_ps(_mm256_loadu_ps(s + 8 * a), vxs), o);
        _mm256_storeu_ps(out + 8 * a, _mm256_fmadd_ps(_mm256_loadu_ps(z + 8 * a), vxz, o));
    }
}

/* Scales s and zeros z of a block's 64 rows in group g (int4: W = (c - 8) * scale + zero = c * s + z). */
INLINE void int4_scales(const uint16_t *sz, int64_t g, float *s, float *z)
{
    for (int a = 0; a < 8; a++) {
        __m256i pair = _mm256_loadu_si256((const __m256i *)(sz + (g * 64 + 8 * a) * 2));
        __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
        __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pair, _mm256_set1_epi32((int)0xffff0000u)));
        _mm256_storeu_ps(s + 8 * a, scale);
        _mm256_storeu_ps(z + 8 * a, _mm256_fmadd_ps(scale, _mm256_set1_ps(-8.0f), zero));
    }
}

static int gemm_q8(const uint16_t *x, const void *q, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                   int64_t M, int64_t N, int64_t K, int64_t G, int int8, int nthreads)
{
    q8_x X;
    char *mem;
    const int rc = q8_prepare(x, M, N, K, G, int8, 1, quantize_x8, nthreads, &X, &mem);
    if (rc)
        return rc;
    const int64_t steps_k = (K + 3) / 4;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float (*out)[64] = aligned_alloc(64, (size_t)M * 64 * sizeof(float));
        float s[64], z[64];
        failed = !out;
#pragma omp for schedule(dynamic, 4) /* blocks to whichever thread is free: see common.h */
        for (int64_t b = 0; b < (N + 63) / 64; b++) {
            if (failed)
                continue;
            memset(out, 0, (size_t)M * 64 * sizeof(float));
            if (int8)
                for (int64_t j = 0; j < 64; j++)
                    s[j] = 64 * b + j < N ? bf16_to_f32(scales[64 * b + j]) : 0.0f, z[j] = 0.0f;
            for (int64_t g = 0; g < X.groups; g++) {
                int64_t steps = ((g + 1) * G < K ? G : K - g * G + 3) / 4;
                const uint8_t *codes = int8 ? (const uint8_t *)q + (b * steps_k + g * G / 4) * 256
                                            : (const uint8_t *)q + b * K * 32;
                if (!int8)
                    int4_scales(scales + b * X.groups * 128, g, s, z);
                for (int64_t m = 0, R; m < M; m += R) {
                    R = int8 || M == 1 ? 1 : (M - m < I4_ROWS ? M - m : I4_ROWS);
                    __m256i acc[I4_ROWS][8];
                    for (int r = 0; r < R; r++)
                        for (int a = 0; a < 8; a++)
                            acc[r][a] = _mm256_setzero_si256();
                    if (int8)
                        int8_sums(&X, codes, g, steps, m, m == 0, acc[0]);
                    else if (M == 1)
                        int4_one_row_sums(&X, codes, g, acc[0]);
                    else
                        int4_some_rows_sums(&X, codes, g, m, (int)R, m == 0, acc);
                    for (int r = 0; r < R; r++)
                        add_group(s, z, X.xs[(m + r) * X.groups + g], X.xz[(m + r) * X.groups + g], acc[r], out[m + r]);
                }
            }
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = b * 64; n < b * 64 + 64 && n < N; n++)
                    store(y + m * N, bias, n, out[m][n - b * 64]);
        }
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

int glm_gemm_int8(const uint16_t *x, const uint8_t *blocked, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                  int64_t M, int64_t N, int64_t K, int nthreads)
{
    return gemm_q8(x, blocked, scales, bias, y, M, N, K, Q8_GROUP, 1, nthreads);
}

/* int4 codes in PyTorch's CPU layout into the blocked one (gemv.c's glm_block_int4, byte by byte). */
void glm_block_int4(const uint8_t *packed, uint8_t *blocked, int64_t N, int64_t K, int nthreads)
{
    uint8_t gather[128];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 16; j++)
            for (int c = 0; c < 4; c++)
                gather[64 * i + 4 * j + c] = (uint8_t)(32 * c + 16 * i + j);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t off = 0; off < N * K / 2; off += 128)
        for (int i = 0; i < 128; i++)
            blocked[off + i] = packed[off + gather[i]];
}

/* ------------------------------------------------------------------------------------------ */
/* The decode steps' SwiGLU and RMSNorm, as gemv.c's (see there), 8 lanes at a time; a row's tail
 * goes through the same code from a zero-padded copy. */

INLINE __m256 exp8(__m256 x) /* e^x as gemv.c's exp16 (Cephes' expf); 2^n built in the exponent bits */
{
    const __m256 top = _mm256_set1_ps(88.72284f); /* above, e^x is inf in float */
    __m256 over = _mm256_cmp_ps(x, top, _CMP_GT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(_mm256_set1_ps(-86.0f), x), top); /* NaN stays NaN (max's 2nd operand) */
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
    /* p * 2^(n-1) * 2: n - 1 in -125..127, a normal power of two */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
    p = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0f));
    return _mm256_blendv_ps(p, _mm256_set1_ps(__builtin_inff()), over);
}

INLINE __m256 round8_bf16(__m256 v) /* to the nearest bf16, even on ties (quiet NaNs stay NaN) */
{
    __m256i u = _mm256_castps_si256(v);
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}

INLINE void store8_bf16(uint16_t *y, __m256 v) /* v rounded to bf16, 8 values */
{
    __m256i h = _mm256_srli_epi32(_mm256_castps_si256(round8_bf16(v)), 16);
    h = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
    _mm_storeu_si128((__m128i *)y, _mm256_castsi256_si128(h));
}

/* n (< 8) bf16 values into 8, zeros after. */
INLINE const uint16_t *padded8(const uint16_t *x, int64_t n, uint16_t buf[8])
{
    memset(buf, 0, 16);
    memcpy(buf, x, (size_t)n * 2);
    return buf;
}

int glm_swiglu(const uint16_t *h, uint16_t *y, int64_t M, int64_t F, int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * F > 32768)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *gate = h + m * 2 * F, *up = gate + F;
        for (int64_t f = 0; f < F; f += 8) {
            uint16_t gbuf[8], ubuf[8], out[8];
            const int64_t n = F - f < 8 ? F - f : 8;
            __m256 g = bf16x8_to_ps(n < 8 ? padded8(gate + f, n, gbuf) : gate + f);
            __m256 u = bf16x8_to_ps(n < 8 ? padded8(up + f, n, ubuf) : up + f);
            __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            store8_bf16(n < 8 ? out : y + m * F + f, _mm256_mul_ps(round8_bf16(s), u)); /* silu rounded to bf16 first */
            if (n < 8)
                memcpy(y + m * F + f, out, (size_t)n * 2);
        }
    }
    return 0;
}

int glm_rmsnorm(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t D, float eps, int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 16)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * D;
        uint16_t xbuf[8], wbuf[8], out[8];
        __m256 sum = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            __m256 v = bf16x8_to_ps(D - d < 8 ? padded8(xm + d, D - d, xbuf) : xm + d);
            sum = _mm256_fmadd_ps(v, v, sum);
        }
        const float mean = hsum8(sum) / (float)D;
        const __m256 r = _mm256_set1_ps(1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(mean + eps))));
        for (int64_t d = 0; d < D; d += 8) {
            const int64_t n = D - d < 8 ? D - d : 8;
            __m256 xv = bf16x8_to_ps(n < 8 ? padded8(xm + d, n, xbuf) : xm + d);
            __m256 wv = bf16x8_to_ps(n < 8 ? padded8(w + d, n, wbuf) : w + d);
            store8_bf16(n < 8 ? out : y + m * D + d, _mm256_mul_ps(wv, _mm256_mul_ps(xv, r)));
            if (n < 8)
                memcpy(y + m * D + d, out, (size_t)n * 2);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Attention for decode steps (decode_attention.h): gemv.c's steps with 8 floats to a vector, the
 * bf16 products widened to float and summed by FMA. */

/* p[s] = softmax over s < n of scale * (q . k[s]), for one query head; D a multiple of 16. */
static void attention_weights(const uint16_t *qh, const uint16_t *kb, int64_t n, int64_t D, float scale, float *p)
{
    float top = -__builtin_inff();
    for (int64_t s = 0; s < n; s++) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            __m256 q0, q1, k0, k1;
            bf16x16_widen(qh + d, &q0, &q1);
            bf16x16_widen(kb + s * D + d, &k0, &k1);
            acc0 = _mm256_fmadd_ps(q0, k0, acc0);
            acc1 = _mm256_fmadd_ps(q1, k1, acc1);
        }
        p[s] = hsum8(_mm256_add_ps(acc0, acc1)) * scale;
        top = p[s] > top ? p[s] : top;
    }
    const __m256 shift = _mm256_set1_ps(top), lanes = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 total = _mm256_setzero_ps();
    for (int64_t s = 0; s < n; s += 8) {
        const __m256 inside = _mm256_cmp_ps(lanes, _mm256_set1_ps((float)(n - s)), _CMP_LT_OQ);
        __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), shift)), inside);
        _mm256_storeu_ps(p + s, e);
        total = _mm256_add_ps(total, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum8(total));
    for (int64_t s = 0; s < n; s += 8)
        _mm256_storeu_ps(p + s, _mm256_mul_ps(_mm256_loadu_ps(p + s), inv));
}

/* out[c..c+8V) = sum over s < n of p[s] * v[s][c..c+8V), V vectors of 8 (constant: in registers). */
INLINE void attention_values(const float *p, int64_t n, const uint16_t *vb, int64_t D, int64_t c, int V, uint16_t *out)
{
    __m256 acc[8];
    for (int j = 0; j < V; j++)
        acc[j] = _mm256_setzero_ps();
    for (int64_t s = 0; s < n; s++) {
        const __m256 ps = _mm256_set1_ps(p[s]);
        for (int j = 0; j < V; j++)
            acc[j] = _mm256_fmadd_ps(ps, bf16x8_to_ps(vb + s * D + c + 8 * j), acc[j]);
    }
    for (int j = 0; j < V; j++)
        store8_bf16(out + c + 8 * j, acc[j]);
}

static void attend_group(const uint16_t *q, const uint16_t *kb, const uint16_t *vb, int64_t n, int64_t D, int64_t rep,
                         float scale, float *p, uint16_t *out)
{
    for (int64_t h = 0; h < rep; h++) {
        attention_weights(q + h * D, kb, n, D, scale, p); /* p: n rounded up to whole vectors */
        for (int64_t c = 0; c < D; c += 64)
            if (D - c >= 64)
                attention_values(p, n, vb, D, c, 8, out + h * D);
            else
                attention_values(p, n, vb, D, c, 4, out + h * D);
    }
}

#include "decode_attention.h"

#include "decode_block.h"
