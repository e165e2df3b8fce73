/* bench_sgemm: the fp32 GEMM rate of this machine through the same seam the
 * forward pass uses (cpu_llama_gemm_blas: OpenBLAS sgemm), for the
 * "fraction of GEMM peak" figure of bench/bench_hessian.sh.
 *
 *   bench_sgemm [--threads N] [--rows M] [--seconds S]
 *   bench_sgemm --cuda [--gram] [--seconds S]
 *
 * Times C[M, N] = A[M, K] * B[N, K]^T for the linear-layer shapes of
 * Llama-3.2-1B (N x K = 2048 x 2048, 8192 x 2048, 2048 x 8192) with M rows
 * (default 2048: one batch of tokens), repeating each for about S seconds
 * (default 2), and prints one line per shape and a last line
 *   sgemm_peak_gflops X
 * with the best rate seen (2 * M * N * K flops per call). With --cuda the
 * same shapes (M = 2048) run through cuBLAS on GPU 0 with device-resident
 * operands (gpu_gemm_peak_gflops: the GPU seam's fp32 peak, no transfers),
 * and the lines are "gpu NAME" and "sgemm_peak_gflops X"; --gram adds the
 * statistics' Gram update rates (X^T X of 2048 rows, 2048 and 8192 wide,
 * one cublasSsyrk and by column blocks: gpu_gemm_set_gram_block), one
 *   gram_gflops dim D rows 2048 block B X (F of the peak)
 * line each, in useful flops (D (D + 1) rows per update). Exit 0, 1 when
 * --cuda finds no usable GPU, 2 for a usage error. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/llama_forward.h"
#include "pipeline/backend_registry.h"
#include "pipeline/progress.h"

static int usage(void)
{
    fputs("usage: bench_sgemm [--threads N] [--rows M] [--seconds S] | --cuda [--gram] [--seconds S]\n", stderr);
    return 2;
}

/* The GPU seam's fp32 peak. */
static int cuda_peak(double seconds, bool gram)
{
    char why[256] = "";
    ms_gpu_gemm *g = NULL;
    if (ms_gpu_gemm_open(0, &g, why, sizeof why) != 0) {
        fprintf(stderr, "bench_sgemm: no usable GPU: %s\n", why);
        return 1;
    }
    double peak = ms_gpu_gemm_peak_gflops(g, seconds, why, sizeof why);
    if (peak < 0) {
        fprintf(stderr, "bench_sgemm: the GPU measurement failed: %s\n", why);
        ms_gpu_gemm_close(g);
        return 1;
    }
    printf("gpu %s\n", ms_gpu_gemm_name(g));
    printf("sgemm_peak_gflops %.1f\n", peak);
    /* The statistics' Gram updates at the Llama-3.2-1B input widths, one
     * 2048-token batch each: one cublasSsyrk, and by column blocks. */
    static const uint64_t k_dims[] = {2048, 8192}, k_blocks[] = {0, 1024, 2048};
    for (unsigned d = 0; d < 2 && gram; d++)
        for (unsigned b = 0; b < 3; b++) {
            if (k_blocks[b] >= k_dims[d])
                continue;
            double r = ms_gpu_gemm_gram_gflops(g, k_dims[d], 2048, k_blocks[b], seconds / 6, why, sizeof why);
            if (r < 0) {
                fprintf(stderr, "bench_sgemm: the Gram measurement failed: %s\n", why);
                ms_gpu_gemm_close(g);
                return 1;
            }
            printf("gram_gflops dim %" PRIu64 " rows 2048 block %" PRIu64 " %.1f (%.2f of the peak)\n", k_dims[d],
                   k_blocks[b], r, r / peak);
        }
    ms_gpu_gemm_close(g);
    return 0;
}

int main(int argc, char **argv)
{
    unsigned threads = 0;
    uint64_t rows = 2048;
    double seconds = 2.0;
    bool cuda = false, gram = false;
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--cuda"))
            cuda = true;
        else if (!strcmp(argv[i], "--gram"))
            gram = true;
        else if (!strcmp(argv[i], "--threads") && v)
            threads = (unsigned)strtoul(v, NULL, 10), i++;
        else if (!strcmp(argv[i], "--rows") && v)
            rows = strtoull(v, NULL, 10), i++;
        else if (!strcmp(argv[i], "--seconds") && v)
            seconds = strtod(v, NULL), i++;
        else
            return usage();
    }
    if (rows == 0 || rows > 65536 || !(seconds > 0) || (gram && !cuda))
        return usage();
    if (cuda)
        return cuda_peak(seconds, gram);
    if (threads)
        cpu_llama_blas_set_threads(threads);
    static const uint64_t k_shapes[][2] = {{2048, 2048}, {8192, 2048}, {2048, 8192}};
    cpu_llama_gemm g = cpu_llama_gemm_blas();
    double best = 0;
    for (size_t s = 0; s < sizeof k_shapes / sizeof k_shapes[0]; s++) {
        uint64_t n = k_shapes[s][0], k = k_shapes[s][1];
        float *a = malloc(rows * k * sizeof(float)), *b = malloc(n * k * sizeof(float)),
              *c = malloc(rows * n * sizeof(float));
        if (!a || !b || !c) {
            fprintf(stderr, "bench_sgemm: out of memory\n");
            return 1;
        }
        for (uint64_t i = 0; i < rows * k; i++)
            a[i] = (float)((i * 7919u) % 1000) * 1e-3f - 0.5f;
        for (uint64_t i = 0; i < n * k; i++)
            b[i] = (float)((i * 104729u) % 1000) * 1e-3f - 0.5f;
        g.gemm(g.ctx, true, rows, n, k, 1.0f, a, k, b, k, 0.0f, c, n, 0); /* warm up */
        double shape_best = 0, t_end = ms_now_seconds() + seconds;
        do {
            double t0 = ms_now_seconds();
            g.gemm(g.ctx, true, rows, n, k, 1.0f, a, k, b, k, 0.0f, c, n, 0);
            double dt = ms_now_seconds() - t0;
            double rate = 2.0 * (double)rows * (double)n * (double)k / dt / 1e9;
            shape_best = rate > shape_best ? rate : shape_best;
        } while (ms_now_seconds() < t_end);
        printf("sgemm %" PRIu64 "x%" PRIu64 "x%" PRIu64 ": %.1f GFLOP/s\n", rows, n, k, shape_best);
        best = shape_best > best ? shape_best : best;
        free(a);
        free(b);
        free(c);
    }
    printf("sgemm_peak_gflops %.1f\n", best);
    return 0;
}
