#include "pipeline/progress.h"

#include <stdio.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "io/ms_error.h"

#define PROGRESS_LOG_INTERVAL_S 5.0 /* non-terminal: one line this often */
#define PROGRESS_TTY_INTERVAL_S 0.2 /* terminal: redraw this often */

double ms_now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

uint64_t ms_peak_rss_bytes(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (uint64_t)ru.ru_maxrss * 1024u; /* Linux reports KiB */
}

void ms_progress_init(ms_progress *p, uint64_t total_items, uint64_t total_bytes)
{
    pthread_mutex_init(&p->lock, NULL);
    p->tty = isatty(STDERR_FILENO);
    p->total_items = total_items;
    p->total_bytes = total_bytes;
    p->done_items = p->done_bytes = 0;
    p->start_s = p->last_print_s = ms_now_seconds();
    p->drew_live_line = false;
}

static void format_eta(double seconds, char *buf, size_t n)
{
    if (seconds < 0 || seconds > 1e7)
        snprintf(buf, n, "?");
    else if (seconds < 100)
        snprintf(buf, n, "%.0fs", seconds);
    else if (seconds < 6000)
        snprintf(buf, n, "%dm%02ds", (int)seconds / 60, (int)seconds % 60);
    else
        snprintf(buf, n, "%.1fh", seconds / 3600);
}

void ms_progress_step(ms_progress *p, const char *name, const char *backend, uint64_t bytes)
{
    if (ms_log_is_quiet())
        return;
    pthread_mutex_lock(&p->lock);
    p->done_items++;
    p->done_bytes += bytes;
    double now = ms_now_seconds();
    double interval = p->tty ? PROGRESS_TTY_INTERVAL_S : PROGRESS_LOG_INTERVAL_S;
    bool last = p->done_items == p->total_items;
    if (now - p->last_print_s >= interval || (last && p->tty)) {
        p->last_print_s = now;
        double elapsed = now - p->start_s;
        double rate = elapsed > 0 ? (double)p->done_bytes / elapsed : 0;
        char eta[32];
        format_eta(rate > 0 ? (double)(p->total_bytes - p->done_bytes) / rate : -1, eta, sizeof eta);
        int width = 1;
        for (uint64_t t = p->total_items; t >= 10; t /= 10)
            width++;
        fprintf(stderr, "%s[%*llu/%llu] %-48s %-4s %5.2f GB/s  ETA %s%s", p->tty ? "\r\033[K" : "", width,
                (unsigned long long)p->done_items, (unsigned long long)p->total_items, name, backend,
                rate / 1e9, eta, p->tty ? "" : "\n");
        p->drew_live_line = p->tty;
    }
    pthread_mutex_unlock(&p->lock);
}

void ms_progress_finish(ms_progress *p)
{
    pthread_mutex_lock(&p->lock);
    if (p->drew_live_line)
        fputc('\n', stderr);
    p->drew_live_line = false;
    pthread_mutex_unlock(&p->lock);
}

void ms_progress_destroy(ms_progress *p) { pthread_mutex_destroy(&p->lock); }
