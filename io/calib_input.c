#include "io/calib_input.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/atomic_file.h"
#include "io/small_file.h"
#include "io/st_format.h"

#define CALIB_MAX_SEQ (1ull << 24)       /* positions per sample */
#define CALIB_MAX_POSITIONS (1ull << 34) /* samples x positions */

void ms_calib_free(ms_calib *c)
{
    if (!c)
        return;
    free(c->path);
    free(c->ids);
    free(c->mask);
    free(c);
}

/* A calib of n x seq positions, all padding. */
static int calib_alloc(const char *path, uint64_t n, uint64_t seq, ms_calib **out, ms_error *err)
{
    uint64_t cells;
    if (n == 0 || seq == 0)
        return ms_error_set(err, MS_EXIT_DATA, path, "no calibration samples");
    if (seq > CALIB_MAX_SEQ)
        return ms_error_set(err, MS_EXIT_DATA, path, "samples of %" PRIu64 " positions (at most %llu)", seq,
                            CALIB_MAX_SEQ);
    if (__builtin_mul_overflow(n, seq, &cells) || cells > CALIB_MAX_POSITIONS)
        return ms_error_set(err, MS_EXIT_DATA, path, "%" PRIu64 " samples of %" PRIu64 " positions is too many", n,
                            seq);
    ms_calib *c = calloc(1, sizeof *c);
    if (c) {
        c->path = strdup(path);
        c->ids = calloc((size_t)cells, sizeof *c->ids);
        c->mask = calloc((size_t)cells, 1);
    }
    if (!c || !c->path || !c->ids || !c->mask) {
        ms_calib_free(c);
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "cannot hold the calibration tokens");
    }
    c->n_samples = n;
    c->seq_len = seq;
    *out = c;
    return 0;
}

/* ============================================================ safetensors */

static bool is_int_dtype(st_dtype d)
{
    return d == ST_I8 || d == ST_U8 || d == ST_I16 || d == ST_U16 || d == ST_I32 || d == ST_U32 || d == ST_I64 ||
           d == ST_U64;
}

/* Element i of raw little-endian integers; *ok = false for a U64 above INT64_MAX. */
static int64_t int_at(const unsigned char *p, st_dtype d, uint64_t i, bool *ok)
{
    switch (d) {
    case ST_BOOL:
    case ST_U8: return p[i];
    case ST_I8: return (int8_t)p[i];
    case ST_I16: { int16_t v; memcpy(&v, p + 2 * i, 2); return v; }
    case ST_U16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return v; }
    case ST_I32: { int32_t v; memcpy(&v, p + 4 * i, 4); return v; }
    case ST_U32: { uint32_t v; memcpy(&v, p + 4 * i, 4); return v; }
    case ST_I64: { int64_t v; memcpy(&v, p + 8 * i, 8); return v; }
    case ST_U64: {
        uint64_t v;
        memcpy(&v, p + 8 * i, 8);
        if (v > INT64_MAX) {
            *ok = false;
            return -1;
        }
        return (int64_t)v;
    }
    default: *ok = false; return -1;
    }
}

static int read_tensor(const st_file *f, const st_tensor *t, unsigned char **out, ms_error *err)
{
    uint64_t len = st_tensor_nbytes(t);
    unsigned char *buf = malloc(len ? (size_t)len : 1);
    if (!buf)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, f->path, "cannot read tensor '%s'", t->name);
    if (ms_pread_exact(f->fd, f->path, buf, (size_t)len, st_file_tensor_offset(f, t), err) < 0) {
        free(buf);
        return -1;
    }
    *out = buf;
    return 0;
}

static int load_safetensors(const char *path, const ms_calib_options *opt, ms_calib **out, ms_error *err)
{
    st_file *f = NULL;
    unsigned char *ids = NULL, *mask = NULL;
    ms_calib *c = NULL;
    if (st_file_open(path, &f, err) < 0)
        return -1;
    long ii = st_header_find(&f->header, "input_ids");
    long mi = st_header_find(&f->header, "attention_mask");
    const st_tensor *ti = ii >= 0 ? &f->header.tensors[ii] : NULL;
    const st_tensor *tm = mi >= 0 ? &f->header.tensors[mi] : NULL;
    uint64_t n_file, seq_file;
    if (!ti) {
        ms_error_set(err, MS_EXIT_DATA, path, "no \"input_ids\" tensor");
        goto fail;
    }
    if (!is_int_dtype(ti->dtype)) {
        ms_error_set(err, MS_EXIT_DATA, path, "input_ids: dtype %s, expected an integer dtype (I64, I32, ...)",
                     st_dtype_name(ti->dtype));
        goto fail;
    }
    if (ti->ndim != 1 && ti->ndim != 2) {
        ms_error_set(err, MS_EXIT_DATA, path, "input_ids: %u dimensions, expected [n, seq] or [seq]", ti->ndim);
        goto fail;
    }
    n_file = ti->ndim == 2 ? ti->shape[0] : 1;
    seq_file = ti->shape[ti->ndim - 1];
    if (tm) {
        if (tm->dtype != ST_BOOL && !is_int_dtype(tm->dtype)) {
            ms_error_set(err, MS_EXIT_DATA, path, "attention_mask: dtype %s, expected BOOL or an integer dtype",
                         st_dtype_name(tm->dtype));
            goto fail;
        }
        if (tm->ndim != ti->ndim || memcmp(tm->shape, ti->shape, ti->ndim * sizeof *ti->shape) != 0) {
            ms_error_set(err, MS_EXIT_DATA, path, "attention_mask: shape differs from input_ids'");
            goto fail;
        }
    }
    uint64_t n = opt->max_samples && opt->max_samples < n_file ? opt->max_samples : n_file;
    uint64_t seq = opt->seq_len ? opt->seq_len : seq_file;
    if (calib_alloc(path, n, seq, &c, err) < 0)
        goto fail;
    if (read_tensor(f, ti, &ids, err) < 0 || (tm && read_tensor(f, tm, &mask, err) < 0))
        goto fail;
    for (uint64_t s = 0; s < n; s++) {
        bool truncated = false;
        for (uint64_t p = 0; p < seq_file; p++) {
            uint64_t k = s * seq_file + p;
            bool ok = true;
            int64_t m = mask ? int_at(mask, tm->dtype, k, &ok) : 1;
            if (m != 0 && m != 1) {
                ms_error_set(err, MS_EXIT_DATA, path, "attention_mask[%" PRIu64 "][%" PRIu64 "] is %" PRId64
                             ", expected 0 or 1", s, p, m);
                goto fail;
            }
            if (m == 0)
                continue;
            int64_t id = int_at(ids, ti->dtype, k, &ok);
            if (!ok || id < 0) {
                ms_error_set(err, MS_EXIT_DATA, path, "input_ids[%" PRIu64 "][%" PRIu64 "]: token id %s", s, p,
                             ok ? "is negative" : "does not fit in 63 bits");
                goto fail;
            }
            if (p >= seq) {
                truncated = true;
                continue;
            }
            c->ids[s * seq + p] = id;
            c->mask[s * seq + p] = 1;
            c->n_real++;
        }
        c->n_truncated += truncated;
    }
    free(ids);
    free(mask);
    st_file_close(f);
    *out = c;
    return 0;
fail:
    free(ids);
    free(mask);
    st_file_close(f);
    ms_calib_free(c);
    return -1;
}

/* ============================================================ text */

static bool is_space(char ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\v' || ch == '\f'; }

/* Parses one decimal id at *p (advancing past it). Returns 0, or -1 with err
 * set naming line and position. */
static int parse_id(const char **p, const char *end, const char *path, uint64_t line, uint64_t pos, int64_t *out,
                    ms_error *err)
{
    const char *s = *p;
    uint64_t v = 0;
    const char *q = s;
    for (; q < end && !is_space(*q) && *q != '\n'; q++) {
        if (*q < '0' || *q > '9' || v > (uint64_t)INT64_MAX / 10 || v * 10 + (uint64_t)(*q - '0') > INT64_MAX) {
            int len = 0;
            while (s + len < end && !is_space(s[len]) && s[len] != '\n' && len < 24)
                len++;
            return ms_error_set(err, MS_EXIT_DATA, path,
                                "line %" PRIu64 ", token %" PRIu64 ": '%.*s' is not a token id (a non-negative "
                                "decimal integer)",
                                line, pos, len, s);
        }
        v = v * 10 + (uint64_t)(*q - '0');
    }
    *p = q;
    *out = (int64_t)v;
    return 0;
}

/* Calls back for each non-blank line: line number (1-based), its bytes. */
typedef struct text_line {
    const char *begin, *end;
    uint64_t number;
} text_line;

static bool next_line(const char **cursor, const char *end, uint64_t *number, text_line *out)
{
    while (*cursor < end) {
        const char *b = *cursor;
        const char *e = memchr(b, '\n', (size_t)(end - b));
        if (!e)
            e = end;
        *cursor = e < end ? e + 1 : end;
        (*number)++;
        const char *q = b;
        while (q < e && is_space(*q))
            q++;
        if (q < e) {
            *out = (text_line){q, e, *number};
            return true;
        }
    }
    return false;
}

static uint64_t count_tokens(const text_line *l)
{
    uint64_t n = 0;
    const char *q = l->begin;
    while (q < l->end) {
        while (q < l->end && is_space(*q))
            q++;
        if (q == l->end)
            break;
        n++;
        while (q < l->end && !is_space(*q))
            q++;
    }
    return n;
}

static int load_text(const char *path, const ms_calib_options *opt, ms_calib **out, ms_error *err)
{
    char *buf = NULL;
    size_t len = 0;
    ms_calib *c = NULL;
    if (ms_small_file_read(path, (size_t)MS_CALIB_MAX_TEXT_BYTES, &buf, &len, err) < 0)
        return -1;
    const char *end = buf + len, *cur = buf;
    uint64_t lineno = 0, n = 0, longest = 0;
    text_line l;
    while ((!opt->max_samples || n < opt->max_samples) && next_line(&cur, end, &lineno, &l)) {
        uint64_t k = count_tokens(&l);
        longest = k > longest ? k : longest;
        n++;
    }
    uint64_t seq = opt->seq_len ? opt->seq_len : longest;
    if (calib_alloc(path, n, seq, &c, err) < 0)
        goto fail;
    cur = buf;
    lineno = 0;
    for (uint64_t s = 0; s < n; s++) {
        bool got = next_line(&cur, end, &lineno, &l);
        (void)got;
        const char *q = l.begin;
        uint64_t p = 0;
        while (q < l.end) {
            while (q < l.end && is_space(*q))
                q++;
            if (q == l.end)
                break;
            int64_t id = 0;
            if (parse_id(&q, l.end, path, l.number, p, &id, err) < 0)
                goto fail;
            if (p < seq) {
                c->ids[s * seq + p] = id;
                c->mask[s * seq + p] = 1;
                c->n_real++;
            } else if (p == seq) {
                c->n_truncated++;
            }
            p++;
        }
    }
    free(buf);
    *out = c;
    return 0;
fail:
    free(buf);
    ms_calib_free(c);
    return -1;
}

/* ============================================================ entry points */

/* True when path looks like a safetensors file: the name, or an 8-byte
 * length below the file size followed by '{'. */
static bool looks_like_safetensors(const char *path)
{
    size_t n = strlen(path);
    if (n >= 12 && strcmp(path + n - 12, ".safetensors") == 0)
        return true;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    unsigned char head[9];
    struct stat st;
    bool yes = pread(fd, head, sizeof head, 0) == (ssize_t)sizeof head && fstat(fd, &st) == 0 && head[8] == '{';
    if (yes) {
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--)
            hlen = hlen << 8 | head[i];
        yes = hlen >= 2 && hlen <= (uint64_t)st.st_size - 8;
    }
    close(fd);
    return yes;
}

int ms_calib_load(const char *path, const ms_calib_options *opt, ms_calib **out, ms_error *err)
{
    static const ms_calib_options defaults = {0};
    *out = NULL;
    if (!opt)
        opt = &defaults;
    struct stat st;
    if (stat(path, &st) != 0)
        return ms_error_errno(err, MS_EXIT_DATA, errno, path, "cannot open the calibration file");
    if (!S_ISREG(st.st_mode))
        return ms_error_set(err, MS_EXIT_DATA, path, "the calibration input is not a regular file");
    int rc = looks_like_safetensors(path) ? load_safetensors(path, opt, out, err) : load_text(path, opt, out, err);
    if (rc == 0 && (*out)->n_real == 0) {
        ms_calib_free(*out);
        *out = NULL;
        return ms_error_set(err, MS_EXIT_DATA, path, "no real tokens (every position is padding)");
    }
    return rc;
}

int ms_calib_check_vocab(const ms_calib *c, uint64_t vocab, ms_error *err)
{
    for (uint64_t s = 0; s < c->n_samples; s++)
        for (uint64_t p = 0; p < c->seq_len; p++) {
            uint64_t k = s * c->seq_len + p;
            if (c->mask[k] && (uint64_t)c->ids[k] >= vocab)
                return ms_error_set(err, MS_EXIT_DATA, c->path,
                                    "sample %" PRIu64 ", position %" PRIu64 ": token id %" PRId64
                                    " is not below the vocabulary size %" PRIu64,
                                    s, p, c->ids[k], vocab);
        }
    return 0;
}
