/* A pass of a few rows through a Linear layer on the CPU: out[M, N] = x[M, K] @ W^T, fp32.
 *
 * Decode passes multiply each weight by 2-16 rows (one per session). Reading the weight from
 * memory is the floor of such a product; BLAS and oneDNN kernels are built for large M and take
 * ~1.8x that floor at 8 rows. This kernel streams the weight once, in the order it lies in memory,
 * and does every row's arithmetic on each piece while it is in registers:
 *
 *   - W is packed as [ceil(N / NB)][K][NB] (zero padded), so each block of NB output columns is
 *     one contiguous run of K * NB floats: a single stream the prefetcher follows, prefetched
 *     PREFETCH rows of k ahead besides.
 *   - For a block, up to MAX_ROWS rows of x accumulate in MAX_ROWS * NB / 16 vector registers
 *     (24 of AVX-512's 32 at 12 rows); more rows are split into even chunks that read the block
 *     again from L2 (K * NB * 4 bytes: 128 KiB at K = 1024).
 *
 * GCC vector extensions, not intrinsics: built with -march=native they become AVX-512 or AVX2
 * (or NEON) code as the CPU has, from one source. Blocks go to OpenMP threads (the libgomp torch
 * already loaded). Each output is a sequential sum over k in fp32 (fused multiply-adds), so results
 * match F.linear to float32 rounding, as any other blocking does.
 */
#include <string.h>

#define NB 32
#define MAX_ROWS 12
#define PREFETCH 32
#define LANES 16
#define VECS (NB / LANES)

typedef float vec __attribute__((vector_size(LANES * 4)));
typedef float vec_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));

static inline __attribute__((always_inline)) void block_rows(
    const float *restrict w, const float *restrict x, long ldx, float *restrict out, long ldo,
    long k_len, int cols, const int rows)
{
    vec acc[MAX_ROWS][VECS];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < VECS; j++)
            acc[m][j] = (vec){0};
    for (long k = 0; k < k_len; k++) {
        const vec *wk = (const vec *)(w + k * NB);
        __builtin_prefetch(w + (k + PREFETCH) * NB);
        __builtin_prefetch(w + (k + PREFETCH) * NB + LANES);
        vec wv[VECS];
        for (int j = 0; j < VECS; j++)
            wv[j] = wk[j];
        for (int m = 0; m < rows; m++) {
            float xm = x[m * ldx + k];
            for (int j = 0; j < VECS; j++)
                acc[m][j] += xm * wv[j];
        }
    }
    for (int m = 0; m < rows; m++) {
        if (cols == NB) {
            for (int j = 0; j < VECS; j++)
                *(vec_unaligned *)(out + m * ldo + LANES * j) = acc[m][j];
        } else {
            float tail[NB] __attribute__((aligned(64)));
            memcpy(tail, acc[m], sizeof tail);
            memcpy(out + m * ldo, tail, (size_t)cols * sizeof(float));
        }
    }
}

/* One call per row count, so each loop above is compiled with `rows` a constant. */
static void block(const float *w, const float *x, long ldx, float *out, long ldo, long k_len,
                  int cols, int rows)
{
    switch (rows) {
#define ROWS(r) case r: block_rows(w, x, ldx, out, ldo, k_len, cols, r); break;
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6)
        ROWS(7) ROWS(8) ROWS(9) ROWS(10) ROWS(11) ROWS(12)
#undef ROWS
    }
}

int skinny_block_columns(void) { return NB; }

/* out[M, N] (row-major) = x[M, K] (row-major) @ W^T, W packed as above. */
void skinny_gemm(const float *w, const float *x, float *out, long m_len, long k_len, long n_len,
                 int threads)
{
    long blocks = (n_len + NB - 1) / NB;
    long chunks = (m_len + MAX_ROWS - 1) / MAX_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long b = 0; b < blocks; b++) {
        long left_cols = n_len - b * NB;
        int cols = left_cols < NB ? (int)left_cols : NB;
        long m = 0;
        for (long c = chunks; c > 0; c--) {  /* even chunks: 16 rows go as 8 + 8, not 12 + 4 */
            int rows = (int)((m_len - m + c - 1) / c);
            block(w + b * k_len * NB, x + m * k_len, k_len, out + m * n_len + b * NB, n_len,
                  k_len, cols, rows);
            m += rows;
        }
    }
}
