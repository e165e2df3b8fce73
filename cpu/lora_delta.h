/* LoRA deltas on the CPU: the rows of "base tensor + adapter" in fp32, for
 * one ms_lora_target (io/peft_adapter.h), computed row chunk by row chunk so
 * the adapted weight never exists as a whole.
 *
 * The arithmetic, exactly (every operation fp32 and rounded, no FMA
 * contraction; the build passes -ffp-contract=off):
 *   p[o][n]  = sum over k = 0..rank-1 of B[o][k] * A[k][n], summed in
 *              ascending k starting from the k = 0 product: ((b0*a0 + b1*a1)
 *              + b2*a2) + ...   (A, B widened exactly from F16/BF16/F32)
 *   d        = scale * p[o][n], placed at (o, n), or at (n, o) when the
 *              target is transposed (fan_in_fan_out, embeddings)
 *   v        = W + d            (W the base element, widened exactly)
 *   out      = v, or with DoRA f * v where f = (float)(m / sqrt(S)) is
 *              computed in fp64 from the magnitude m of the output feature and
 *              S = the fp64 sum of v^2 over that feature's elements, in
 *              DESIGN.md's fixed order (blocks of 65,536 elements in index
 *              order, each summed sequentially, then the block sums in block
 *              order). A plain LINEAR target's feature is a row; a transposed
 *              target's is a column (all rows): that needs a statistics pass.
 *   REPLACE  out = the replacing rows widened (the caller passes them as the
 *              "base" rows; cpu_lora_open takes no factors).
 * PEFT computes m / ||V|| with V in the weight's dtype and merges in that
 * dtype (variants.py, DoraLinearVariant / DoraEmbeddingVariant); we keep v in
 * fp32 and the norm in fp64, so a bf16 merge here is slightly more exact than
 * merge_and_unload, never different by more than its rounding.
 *
 * Why not cblas_sgemm: with OpenBLAS 0.3.21 (DYNAMIC_ARCH) the bits of an
 * sgemm element depend on M (measured: for rank >= 32, most chunk heights give
 * different bits than the whole-tensor call) and on the CPU's kernel (FMA or
 * not), which would break DESIGN.md's promise of the same bytes for every
 * chunking, machine and backend. The fixed order above is the same on every
 * machine and a CUDA port with --fmad=false reproduces it bit for bit. The
 * register-blocked kernel (cloned for AVX2 / AVX-512) runs within ~15% of
 * OpenBLAS's convert + sgemm (measured: 4096 x 4096, ranks 8-64, one
 * thread): a delta of small rank is bound by streaming its output.
 *
 * Results never depend on the chunking, the row order of the calls, the pool
 * or its size. */
#ifndef MS_LORA_DELTA_H
#define MS_LORA_DELTA_H

#include <stdbool.h>
#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "io/peft_adapter.h"
#include "io/st_format.h"

typedef struct cpu_lora cpu_lora;

/* Host bytes cpu_lora_open allocates for t: the factors widened to fp32
 * (4 * rank * (rows + cols)), the magnitude, and for a transposed DoRA target
 * the column statistics (28 bytes per column). Count it against the memory
 * budget while the object lives. */
uint64_t cpu_lora_host_bytes(const ms_lora_target *t);

/* Prepares target t (copied; t itself may go away): widens and, for a
 * transposed target, transposes the factors. a, b, magnitude are the whole
 * adapter tensors t->A, t->B, t->magnitude as raw little-endian bytes in
 * their dtypes (ms_peft_read_tensor; NULL where the target has none; all
 * NULL for REPLACE). Returns 0 and *out (close with cpu_lora_close), or
 * -ENOMEM. (cpu/ does not link io/, so the fault seam is the caller's: it
 * asks ms_fault_hit(MS_FAULT_HOST_ALLOC) before calling, if it wants one.) */
int cpu_lora_open(const ms_lora_target *t, const void *a, const void *b, const void *magnitude, cpu_lora **out);

/* NULL is a no-op. */
void cpu_lora_close(cpu_lora *l);

/* True for a DoRA target whose features are columns (transposed): every row
 * must go through cpu_lora_stats_rows, in row order, before any
 * cpu_lora_rows call. */
bool cpu_lora_needs_stats(const cpu_lora *l);

/* Statistics pass: feeds rows [row0, row0 + n_rows) of the base tensor
 * (base_rows: raw bytes in base_dtype, F16/BF16/F32, n_rows whole rows).
 * Chunks must arrive in row order without gaps or overlaps (row0 = the rows
 * fed so far; anything else aborts: a caller bug); the last chunk finishes
 * the column factors. The pool (NULL: the calling thread alone) splits the
 * columns. Blocks; never fails. */
void cpu_lora_stats_rows(cpu_lora *l, const void *base_rows, st_dtype base_dtype, uint64_t row0, uint64_t n_rows,
                         cpu_pool *pool);

/* Computes rows [row0, row0 + n_rows) of the adapted tensor into out
 * (n_rows * cols fp32, row-major) from the same rows of the base
 * (base_rows: raw bytes in base_dtype, F16/BF16/F32; for REPLACE and for a
 * target with a source tensor, the source's rows instead). Any chunking and
 * any order of calls give the same bits; after cpu_lora_open (and the
 * statistics pass where needed) the object is read-only, so several threads
 * may call this at once on different rows. The pool (NULL: the calling
 * thread alone) splits the rows. out must not overlap base_rows. Blocks;
 * never fails. */
void cpu_lora_rows(const cpu_lora *l, const void *base_rows, st_dtype base_dtype, uint64_t row0, uint64_t n_rows,
                   float *out, cpu_pool *pool);

#endif
