/* Where `hessian`'s statistics go once a layer's are complete: the output's
 * bytes (each statistic's full symmetric matrix, scaled by 2 / N, in fp32)
 * are made on the thread pool into a buffer, and a writer thread of the
 * sink's own hashes and writes them while the next layer runs.
 *
 * With a buffer that holds a layer's statistics (ms_hessian_layer_bytes),
 * the layer's output is converted at once and its writing overlaps the next
 * layer; with a smaller one the statistics go in pieces of the buffer's
 * size, each converted once the last piece is written, and only the last
 * piece overlaps. One buffer in flight either way: memory is the buffer.
 *
 * A layer whose statistics are still on the GPU (ms_llama_run's
 * on_stats_device) skips the host's conversion: the GPU writes the output
 * bytes straight into the buffer (pinned, when the sink is given a pinned
 * allocator, so the copy runs while the next layer does), and the writer
 * waits for that copy before it hashes and writes them.
 *
 * Thread use: ms_hessian_sink_stats and the rest from one thread, the one
 * that runs the layers (it also uses the pool); the writer thread only
 * writes through the st_writer, which nothing else may touch until
 * ms_hessian_sink_drain has returned. */
#ifndef MS_HESSIAN_SINK_H
#define MS_HESSIAN_SINK_H

#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "cpu/hessian_accum.h"
#include "cpu/llama_forward.h"
#include "io/ms_error.h"
#include "io/st_writer.h"
#include "pipeline/llama_run.h"

typedef struct ms_hessian_sink ms_hessian_sink;

/* Where the buffer comes from (a GPU's pinned memory); alloc may return
 * NULL: malloc then. */
typedef struct ms_hessian_sink_mem {
    void *(*alloc)(void *ctx, uint64_t bytes);
    void (*free)(void *ctx, void *p);
    void *ctx;
} ms_hessian_sink_mem;

/* Bytes of one layer's statistics as written (the largest set the sink is
 * handed: the head's statistic is one hidden x hidden matrix). */
uint64_t ms_hessian_layer_bytes(const cpu_llama_config *cfg);

/* A sink writing into w, laid out by plan: layer l's statistic k is tensor
 * l * MS_LLAMA_STAT_COUNT + k, the head's the one after the last layer's.
 * buf_bytes: the buffer, at least one row of the widest statistic; from mem
 * when given (NULL: malloc; it must outlive the sink). Returns 0 and *out,
 * or -1 with err set (nothing left open). */
int ms_hessian_sink_open(st_writer *w, const st_plan *plan, uint64_t n_layers, uint64_t buf_bytes, cpu_pool *pool,
                         const ms_hessian_sink_mem *mem, ms_hessian_sink **out, ms_error *err);

/* ms_llama_run_opts.on_stats (ctx: the sink): waits until the writer has
 * taken the last layer's output, converts these statistics and hands them
 * to the writer. Returns 0, or -1 with err set: a write of an earlier
 * layer's failed (its message), and the sink writes nothing more. */
int ms_hessian_sink_stats(void *ctx, uint64_t layer, cpu_hessian *const *stats, unsigned n, ms_error *err);

/* ms_llama_run_opts.on_stats_device (ctx: the sink): with a buffer that
 * holds the whole layer, waits until the writer is done with it, has the
 * GPU write each statistic's output bytes into it (dev->out) and hands them
 * to the writer, which waits for them (dev->wait) before writing. Returns 0;
 * 1 when the buffer is smaller than the layer (nothing taken); -1 with err
 * set: an earlier write failed, or a statistic was lost on the GPU. */
int ms_hessian_sink_stats_device(void *ctx, uint64_t layer, const ms_llama_dev_stats *dev, ms_error *err);

/* Waits for every write handed over; returns 0, or -1 with the first
 * failure's message in err. */
int ms_hessian_sink_drain(ms_hessian_sink *s, ms_error *err);

/* After a drain: how many statistics (output tensors) hold a NaN or Inf on
 * their diagonal, where any non-finite input row shows, and the plan index
 * of the first in *first_tensor (when any). */
uint64_t ms_hessian_sink_nonfinite(const ms_hessian_sink *s, size_t *first_tensor);

/* Stops the writer after the write in progress (a failed run does not wait
 * for the rest) and frees the sink. NULL is a no-op. */
void ms_hessian_sink_close(ms_hessian_sink *s);

#endif
