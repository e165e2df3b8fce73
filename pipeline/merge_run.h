/* Running a planned merge: the three overlapping stages (DESIGN.md, Data
 * flow 2-4).
 *
 *   reader thread --(a compute queue per worker)--> compute workers --(write queue)--> writer thread
 *
 * The reader takes staging buffers from the pool in plan order and reads each
 * chunk's inputs through the I/O engine; the pool's size is the back-pressure
 * that bounds memory. A compute worker runs each chunk's passes on the GPU
 * or on the CPU kernels (all threads of the cpu pool on one chunk at a time,
 * one worker at a time), the chunks of a tensor in row order, as the
 * statistics passes require: every item of a job goes to the same worker.
 * With a GPU there are two workers (env->compute_workers), so one tensor's
 * copies to and from the device overlap another's kernels, and a tensor on
 * the CPU may run while another is on the GPU; without one, a single worker
 * (the calling thread). The writer
 * hashes each tensor's bytes in order, counts non-finite values and writes
 * them at their planned offsets; shards are committed as they complete.
 *
 * The first failure in any stage stops all three: the pool and both queues
 * are shut down, every thread is joined, and the error is returned. */
#ifndef MS_MERGE_RUN_H
#define MS_MERGE_RUN_H

#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "io/io_engine.h"
#include "io/st_writer.h"
#include "pipeline/backend_registry.h"
#include "pipeline/merge_journal.h"
#include "pipeline/merge_plan.h"
#include "pipeline/shard_check.h"
#include "pipeline/staging_pool.h"

typedef struct ms_tensor_result {
    const char *backend;  /* "cpu", "cuda", "cuda+cpu", "copy" or "kept" */
    bool used_cpu, used_gpu;
    uint64_t nonfinite;   /* NaN or Inf values in the output tensor */
    bool differs_from_base; /* some output byte differs from the base's (merged tensors) */
} ms_tensor_result;

typedef struct ms_run_stats {
    uint64_t tensors_cpu, tensors_gpu, tensors_mixed, tensors_copied, tensors_kept; /* kept: from an earlier run (--resume); mixed: some chunks on each */
    uint64_t gpu_fallbacks;  /* passes (and Hessian factorisations) that ran on the CPU after a GPU out-of-memory */
    uint64_t gpu_factorisations; /* Hessian-aware methods: Cholesky factorisations on the GPU */
    bool gpu_disabled;       /* a sticky GPU error stopped GPU use mid-run */
    uint64_t bytes_read, bytes_written;
    uint64_t bytes_read_direct;    /* of bytes_read, read with O_DIRECT (ms_merge_open_direct) */
    uint64_t nonfinite_values, nonfinite_tensors;
    uint64_t chunked_tensors;
    uint64_t chunked_pass_skipped; /* tensors in row chunks read once less: HIST_HI's capture made HIST_LO idle */
    uint64_t tensors_equal_to_base; /* merged tensors whose output bytes equal the base's */
    double wall_s;
    double busy_read_s, busy_compute_s, busy_write_s; /* per-stage busy time (compute: summed over workers) */
    unsigned compute_workers;
    ms_tensor_result *tensors; /* one per job, owned by the caller (ms_run_stats_free) */
} ms_run_stats;

typedef struct ms_run_env {
    ms_plan *plan;
    const st_plan *layout; /* output tensor i = plan job i */
    st_writer *writer;
    ms_pool *pool;
    cpu_pool *cpu;
    io_engine *engine;
    ms_journal *journal;   /* finished shards are recorded here (may be NULL) */
    ms_shard_check *shard_check; /* and posted here to be read back while cached (may be NULL) */
    const bool *skip_job;  /* resume: jobs whose shard was kept from an earlier run (may be NULL) */
    ms_gpu *gpu;           /* the GPU backend, or NULL: CPU only */
    unsigned compute_workers; /* 1 or 2 (0 is taken as 1): 2 overlaps tensors on a GPU */
    uint64_t readahead_cap;   /* most staging bytes in use before the reader reads more: 0 picks it from the
                               * largest chunk and whether the inputs are in the page cache (merge_run.c),
                               * so a hot merge keeps reusing the pool's first pages; UINT64_MAX is the
                               * whole pool (a pinned, prefaulted pool) */
} ms_run_env;

/* Opens O_DIRECT descriptors of the plan's input files (io/direct_read.h),
 * through which ms_merge_run then reads every tensor it reads once, whole
 * (--direct-io). Keeps the page cache for a file that is (90%) in it
 * already, and for one whose file system refuses O_DIRECT (a line says
 * which). Call before ms_merge_run, from the thread that owns the plan.
 * Returns the number of input files read with O_DIRECT.
 *
 * Not the default: on this project's VM a cold 7 GB merge took 6.5-8.7 s
 * with it against 8.6-11 s without (reading through the cache fills it with
 * fresh pages, costly there), but 7.0-7.4 s against 6.0-6.5 s in a 1 GiB
 * memory cgroup, where the cache recycles its pages (bench/RESULTS.md); and
 * a merge that reads through the cache leaves the next run a hot one. */
unsigned ms_merge_open_direct(ms_plan *plan);

/* Runs every job of env->plan. Returns 0 and fills *stats, or -1 with err set
 * (the first failure of any stage). The writer is not finished or aborted
 * here: the caller does that. */
int ms_merge_run(const ms_run_env *env, ms_run_stats *stats, ms_error *err);

void ms_run_stats_free(ms_run_stats *stats);

#endif
