/* glm_gemv_bf16, the bf16 decode product's loop over tiles of weight rows, shared by gemv.c and
 * gemv_avx2.c: each defines TILE1 (weight rows per tile with one row of x), TILE (with more), XROWS
 * (rows of x per pass over a tile) and bf16_tile(x, R, w, K, rows, out[XROWS][TILE1]) with its
 * own instructions, then includes this file. */
/* M rows of x, XROWS at a time per tile of weight rows: the weights are read from memory once,
 * later passes find the tile in L1/L2. One row of x takes wider tiles (a row's sums are the same
 * whatever the tile). */
int glm_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                  int64_t M, int64_t N, int64_t K, int nthreads)
{
    const int64_t tile = M == 1 ? TILE1 : TILE, tiles = (N + tile - 1) / tile;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * tile, rows = N - n0 < tile ? N - n0 : tile;
        for (int64_t m0 = 0; m0 < M; m0 += XROWS) {
            int R = M - m0 < XROWS ? (int)(M - m0) : XROWS;
            float out[XROWS][TILE1];
            if (rows == TILE1) /* one row of x (constant counts: the sums stay in registers) */
                bf16_tile(x, 1, w + n0 * K, K, TILE1, out);
            else if (rows == TILE)
                bf16_tile(x + m0 * K, R, w + n0 * K, K, TILE, out);
            else
                for (int r = 0; r < rows; r++) {
                    float one[XROWS][TILE1];
                    bf16_tile(x + m0 * K, R, w + (n0 + r) * K, K, 1, one);
                    for (int m = 0; m < R; m++)
                        out[m][r] = one[m][0];
                }
            for (int m = 0; m < R; m++)
                for (int r = 0; r < rows; r++)
                    store(y + (m0 + m) * N, bias, n0 + r, out[m][r]);
        }
    }
    return 0;
}
