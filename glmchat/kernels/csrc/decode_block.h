/* A decode step's whole block (glmchat.model.Block: attention and MLP, each behind its RMSNorm, with
 * their residual adds) in one call, composed of the kernels of the file that includes this one at
 * its end (gemv.c, gemv_avx2.c: glm_rmsnorm, the products, glm_rotary_heads, glm_decode_attention,
 * glm_swiglu), so that its results are bit for bit those of the same kernels called one by one from
 * PyTorch.
 *
 * Why one call: each product streams megabytes of weights through caches that this machine class
 * gives a process only a few MB of, so after every product the interpreter's and PyTorch's own code
 * and data come back from memory. A 4096-wide RMSNorm called from Python took 9 us alone and 73-106
 * after 8 to 128 MB were read (Xeon, 2 threads); the ~15 PyTorch ops and calls between a layer's
 * four products cost a full-size int4 step 17-27 ms of its 155-179, while the same kernels called
 * back to back took 135-139 ms in all. */

typedef struct {
    int64_t kind; /* GLM_BF16: w is a bf16 weight [N, K]; GLM_INT8 / GLM_INT4: blocked codes */
    const void *w;
    const uint16_t *scales; /* int8: bf16 scales [N]; int4: blocked scales and zeros; bf16: unused */
    const uint16_t *bias;   /* bf16 [N], or NULL */
    int64_t N, K, G;        /* G: int4's group size */
} glm_product;

enum { GLM_BF16 = 0, GLM_INT8 = 1, GLM_INT4 = 2 };

typedef struct {
    const uint16_t *attn_norm, *mlp_norm;           /* RMSNorm weights, bf16 */
    const uint16_t *post_attn_norm, *post_mlp_norm; /* GLM-4-0414's sandwich norms, or NULL */
    glm_product qkv, dense, gate_up, down;
    uint16_t *k_cache, *v_cache; /* this layer's [rows, G, slots, D], rows and heads at the strides below */
    int64_t rows, slots;
    int64_t row_stride, head_stride; /* in elements; each head's slots contiguous */
    int64_t H, G, D, rot;            /* query heads, KV heads, head size, rotated channels */
    float eps, scale;                /* RMSNorm's epsilon, attention's 1/sqrt(D) */
} glm_block;

static int block_product(const glm_product *p, const uint16_t *x, uint16_t *y, int64_t B, int nthreads)
{
    switch (p->kind) {
    case GLM_BF16:
        return glm_gemv_bf16(x, p->w, p->bias, y, B, p->N, p->K, nthreads);
    case GLM_INT8:
        return glm_gemm_int8(x, p->w, p->scales, p->bias, y, B, p->N, p->K, nthreads);
    case GLM_INT4:
        return glm_gemm_int4(x, p->w, p->scales, p->bias, y, B, p->N, p->K, p->G, nthreads);
    }
    return -2;
}

/* y = x + h (or x + RMSNorm(h) with a sandwich norm), rounded to bf16 as PyTorch's bf16 add does. */
static void residual_add(const uint16_t *x, uint16_t *h, const uint16_t *post_norm, float eps, uint16_t *y,
                         int64_t B, int64_t width)
{
    if (post_norm)
        glm_rmsnorm(h, post_norm, h, B, width, eps, 1); /* row by row: each row read before it is written */
    for (int64_t i = 0; i < B * width; i++)
        y[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(h[i]));
}

/* Rows x [B, hidden] -> y [B, hidden]: one decode step of the block for B rows, row b's new key and
 * value written at slot positions[b] of its cache row and its attention over slots 0..positions[b];
 * rope [B, rot / 2, 2] (cos, sin) at those positions. 0, or nonzero when a kernel declines or a
 * position is outside the cache (then nothing of the caller's but y and those cache slots has
 * changed, and the caller computes the block its other way). */
int glm_decode_block(const glm_block *L, const uint16_t *x, uint16_t *y, const uint16_t *rope,
                     const int64_t *positions, int64_t B, int nthreads)
{
    const int64_t hidden = L->qkv.K, HD = L->H * L->D, GD = L->G * L->D, F = L->gate_up.N / 2;
    if (L->qkv.N != HD + 2 * GD || L->dense.K != HD || L->dense.N != hidden || L->gate_up.K != hidden
        || L->gate_up.N % 2 || L->down.K != F || L->down.N != hidden || B < 1 || B > L->rows)
        return -2;
    for (int64_t b = 0; b < B; b++)
        if (positions[b] < 0 || positions[b] >= L->slots)
            return -2;
    const size_t sizes[] = {B * hidden, B * L->qkv.N, B * HD, B * GD, B * GD, B * HD, B * L->gate_up.N, B * F};
    size_t total = 0;
    for (int i = 0; i < 8; i++)
        total += (sizes[i] + 31) / 32 * 32;
    uint16_t *mem = aligned_alloc(64, total * 2 + 64);
    int64_t *lengths = malloc(B * sizeof(int64_t));
    int rc = !mem || !lengths ? -1 : 0;
    if (!rc) {
        uint16_t *buf[8];
        for (size_t i = 0, off = 0; i < 8; off += (sizes[i] + 31) / 32 * 32, i++)
            buf[i] = mem + off;
        uint16_t *xn = buf[0], *qkv = buf[1], *q = buf[2], *k = buf[3], *v = buf[4], *att = buf[5], *h = buf[6],
                 *act = buf[7];
        for (int64_t b = 0; b < B; b++)
            lengths[b] = positions[b] + 1;
        glm_rmsnorm(x, L->attn_norm, xn, B, hidden, L->eps, nthreads);
        rc = block_product(&L->qkv, xn, qkv, B, nthreads);
        if (!rc)
            rc = glm_rotary_heads(qkv, rope, q, k, v, B, L->H, L->G, L->D, L->rot);
        if (!rc) {
            for (int64_t b = 0; b < B; b++)
                for (int64_t g = 0; g < L->G; g++) {
                    const int64_t at = b * L->row_stride + g * L->head_stride + positions[b] * L->D;
                    memcpy(L->k_cache + at, k + (b * L->G + g) * L->D, L->D * 2);
                    memcpy(L->v_cache + at, v + (b * L->G + g) * L->D, L->D * 2);
                }
            rc = glm_decode_attention(q, L->k_cache, L->v_cache, lengths, att, B, L->H, L->G, L->D, L->row_stride,
                                      L->head_stride, L->scale, nthreads);
        }
        if (!rc)
            rc = block_product(&L->dense, att, xn, B, nthreads);
        if (!rc) {
            residual_add(x, xn, L->post_attn_norm, L->eps, y, B, hidden); /* y: x after attention */
            glm_rmsnorm(y, L->mlp_norm, xn, B, hidden, L->eps, nthreads);
            rc = block_product(&L->gate_up, xn, h, B, nthreads);
        }
        if (!rc)
            rc = glm_swiglu(h, act, B, F, nthreads);
        if (!rc)
            rc = block_product(&L->down, act, xn, B, nthreads);
        if (!rc)
            residual_add(y, xn, L->post_mlp_norm, L->eps, y, B, hidden);
    }
    free(mem);
    free(lengths);
    return rc;
}
