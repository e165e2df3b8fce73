/* Input statistics for Hessian-aware merging (DESIGN.md, Method semantics):
 * for one linear layer's input rows x (1 x dim each),
 *
 *     H = scale * sum over rows of x^T x      (scale = 2 / N_tokens in use)
 *
 * Accumulation: rows arrive in batches; X^T X of each batch is added by a
 * Gram function (cblas_ssyrk on the CPU; a GPU GEMM can replace it through
 * cpu_gram_fn) into an fp32 block that holds the upper triangle. After every
 * flush_rows rows the fp32 block is added into an fp64 matrix and cleared, so
 * no fp32 sum covers more than flush_rows rows however many tokens come; a
 * run with at most flush_rows rows never allocates the fp64 matrix (its
 * accumulation is fp32 only, which is where the token count does not call
 * for more). A batch that crosses a flush boundary is split there, so which
 * rows share an fp32 block depends only on their order, never on batching.
 *
 * Padding is the caller's business: it passes real rows only (the forward
 * pass packs the unpadded tokens, cpu/llama_forward.h).
 *
 * Memory: 4 * dim^2 bytes for the fp32 block, plus 8 * dim^2 once more than
 * flush_rows rows were added (cpu_hessian_host_bytes).
 *
 * Threading: an accumulator is used by one thread at a time. */
#ifndef MS_HESSIAN_ACCUM_H
#define MS_HESSIAN_ACCUM_H

#include <stdbool.h>
#include <stdint.h>

#define CPU_HESSIAN_FLUSH_ROWS 4096u /* default rows per fp32 block */

/* C[dim, dim] (row-major, upper triangle including the diagonal; the strict
 * lower triangle may be left untouched or written, it is never read) +=
 * X^T X, where X is n_rows x dim with leading dimension ldx (>= dim). The
 * seam where a GPU GEMM replaces the CPU's; ctx is the implementation's.
 * Returns 0, or (a GPU's) -ENOMEM (device memory ran out: C unchanged, a
 * retry elsewhere is fine), -EIO (a sticky device error: C unchanged) or
 * -EFAULT (a device error after C was partly updated: C is lost). */
typedef int (*cpu_gram_fn)(void *ctx, const float *x, uint64_t n_rows, uint64_t dim, uint64_t ldx, float *c);

/* The CPU implementation: cblas_ssyrk (upper, transposed), OpenBLAS's
 * threads. ctx is unused. Returns 0. */
int cpu_gram_blas(void *ctx, const float *x, uint64_t n_rows, uint64_t dim, uint64_t ldx, float *c);

typedef struct cpu_hessian cpu_hessian;

/* Bytes an accumulator of this size holds, with or without its fp64 matrix. */
uint64_t cpu_hessian_host_bytes(uint64_t dim, bool with_fp64);

/* A zeroed accumulator for dim-wide rows, flushing to fp64 every flush_rows
 * rows (0: CPU_HESSIAN_FLUSH_ROWS). Returns 0 and *out (close with
 * cpu_hessian_close), or -ENOMEM, or -EOVERFLOW when dim^2 does not fit in memory
 * sizes. */
int cpu_hessian_open(uint64_t dim, uint64_t flush_rows, cpu_hessian **out);

/* NULL is a no-op. */
void cpu_hessian_close(cpu_hessian *h);

/* The fp64 matrix from alloc (ctx theirs; freed with free_fn) instead of
 * calloc: a GPU's pinned host memory, so that a sum held on the device
 * comes back at the bus's full speed. alloc may return NULL: calloc then.
 * Only before the fp64 matrix exists. */
void cpu_hessian_set_fp64_alloc(cpu_hessian *h, void *(*alloc)(void *ctx, uint64_t bytes),
                                void (*free_fn)(void *ctx, void *p), void *ctx);

/* Back to zero rows, keeping the allocations (the next layer's statistics
 * reuse the same memory instead of faulting in fresh pages). No pass over
 * the memory: the matrices are marked zero and cleared, or assigned, when
 * rows next come. */
void cpu_hessian_reset(cpu_hessian *h);

/* Allocates now the fp64 matrix that adding more_rows rows would need (a
 * flush inside them), so that cpu_hessian_add of those rows cannot fail on
 * host memory. Returns 0 or -ENOMEM (nothing changed). */
int cpu_hessian_reserve(cpu_hessian *h, uint64_t more_rows);

/* Adds n_rows rows of x (n_rows x dim, leading dimension ldx >= dim) through
 * gram(gram_ctx, ...), one call per stretch of rows between flushes.
 * Returns 0; or -ENOMEM when the fp64 matrix is needed and cannot be
 * allocated (never after cpu_hessian_reserve for these rows): the rows up to
 * the failed flush are counted and the accumulator must be closed; or the
 * Gram function's error (a GPU's -ENOMEM, -EIO, -EFAULT): the rows before
 * the failing call are added (cpu_hessian_rows counts them) and the failing
 * call's are not, so after -ENOMEM or -EIO the caller may add the remaining
 * rows with another Gram function and the sum is complete; after -EFAULT the
 * accumulator is corrupt (close it). Blocks while the Gram function runs. */
int cpu_hessian_add(cpu_hessian *h, const float *x, uint64_t n_rows, uint64_t ldx, cpu_gram_fn gram,
                    void *gram_ctx);

/* Rows [r0, r0 + n) of a sum of x^T x computed elsewhere (a GPU's
 * accumulator), written into buf (n x dim fp64, row-major; only the upper
 * triangle, j >= i, is read). Returns 0 or a negative errno. */
typedef int (*cpu_sum_rows_fn)(void *ctx, uint64_t r0, uint64_t n, double *buf);

/* Adds such a sum over `rows` rows into the fp64 matrix and counts the
 * rows: where the matrix holds nothing yet (no flush since the last reset,
 * the GPU's usual case) get writes all of it in place in one call, else a
 * few rows at a time through a buffer of at most 8 MiB. Returns 0, -ENOMEM
 * (the fp64 matrix or the buffer: nothing added), or get's error: then part
 * of the sum was added and the accumulator must be closed. */
int cpu_hessian_add_sum(cpu_hessian *h, uint64_t rows, cpu_sum_rows_fn get, void *ctx);

/* Rows added so far, and the width. */
uint64_t cpu_hessian_rows(const cpu_hessian *h);
uint64_t cpu_hessian_dim(const cpu_hessian *h);

/* Writes rows [row0, row0 + n_rows) of the full symmetric matrix
 * scale * sum x^T x into out (n_rows x dim fp32, row-major): each element is
 * computed in fp64 (fp64 matrix + fp32 block, times scale) and rounded to
 * fp32 once. The accumulator is not changed; any row ranges in any order. */
void cpu_hessian_rows_out(const cpu_hessian *h, double scale, uint64_t row0, uint64_t n_rows, float *out);

#endif
