/* cuBLAS behind the forward pass's GEMM seam (cpu/llama_forward.h,
 * cpu_llama_gemm): fp32 GEMMs and Gram updates for `mergestream hessian`
 * and `mergestream perplexity`. Plain C, no CUDA types, so pipeline/ calls it
 * through the backend registry without including CUDA headers.
 *
 * Arithmetic: cublasSgemm / cublasSsyrk in fp32 with CUBLAS_DEFAULT_MATH (no
 * TF32 tensor cores: the products round like OpenBLAS's fp32, up to the
 * order of the sums). Results are close to the CPU's, not identical.
 *
 * Memory: one own stream and cuBLAS handle; device buffers come from a
 * gpu_mempool (gpu/gpu_mempool.h) capped at memory_limit, so operands of
 * similar sizes reuse cached blocks and the steady state allocates nothing
 * from the driver. A weight (a B operand flagged as one) stays on the device
 * keyed by host pointer and shape until gpu_gemm_forget_weights: one upload
 * per layer (per lm_head slice), not one per batch. Every request asks the
 * fault seam first (MS_FAULT_GPU_ALLOC, through the pool).
 *
 * Failure contract. Every call returns 0 or a negative errno:
 *   -ENOMEM  device memory ran out (cudaErrorMemoryAllocation, cuBLAS's
 *            ALLOC_FAILED, --gpu-memory-limit, the fault seam). Not sticky:
 *            the error is cleared, the cached weights and the pool's cache
 *            are freed, the output is unchanged; later calls may succeed.
 *   -EIO     a sticky CUDA error (illegal address, launch failure, a lost
 *            device): the object is broken, every later call returns -EIO
 *            at once. The output is unchanged, except for gpu_gemm_gram's
 *            -EFAULT below.
 *   -EFAULT  (gram only) a sticky error while the result was being added
 *            into C: C is partly updated and must be discarded.
 * gpu_gemm_last_error describes the last failure in one line.
 *
 * Threading: one thread at a time per object. Every call blocks until its
 * results are in host memory. */
#ifndef MS_GPU_GEMM_H
#define MS_GPU_GEMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gpu_gemm gpu_gemm;

/* Opens device `device` with at most memory_limit bytes of device buffers
 * (0: no cap but the device's). Creates the context, a stream and a cuBLAS
 * handle; allocates no buffer. Returns 0 and *out (close with
 * gpu_gemm_close), or -1 with a one-line reason in why. */
int gpu_gemm_open(int device, uint64_t memory_limit, gpu_gemm **out, char *why, size_t why_len);
/* Frees everything; NULL is a no-op. */
void gpu_gemm_close(gpu_gemm *g);
/* The device's name ("NVIDIA H100 80GB HBM3"). */
const char *gpu_gemm_device_name(const gpu_gemm *g);

/* C[m, n] = alpha * A[m, k] * op(B) + beta * C, row-major with leading
 * dimensions lda, ldb, ldc (cpu_gemm_fn's contract): op(B) = B^T with B
 * stored [n, k] when trans_b, else B stored [k, n]. beta = 0 ignores C's old
 * contents. b_is_weight: B is a weight that stays unchanged until the next
 * gpu_gemm_forget_weights, so it is uploaded once and kept (keyed by b, its
 * shape and ldb). Returns 0, -ENOMEM or -EIO (C unchanged on failure). */
int gpu_gemm_sgemm(gpu_gemm *g, bool trans_b, uint64_t m, uint64_t n, uint64_t k, float alpha, const float *a,
                   uint64_t lda, const float *b, uint64_t ldb, bool b_is_weight, float beta, float *c, uint64_t ldc);

/* C[dim, dim] (row-major, upper triangle with the diagonal) += X^T X for X
 * n_rows x dim with leading dimension ldx (cpu_gram_fn's contract; the strict
 * lower triangle of C is not touched). X^T X is computed on the device
 * (cublasSsyrk), copied back in row blocks and added on the host in fp32.
 * Returns 0, -ENOMEM, -EIO (C unchanged) or -EFAULT (see above). */
int gpu_gemm_gram(gpu_gemm *g, const float *x, uint64_t n_rows, uint64_t dim, uint64_t ldx, float *c);

/* Forgets every cached weight (their device blocks go back to the pool's
 * cache, for the next layer's weights of the same sizes). Call whenever the
 * host memory of a weight passed with b_is_weight changes. */
void gpu_gemm_forget_weights(gpu_gemm *g);

/* One line about the last failure: "needs 512 MiB, 300 MiB free" for
 * -ENOMEM, "cublasSgemm: an illegal memory access..." for -EIO; "" when
 * none. */
const char *gpu_gemm_last_error(const gpu_gemm *g);

/* Device bytes the pool holds now (in use, cached weights and cache). */
uint64_t gpu_gemm_held_bytes(const gpu_gemm *g);

/* The best fp32 cublasSgemm rate (GFLOP/s) of the device, on device-resident
 * operands at the Llama-3.2-1B linear-layer shapes (2048 rows; N x K = 2048 x
 * 2048, 8192 x 2048, 2048 x 8192), each repeated for about seconds / 3.
 * Returns it, or -1 with gpu_gemm_last_error set. */
double gpu_gemm_peak_gflops(gpu_gemm *g, double seconds);

/* Statistics held on the device for a whole layer: the accumulator of
 * cpu/hessian_accum.h (fp32 blocks of at most flush_rows rows, added into
 * fp64) in device memory, so a batch's Gram update sends its rows up and
 * nothing back; the sum comes back once, at the end. Slots 0..7.
 *   stat_begin  allocates and zeroes a slot for dim-wide rows: 0, -ENOSPC
 *               (it would take more than half of the memory left: kept
 *               for the layer's weights and operands), -ENOMEM or -EIO.
 *   stat_add    adds X^T X of n_rows rows (cpu_gram_fn's X): 0; -ENOMEM
 *               before anything was added (the rows may be added elsewhere);
 *               -EIO (sticky) otherwise: the slot's sum is lost.
 *   stat_rows   rows added so far (0 for a closed slot).
 *   stat_read   rows [r0, r0 + n) of the sum in fp64 (row-major, upper
 *               triangle; cpu_sum_rows_fn's contract): 0 or -EIO.
 *   stat_finish adds the slot's sum and rows into the host accumulator h
 *               (cpu_hessian_add_sum, reading through stat_read) and frees
 *               the slot; h NULL only frees it. 0, -ENOMEM (nothing added)
 *               or -EIO (h partly updated: close it).
 *   stat_end    frees the slot (a closed slot: no-op). */
int gpu_gemm_stat_begin(gpu_gemm *g, unsigned slot, uint64_t dim, uint64_t flush_rows);
int gpu_gemm_stat_add(gpu_gemm *g, unsigned slot, const float *x, uint64_t n_rows, uint64_t ldx);
uint64_t gpu_gemm_stat_rows(const gpu_gemm *g, unsigned slot);
int gpu_gemm_stat_read(gpu_gemm *g, unsigned slot, uint64_t r0, uint64_t n, double *buf);
struct cpu_hessian;
int gpu_gemm_stat_finish(gpu_gemm *g, unsigned slot, struct cpu_hessian *h);
void gpu_gemm_stat_end(gpu_gemm *g, unsigned slot);
/*   stat_out    instead of stat_finish: the slot's sum times scale as
 *               cpu_hessian_rows_out writes it (the full symmetric dim x dim
 *               matrix in fp32, row-major: the same bits as stat_finish into
 *               a fresh accumulator, then rows_out) into dst, converted on
 *               the device and copied back behind the caller's next calls
 *               (dst pinned: else the copy waits), and the slot freed at
 *               once. 0 or -EIO (sticky: the sum is lost).
 *   stat_out_wait  returns once every stat_out so far has landed in dst: 0,
 *               or -EIO. The one call that may run on another thread
 *               while this object is in use. */
int gpu_gemm_stat_out(gpu_gemm *g, unsigned slot, double scale, float *dst);
int gpu_gemm_stat_out_wait(gpu_gemm *g);

/* Pinned host memory (cudaMallocHost) for the forward pass's batch buffers:
 * their copies to and from the device run at full PCIe speed. NULL when it
 * cannot be had (the caller uses malloc). gpu_gemm_host_free(NULL) is a
 * no-op. */
void *gpu_gemm_host_alloc(gpu_gemm *g, uint64_t bytes);
void gpu_gemm_host_free(gpu_gemm *g, void *p);

/* The causal attention of a batch on the device (cpu_attend_fn's contract,
 * cpu/llama_forward.h): the q/k/v rows go up once, the scores, their
 * softmax and the weighted values stay on the device, the attention rows
 * come back. The softmax uses the device's expf, so the result is within
 * rounding of the CPU's, not identical. Returns 0, -ENOMEM or -EIO (attn
 * untouched on failure). */
struct cpu_llama_attend_args;
int gpu_gemm_attend(gpu_gemm *g, const struct cpu_llama_attend_args *a);

/* A whole decoder layer on the device (cpu_layer_fn's contract,
 * cpu/llama_forward.h): the residual rows go up, every step of the layer
 * runs on the stream with the weights (and the RoPE table) cached on the
 * device, the statistics slots named in a->stat_slot get the linear
 * inputs' X^T X, and the residual rows and the inputs a->input asks for
 * come back. Within rounding of the CPU's layer. 0, -ENOMEM (before any
 * work: nothing changed) or -EIO. */
struct cpu_llama_layer_args;
int gpu_gemm_layer(gpu_gemm *g, const struct cpu_llama_layer_args *a);

/* Where the device's time went in whole layers (gpu_gemm_layer), summed
 * over every call so far: CUDA events recorded between the layer's steps
 * on its stream, so these are the stream's seconds (idle is the stream
 * waiting between the layer's work and the copy back, i.e. the host's
 * synchronisation), not the host's. Timing never fails a layer: a call
 * whose events fail adds nothing. */
typedef enum gpu_layer_phase {
    GPU_LAYER_UPLOAD,      /* residual rows and positions up */
    GPU_LAYER_LINEAR,      /* the four linear layers' cublasSgemm */
    GPU_LAYER_ATTENTION,   /* scores, softmax, weighted values */
    GPU_LAYER_ELEMENTWISE, /* RMSNorm, biases, RoPE, SwiGLU, residual adds */
    GPU_LAYER_STATISTICS,  /* the Gram updates and their fp64 flushes */
    GPU_LAYER_IDLE,        /* the stream waiting on the host before the copy back */
    GPU_LAYER_DOWNLOAD,    /* residual rows (and inputs asked for) back */
    GPU_LAYER_PHASES
} gpu_layer_phase;
const char *gpu_layer_phase_name(gpu_layer_phase p); /* "upload", "linear", ... */
void gpu_gemm_layer_seconds(const gpu_gemm *g, double out[GPU_LAYER_PHASES]);

/* Tuning (MERGESTREAM_GPU_ATTEND_ROWS) and tests: query rows per block of
 * the scores (0: as many as fit 256 MiB). Smaller blocks skip more of the
 * causal mask's zero half (each block's keys end at its last query) for
 * more, smaller GEMMs; in tests small sequences cross block boundaries.
 * Process-wide; call before any attention. */
void gpu_gemm_set_attend_block_rows(uint64_t rows);

/* Tuning (MERGESTREAM_GPU_GRAM_BLOCK): every Gram update of this object
 * (gpu_gemm_gram, the statistics held on the device) by column blocks of
 * `block` columns, a cublasSsyrk on each diagonal block and one
 * cublasSgemm for the rows below it, in place of one cublasSsyrk over the
 * whole matrix (block 0, the default). The same sums in another order:
 * within rounding of each other. */
void gpu_gemm_set_gram_block(gpu_gemm *g, uint64_t block);

/* The Gram update's rate (useful GFLOP/s: dim (dim + 1) rows per update)
 * on device-resident operands, dim x dim from rows rows, with column blocks
 * of `block` (0: one cublasSsyrk), repeated for about `seconds`. Returns
 * it, or -1 with gpu_gemm_last_error set. */
double gpu_gemm_gram_gflops(gpu_gemm *g, uint64_t dim, uint64_t rows, uint64_t block, double seconds);

/* Tests only (the sticky path on demand): the next gpu_gemm_sgemm or
 * gpu_gemm_gram fails as if the device had hit a sticky error (-EIO, the
 * object broken) without touching the device. */
void gpu_gemm_fail_next_for_tests(gpu_gemm *g);

#ifdef __cplusplus
}
#endif

#endif
