/* The CPU thread pool: one mutex, two condition variables (see cpu_pool.h). */
#include "cpu/cpu_pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*cpu_task_fn)(void *ctx, unsigned task, unsigned worker);

typedef struct cpu_worker {
    cpu_pool *pool;
    unsigned index; /* 1..n_threads-1; the caller of cpu_pool_run is 0 */
    pthread_t thread;
} cpu_worker;

struct cpu_pool {
    unsigned n_threads;   /* fixed at open */
    cpu_worker *workers;  /* [n_threads - 1], fixed at open */
    pthread_mutex_t lock;
    pthread_cond_t work_cv; /* the caller signals a new job or shutdown */
    pthread_cond_t done_cv; /* the last worker to leave a job signals the caller */
    /* Under lock. Written by the caller of cpu_pool_run (a new job: generation
     * incremented, fn, ctx, n_tasks, next_task = 0, busy = number of workers),
     * read by the workers. */
    unsigned long generation;
    cpu_task_fn fn;
    void *ctx;
    unsigned n_tasks;
    /* Under lock. Claimed (incremented) by whoever takes the next task: the
     * caller and the workers. */
    unsigned next_task;
    /* Under lock. Workers still inside the current job: each worker decrements
     * it when it finds no task left; the caller waits for 0. */
    unsigned busy;
    /* Under lock. Written by cpu_pool_close, read by the workers. */
    int shutdown;
};

/* Takes and runs tasks until none is left. Called with the lock held; returns
 * with it held. */
static void pool_drain(cpu_pool *pool, unsigned worker)
{
    while (pool->next_task < pool->n_tasks) {
        unsigned task = pool->next_task++;
        cpu_task_fn fn = pool->fn;
        void *ctx = pool->ctx;
        pthread_mutex_unlock(&pool->lock);
        fn(ctx, task, worker);
        pthread_mutex_lock(&pool->lock);
    }
}

static void *pool_worker_main(void *arg)
{
    cpu_worker *w = arg;
    cpu_pool *pool = w->pool;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool->lock);
    for (;;) {
        while (!pool->shutdown && pool->generation == seen)
            pthread_cond_wait(&pool->work_cv, &pool->lock);
        if (pool->shutdown)
            break;
        seen = pool->generation;
        pool_drain(pool, w->index);
        if (--pool->busy == 0)
            pthread_cond_signal(&pool->done_cv);
    }
    pthread_mutex_unlock(&pool->lock);
    return NULL;
}

static void pool_stop(cpu_pool *pool, unsigned started)
{
    pthread_mutex_lock(&pool->lock);
    pool->shutdown = 1;
    pthread_cond_broadcast(&pool->work_cv);
    pthread_mutex_unlock(&pool->lock);
    for (unsigned i = 0; i < started; i++)
        pthread_join(pool->workers[i].thread, NULL);
}

int cpu_pool_open(unsigned n_threads, cpu_pool **out)
{
    *out = NULL;
    if (n_threads == 0)
        n_threads = 1;
    cpu_pool *pool = calloc(1, sizeof *pool);
    if (!pool)
        return -ENOMEM;
    pool->n_threads = n_threads;
    pool->workers = calloc(n_threads - 1 ? n_threads - 1 : 1, sizeof *pool->workers);
    if (!pool->workers) {
        free(pool);
        return -ENOMEM;
    }
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->work_cv, NULL);
    pthread_cond_init(&pool->done_cv, NULL);
    for (unsigned i = 0; i + 1 < n_threads; i++) {
        pool->workers[i].pool = pool;
        pool->workers[i].index = i + 1;
        int rc = pthread_create(&pool->workers[i].thread, NULL, pool_worker_main, &pool->workers[i]);
        if (rc != 0) {
            pool_stop(pool, i);
            pool->n_threads = 1; /* nothing left to join */
            cpu_pool_close(pool);
            return -rc;
        }
    }
    *out = pool;
    return 0;
}

void cpu_pool_close(cpu_pool *pool)
{
    if (!pool)
        return;
    if (pool->n_threads > 1)
        pool_stop(pool, pool->n_threads - 1);
    pthread_cond_destroy(&pool->done_cv);
    pthread_cond_destroy(&pool->work_cv);
    pthread_mutex_destroy(&pool->lock);
    free(pool->workers);
    free(pool);
}

unsigned cpu_pool_size(const cpu_pool *pool)
{
    return pool->n_threads;
}

void cpu_pool_run(cpu_pool *pool, unsigned n_tasks, cpu_task_fn fn, void *ctx)
{
    if (n_tasks == 0)
        return;
    if (pool->n_threads == 1 || n_tasks == 1) {
        for (unsigned t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        return;
    }
    pthread_mutex_lock(&pool->lock);
    pool->fn = fn;
    pool->ctx = ctx;
    pool->n_tasks = n_tasks;
    pool->next_task = 0;
    pool->busy = pool->n_threads - 1;
    pool->generation++;
    pthread_cond_broadcast(&pool->work_cv);
    pool_drain(pool, 0);
    while (pool->busy > 0)
        pthread_cond_wait(&pool->done_cv, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
}
