/* The causal attention of a batch on the device (gpu_gemm.h, gpu_gemm_attend). */
#include "gpu/gpu_gemm_internal.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define GA_SCORE_BYTES ((uint64_t)256 << 20) /* most device bytes of scores at once */
#define GA_THREADS 256u

/* Query rows per block of the scores (gpu_gemm_set_attend_block_rows; 0: from GA_SCORE_BYTES). */
static uint64_t g_attend_block_rows = 0;

void gpu_gemm_set_attend_block_rows(uint64_t rows) { g_attend_block_rows = rows; }

/* Softmax of the scores of one block in place, one warp per row: row r =
 * rep * nq + i holds query q0 + i's scores against keys kl .. kl + nk - 1 of
 * the sequence (pos: the sequence's positions). Keys outside [window_first,
 * query] become 0, as on the CPU. */
__global__ static void k_attend_softmax(float *S, uint64_t n_rows, uint64_t nq, uint64_t nk, uint64_t q0,
                                        uint64_t kl, const uint32_t *pos, uint64_t window)
{
    uint64_t r = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32u;
    unsigned lane = threadIdx.x & 31u;
    if (r >= n_rows)
        return; /* whole warps */
    uint64_t i = q0 + r % nq;
    uint64_t lo = cpu_llama_window_first(pos, i, window) - kl, hi = i - kl;
    float *row = S + r * nk;
    float mx = -INFINITY;
    for (uint64_t k = lo + lane; k <= hi; k += 32u)
        mx = row[k] > mx ? row[k] : mx;
    for (unsigned o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, mx, (int)o);
        mx = other > mx ? other : mx;
    }
    float sum = 0.0f;
    for (uint64_t k = lo + lane; k <= hi; k += 32u) {
        float e = expf(row[k] - mx);
        row[k] = e;
        sum += e;
    }
    for (unsigned o = 16; o > 0; o >>= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, (int)o);
    float inv = 1.0f / sum;
    __syncwarp();
    for (uint64_t k = lane; k < nk; k += 32u)
        row[k] = k >= lo && k <= hi ? row[k] * inv : 0.0f;
}

/* Query rows per block for a sequence of T rows: all of them when the
 * scores of every head sharing a kv head fit GA_SCORE_BYTES. */
static uint64_t ga_block_rows(uint64_t T, uint64_t n_rep)
{
    if (g_attend_block_rows)
        return g_attend_block_rows < T ? g_attend_block_rows : T;
    uint64_t rows = GA_SCORE_BYTES / (n_rep * T * 4);
    return rows < 1 ? 1 : rows < T ? rows : T;
}

/* Enqueues one sequence's attention (rows r0 .. r0 + T of the batch) on the
 * stream: per kv head and query block, the scores of each of its query
 * heads (cublasSgemm), their softmax, and the weighted values into d_attn.
 * Row-major to column-major as at the top of this file: the row-major
 * scores S [nq, nk] = scale Q [nq, hd] K^T are the column-major S^T =
 * K Q^T, with Q and K read in place from the qkv rows (leading dimension
 * QKV); the output O [nq, hd] = P V is O^T = V^T P^T, written into the
 * head's columns of the attention rows. */
static cublasStatus_t ga_sequence(gpu_gemm *g, const cpu_llama_attend_args *a, uint64_t r0, uint64_t T,
                                  const float *d_qkv, const uint32_t *d_pos, float *d_S, float *d_attn)
{
    uint64_t hd = a->head_dim, n_rep = a->n_heads / a->n_kv_heads, qd = a->n_heads * hd,
             kvd = a->n_kv_heads * hd, QKV = qd + 2 * kvd, QB = ga_block_rows(T, n_rep);
    const float one = 1.0f, zero = 0.0f;
    for (uint64_t kv = 0; kv < a->n_kv_heads; kv++) {
        for (uint64_t q0 = 0; q0 < T; q0 += QB) {
            uint64_t q1 = q0 + QB < T ? q0 + QB : T, nq = q1 - q0;
            /* the first key any query of the block sees (from the host's positions) */
            uint64_t kl = cpu_llama_window_first(a->pos + r0, q0, a->window), nk = q1 - kl;
            const float *K = d_qkv + (r0 + kl) * QKV + qd + kv * hd, *V = K + kvd;
            for (uint64_t rep = 0; rep < n_rep; rep++) {
                const float *Qh = d_qkv + (r0 + q0) * QKV + (kv * n_rep + rep) * hd;
                cublasStatus_t st = cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nk, (int)nq, (int)hd,
                                                &a->scale, K, (int)QKV, Qh, (int)QKV, &zero, d_S + rep * nq * nk,
                                                (int)nk);
                if (st != CUBLAS_STATUS_SUCCESS)
                    return st;
            }
            uint64_t rows = n_rep * nq;
            uint64_t blocks = (rows * 32u + GA_THREADS - 1) / GA_THREADS;
            k_attend_softmax<<<(unsigned)blocks, GA_THREADS, 0, g->stream>>>(d_S, rows, nq, nk, q0, kl, d_pos + r0,
                                                                              a->window);
            if (cudaPeekAtLastError() != cudaSuccess)
                return CUBLAS_STATUS_EXECUTION_FAILED;
            for (uint64_t rep = 0; rep < n_rep; rep++) {
                float *O = d_attn + (r0 + q0) * qd + (kv * n_rep + rep) * hd;
                cublasStatus_t st = cublasSgemm(g->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)hd, (int)nq, (int)nk, &one,
                                                V, (int)QKV, d_S + rep * nq * nk, (int)nk, &zero, O, (int)qd);
                if (st != CUBLAS_STATUS_SUCCESS)
                    return st;
            }
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

uint64_t ga_score_bytes(const cpu_llama_attend_args *a)
{
    uint64_t n_rep = a->n_heads / a->n_kv_heads, elems = 1;
    for (uint64_t s = 0; s < a->n_seqs; s++) {
        uint64_t n = a->seq_start[s + 1] - a->seq_start[s];
        GPU_ASSERT(n <= INT32_MAX);
        uint64_t e = n ? n_rep * ga_block_rows(n, n_rep) * n : 0;
        elems = e > elems ? e : elems;
    }
    return elems * 4;
}

cublasStatus_t ga_enqueue(gpu_gemm *g, const cpu_llama_attend_args *a, const float *d_qkv, const uint32_t *d_pos,
                          float *d_scores, float *d_attn)
{
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    for (uint64_t s = 0; s < a->n_seqs && st == CUBLAS_STATUS_SUCCESS; s++) {
        uint64_t r0 = a->seq_start[s], n = a->seq_start[s + 1] - r0;
        if (n)
            st = ga_sequence(g, a, r0, n, d_qkv, d_pos, d_scores, d_attn);
    }
    return st;
}

int gpu_gemm_attend(gpu_gemm *g, const cpu_llama_attend_args *a)
{
    uint64_t T = a->n_tokens, hd = a->head_dim, qd = a->n_heads * hd, QKV = qd + 2 * a->n_kv_heads * hd;
    GPU_ASSERT(a->n_kv_heads >= 1 && a->n_heads % a->n_kv_heads == 0 && QKV <= INT32_MAX);
    int rc0 = gg_check_usable(g);
    if (rc0 < 0)
        return rc0;
    if (T == 0)
        return 0;
    uint64_t score_bytes = ga_score_bytes(a);
    uint64_t needs = (T * QKV + T * qd) * 4 + score_bytes + T * 4;
    gg_buf buf[4] = {}; /* qkv, attn, scores, positions */
    const char *what = "device allocation";
    cudaError_t rc = gg_take(g, T * QKV * 4, &buf[0]);
    if (rc == cudaSuccess)
        rc = gg_take(g, T * qd * 4, &buf[1]);
    if (rc == cudaSuccess)
        rc = gg_take(g, score_bytes, &buf[2]);
    if (rc == cudaSuccess)
        rc = gg_take(g, T * 4, &buf[3]);
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (qkv)";
        rc = cudaMemcpyAsync(buf[0].ptr, a->qkv, (size_t)(T * QKV * 4), cudaMemcpyHostToDevice, g->stream);
    }
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (positions)";
        rc = cudaMemcpyAsync(buf[3].ptr, a->pos, (size_t)(T * 4), cudaMemcpyHostToDevice, g->stream);
    }
    if (rc != cudaSuccess) {
        gg_drain(g);
        gg_give(g, buf, 4);
        return gg_cuda_fail(g, rc, what, needs);
    }
    cublasStatus_t st = ga_enqueue(g, a, (const float *)buf[0].ptr, (const uint32_t *)buf[3].ptr,
                                   (float *)buf[2].ptr, (float *)buf[1].ptr);
    if (st != CUBLAS_STATUS_SUCCESS) {
        gg_drain(g);
        gg_give(g, buf, 4);
        return gg_blas_fail(g, st, "attention (cublasSgemm, softmax kernel)", needs);
    }
    rc = gg_drain(g); /* before attn is written: a failed kernel leaves it untouched */
    what = "attention";
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (attention back)";
        rc = cudaMemcpyAsync(a->attn, buf[1].ptr, (size_t)(T * qd * 4), cudaMemcpyDeviceToHost, g->stream);
        cudaError_t rc2 = gg_drain(g);
        rc = rc != cudaSuccess ? rc : rc2;
    }
    gg_give(g, buf, 4);
    return rc == cudaSuccess ? 0 : gg_cuda_fail(g, rc, what, needs);
}
