/* Progress on stderr for long work (DESIGN.md, CLI):
 *   [ 10/291] model.layers.1.self_attn.v_proj  cpu  1.9 GB/s  ETA 45s
 * On a terminal the line is redrawn in place; otherwise a line is printed
 * every few seconds. --quiet silences it. Rates count input bytes read. */
#ifndef MS_PROGRESS_H
#define MS_PROGRESS_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct ms_progress {
    pthread_mutex_t lock;
    bool tty;               /* written once at init */
    uint64_t total_items;   /* written once at init */
    uint64_t total_bytes;   /* written once at init */
    uint64_t done_items;    /* guarded by lock; written by the stage that finishes items */
    uint64_t done_bytes;    /* guarded by lock */
    double start_s, last_print_s; /* guarded by lock */
    bool drew_live_line;    /* guarded by lock */
} ms_progress;

void ms_progress_init(ms_progress *p, uint64_t total_items, uint64_t total_bytes);
/* Records one finished item (name, backend label, bytes) and maybe prints. Thread-safe. */
void ms_progress_step(ms_progress *p, const char *name, const char *backend, uint64_t bytes);
/* Ends the live line (if any) so the summary starts on a fresh line. */
void ms_progress_finish(ms_progress *p);
void ms_progress_destroy(ms_progress *p);

/* Monotonic seconds. */
double ms_now_seconds(void);
/* Peak resident set size of this process in bytes (getrusage). */
uint64_t ms_peak_rss_bytes(void);

#endif
