/* A bounded FIFO of pointers between two pipeline stages: one mutex, two
 * condition variables, a shutdown flag with broadcast. Push blocks while the
 * queue is full, pop blocks while it is empty; work is done outside the lock. */
#ifndef MS_BOUNDED_QUEUE_H
#define MS_BOUNDED_QUEUE_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct ms_queue {
    pthread_mutex_t lock;
    pthread_cond_t not_full;  /* signalled by pop */
    pthread_cond_t not_empty; /* signalled by push and close */
    void **slots;             /* ring buffer of `capacity` slots; guarded by lock */
    size_t capacity, head, count; /* guarded by lock */
    bool closed;              /* set once by the producer (or on abort); guarded by lock */
} ms_queue;

/* Returns 0 or -ENOMEM. */
int ms_queue_init(ms_queue *q, size_t capacity);
void ms_queue_destroy(ms_queue *q);

/* Appends item, blocking while full. Returns 0, or -EPIPE when the queue was
 * closed (the item was not queued; the caller still owns it). */
int ms_queue_push(ms_queue *q, void *item);

/* Removes the oldest item into *item, blocking while empty. Returns 0, or
 * -EPIPE when the queue is closed and empty (end of stream). */
int ms_queue_pop(ms_queue *q, void **item);

/* No more pushes: wakes every waiter. Items already queued can still be popped. */
void ms_queue_close(ms_queue *q);

#endif
