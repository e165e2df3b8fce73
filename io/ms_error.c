#include "io/ms_error.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static atomic_bool g_quiet;

static void error_vset(ms_error *err, int exit_code, const char *where, const char *suffix,
                       const char *fmt, va_list ap)
{
    if (!err)
        return;
    err->exit_code = exit_code;
    int n = snprintf(err->msg, sizeof err->msg, "%s: ", where ? where : "mergestream");
    if (n < 0 || (size_t)n >= sizeof err->msg)
        return;
    int m = vsnprintf(err->msg + n, sizeof err->msg - (size_t)n, fmt, ap);
    if (m < 0 || (size_t)(n + m) >= sizeof err->msg || !suffix)
        return;
    snprintf(err->msg + n + m, sizeof err->msg - (size_t)(n + m), ": %s", suffix);
}

int ms_error_set(ms_error *err, int exit_code, const char *where, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(err, exit_code, where, NULL, fmt, ap);
    va_end(ap);
    return -1;
}

int ms_error_errno(ms_error *err, int exit_code, int errnum, const char *where, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(err, exit_code, where, strerror(errnum), fmt, ap);
    va_end(ap);
    return -1;
}

void ms_error_clear(ms_error *err)
{
    if (err) {
        err->exit_code = 0;
        err->msg[0] = '\0';
    }
}

void ms_log_set_quiet(bool quiet) { atomic_store(&g_quiet, quiet); }
bool ms_log_is_quiet(void) { return atomic_load(&g_quiet); }

/* One buffered line, one fputs: lines from different threads never interleave
 * mid-line because stderr is unbuffered and we write each line whole. */
static void log_line(const char *prefix, const char *fmt, va_list ap)
{
    char line[1200];
    int n = snprintf(line, sizeof line, "mergestream: %s", prefix);
    if (n < 0)
        return;
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    if (m < 0)
        return;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len] = '\n';
    line[len + 1] = '\0';
    fputs(line, stderr);
}

void ms_log_info(const char *fmt, ...)
{
    if (ms_log_is_quiet())
        return;
    va_list ap;
    va_start(ap, fmt);
    log_line("", fmt, ap);
    va_end(ap);
}

void ms_log_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_line("warning: ", fmt, ap);
    va_end(ap);
}

void ms_assert_fail(const char *file, int line, const char *what)
{
    fprintf(stderr, "mergestream: internal error at %s:%d: %s\n", file, line, what);
    abort();
}
