/* glm_decode_attention, shared by gemv.c and gemv_avx2.c: each defines attend_group (below) with
 * its own instructions, then includes this file.
 *
 * Attention for decode steps: one new token per row b, over that row's own first lengths[b] keys.
 * q and out [B, H, D], k and v [B, G, >= lengths[b], D] (rows and KV heads at the given strides,
 * in elements), all bf16; query heads g*H/G .. (g+1)*H/G - 1 read KV head g. Per (row, KV head):
 * scores in float, softmax in float, then the values' weighted sum in float, rounded to bf16 once.
 * A row's result never depends on the other rows.
 *
 * attend_group(q, kb, vb, n, D, rep, scale, p, out): the rep query heads at q (rep * D values) over
 * the n keys kb and values vb of their KV head, into out; p: room for 2 * n + 16 floats. */
int glm_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *lengths, uint16_t *out,
                         int64_t B, int64_t H, int64_t G, int64_t D, int64_t row_stride, int64_t head_stride,
                         float scale, int nthreads)
{
    if (D % 32 || D > 128 || G < 1 || H % G)
        return -2;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) {
        if (lengths[b] < 1)
            return -2;
        longest = lengths[b] > longest ? lengths[b] : longest;
    }
    const int64_t rep = H / G;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *p = malloc((size_t)(2 * longest + 16) * sizeof(float));
        failed = !p;
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t g = 0; g < G; g++) {
                if (failed)
                    continue;
                const int64_t first = (b * H + g * rep) * D; /* the group's first query head, in q and out */
                attend_group(q + first, k + b * row_stride + g * head_stride, v + b * row_stride + g * head_stride,
                             lengths[b], D, rep, scale, p, out + first);
            }
        free(p);
    }
    return failed ? -1 : 0;
}
