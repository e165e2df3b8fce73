/* A fixed pool of worker threads for the CPU kernels.
 *
 * cpu_pool_run hands out tasks 0..n_tasks-1 to the workers and to the calling
 * thread, and returns when every task has run. Which worker runs which task
 * is unspecified: a task's result must not depend on it (the kernels give
 * each worker private scratch, indexed by the worker number, and combine
 * per-task results in task order).
 *
 * One thread at a time may call cpu_pool_run on a pool (the compute stage);
 * a task must not call cpu_pool_run. */
#ifndef MS_CPU_POOL_H
#define MS_CPU_POOL_H

typedef struct cpu_pool cpu_pool;

/* Starts n_threads - 1 worker threads (the caller of cpu_pool_run is the
 * n_threads-th); n_threads = 0 is taken as 1, and 1 runs every task inline.
 * Returns 0 and *out (close with cpu_pool_close), or -ENOMEM / -EAGAIN (a
 * thread could not be created; nothing is left running). */
int cpu_pool_open(unsigned n_threads, cpu_pool **out);

/* Stops and joins the workers, frees the pool. NULL is a no-op. Must not be
 * called while a cpu_pool_run is in progress. */
void cpu_pool_close(cpu_pool *pool);

/* Threads that run tasks, the caller included (>= 1): worker numbers passed
 * to tasks are in [0, cpu_pool_size). */
unsigned cpu_pool_size(const cpu_pool *pool);

/* Runs fn(ctx, task, worker) for every task in [0, n_tasks) and blocks until
 * all have returned. The calling thread is worker 0. n_tasks = 0 returns at
 * once. */
void cpu_pool_run(cpu_pool *pool, unsigned n_tasks, void (*fn)(void *ctx, unsigned task, unsigned worker),
                  void *ctx);

#endif
