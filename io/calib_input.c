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
    free(c->origin);
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
        c->origin = calloc((size_t)n, sizeof *c->origin);
    }
    if (!c || !c->path || !c->ids || !c->mask || !c->origin) {
        ms_calib_free(c);
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "cannot hold the calibration tokens");
    }
    c->n_samples = c->n_read = n;
    c->seq_len = seq;
    *out = c;
    return 0;
}

/* The bytes s[0..n) for a message: printable ASCII as is, every other byte
 * (and the quote and backslash) as \xHH, so that a NUL or a byte order mark
 * shows instead of ending or vanishing from the line. out holds 4n + 1. */
static void escape_bytes(const char *s, size_t n, char *out)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch < 0x7f && ch != '\\' && ch != '\'') {
            *out++ = (char)ch;
        } else {
            *out++ = '\\';
            *out++ = 'x';
            *out++ = hex[ch >> 4];
            *out++ = hex[ch & 15];
        }
    }
    *out = 0;
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

static int read_tensor(const st_file *f, const char *path, const st_tensor *t, unsigned char **out, ms_error *err)
{
    uint64_t len = st_tensor_nbytes(t);
    unsigned char *buf = malloc(len ? (size_t)len : 1);
    if (!buf)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "cannot read tensor '%s'", t->name);
    if (ms_pread_exact(f->fd, path, buf, (size_t)len, st_file_tensor_offset(f, t), err) < 0) {
        free(buf);
        return -1;
    }
    *out = buf;
    return 0;
}

/* "name[s][p]", or "name[p]" for a 1-D tensor: indices into the file's tensor. */
static const char *st_where(char *buf, size_t cap, const char *name, unsigned ndim, uint64_t s, uint64_t p)
{
    if (ndim == 1)
        snprintf(buf, cap, "%s[%" PRIu64 "]", name, p);
    else
        snprintf(buf, cap, "%s[%" PRIu64 "][%" PRIu64 "]", name, s, p);
    return buf;
}

static int load_safetensors(const char *path, const ms_calib_options *opt, ms_calib **out, ms_error *err)
{
    st_file *f = NULL; /* named anything: its content decides (calib_sniff) */
    unsigned char *ids = NULL, *mask = NULL;
    ms_calib *c = NULL;
    char where[96];
    if (st_file_open_any_name(path, &f, err) < 0)
        goto fail;
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
    c->ids_ndim = ti->ndim;
    if (read_tensor(f, path, ti, &ids, err) < 0 || (tm && read_tensor(f, path, tm, &mask, err) < 0))
        goto fail;
    /* Row s of the file goes to row `kept` of c: rows without a real token
     * within seq are dropped (they would only count as samples). */
    uint64_t kept = 0;
    for (uint64_t s = 0; s < n; s++) {
        bool truncated = false, any = false;
        uint64_t real = 0, last = 0;
        for (uint64_t p = 0; p < seq_file; p++) {
            uint64_t k = s * seq_file + p;
            bool ok = true;
            int64_t m = mask ? int_at(mask, tm->dtype, k, &ok) : 1;
            if (m != 0 && m != 1) {
                ms_error_set(err, MS_EXIT_DATA, path, "%s is %" PRId64 ", expected 0 or 1",
                             st_where(where, sizeof where, "attention_mask", ti->ndim, s, p), m);
                goto fail;
            }
            if (m == 0)
                continue;
            int64_t id = int_at(ids, ti->dtype, k, &ok);
            if (!ok || id < 0) {
                ms_error_set(err, MS_EXIT_DATA, path, "%s: token id %s",
                             st_where(where, sizeof where, "input_ids", ti->ndim, s, p),
                             ok ? "is negative" : "does not fit in 63 bits");
                goto fail;
            }
            any = true;
            if (p >= seq) {
                truncated = true;
                continue;
            }
            c->ids[kept * seq + p] = id;
            c->mask[kept * seq + p] = 1;
            real++;
            last = p;
        }
        c->n_truncated += truncated;
        if (real == 0) { /* nothing was written to row `kept`: the next row reuses it */
            c->n_empty += !any;
            c->n_emptied += any;
            continue;
        }
        c->origin[kept++] = s;
        c->n_real += real;
        c->max_position = last + 1 > c->max_position ? last + 1 : c->max_position;
    }
    c->n_samples = kept;
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
 * set naming line and token (1-based) and the token's bytes, escaped. */
static int parse_id(const char **p, const char *end, const char *path, uint64_t line, uint64_t token, int64_t *out,
                    ms_error *err)
{
    enum { SHOWN = 24 }; /* bytes of a bad token quoted */
    const char *s = *p;
    uint64_t v = 0;
    const char *q = s;
    for (; q < end && !is_space(*q) && *q != '\n'; q++) {
        if (*q < '0' || *q > '9' || v > (uint64_t)INT64_MAX / 10 || v * 10 + (uint64_t)(*q - '0') > INT64_MAX) {
            size_t len = 0;
            while (s + len < end && !is_space(s[len]) && s[len] != '\n')
                len++;
            char shown[4 * SHOWN + 1];
            escape_bytes(s, len < SHOWN ? len : SHOWN, shown);
            return ms_error_set(err, MS_EXIT_DATA, path,
                                "line %" PRIu64 ", token %" PRIu64 ": '%s%s' is not a token id (a non-negative "
                                "decimal integer)",
                                line, token, shown, len > SHOWN ? "..." : "");
        }
        v = v * 10 + (uint64_t)(*q - '0');
    }
    *p = q;
    *out = (int64_t)v;
    return 0;
}

/* A non-blank line: its bytes from the first non-space, its 1-based number. */
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
    if (len >= 3 && memcmp(buf, "\xef\xbb\xbf", 3) == 0)
        cur += 3; /* a UTF-8 byte order mark, as some editors write */
    if (len >= 2 && (memcmp(buf, "\xff\xfe", 2) == 0 || memcmp(buf, "\xfe\xff", 2) == 0)) {
        ms_error_set(err, MS_EXIT_DATA, path,
                     "is UTF-16 text (it starts with the byte order mark \\x%02x\\x%02x): write the token ids as "
                     "ASCII or UTF-8",
                     (unsigned char)buf[0], (unsigned char)buf[1]);
        goto fail;
    }
    const char *start = cur;
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
    c->text = true;
    cur = start;
    lineno = 0;
    for (uint64_t s = 0; s < n; s++) {
        bool got = next_line(&cur, end, &lineno, &l);
        (void)got;
        c->origin[s] = l.number;
        const char *q = l.begin;
        uint64_t p = 0;
        while (q < l.end) {
            while (q < l.end && is_space(*q))
                q++;
            if (q == l.end)
                break;
            int64_t id = 0;
            if (parse_id(&q, l.end, path, l.number, p + 1, &id, err) < 0)
                goto fail;
            if (p < seq) {
                c->ids[s * seq + p] = id;
                c->mask[s * seq + p] = 1;
                c->n_real++;
                c->max_position = p + 1 > c->max_position ? p + 1 : c->max_position;
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

typedef enum calib_kind { CALIB_KIND_TEXT, CALIB_KIND_SAFETENSORS, CALIB_KIND_ZIP, CALIB_KIND_PICKLE } calib_kind;

/* What path holds, by its first bytes: a safetensors file (an 8-byte length
 * of at least 2 that fits the file, then '{'), a PyTorch checkpoint (a zip
 * archive, or a pickle of protocol 2..5), else text. A name ending in
 * ".safetensors" is read as safetensors unless it is a checkpoint, so that
 * a damaged header is named rather than parsed as token ids. */
static calib_kind calib_sniff(const char *path, uint64_t size)
{
    unsigned char head[9] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t got = fd >= 0 ? pread(fd, head, sizeof head, 0) : -1;
    if (fd >= 0)
        close(fd);
    if (got >= 4 && memcmp(head, "PK\x03\x04", 4) == 0)
        return CALIB_KIND_ZIP;
    if (got >= 2 && head[0] == 0x80 && head[1] >= 2 && head[1] <= 5)
        return CALIB_KIND_PICKLE;
    if (got == (ssize_t)sizeof head && head[8] == '{') {
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--)
            hlen = hlen << 8 | head[i];
        if (hlen >= 2 && hlen <= size - 8)
            return CALIB_KIND_SAFETENSORS;
    }
    size_t n = strlen(path);
    if (n >= 12 && strcmp(path + n - 12, ".safetensors") == 0)
        return CALIB_KIND_SAFETENSORS;
    return CALIB_KIND_TEXT; /* an unreadable file: load_text names the error */
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
    calib_kind kind = calib_sniff(path, (uint64_t)st.st_size);
    if (kind == CALIB_KIND_ZIP || kind == CALIB_KIND_PICKLE)
        return ms_error_set(err, MS_EXIT_DATA, path,
                            "is a PyTorch checkpoint (%s), not a calibration file: give token ids as a text file "
                            "(whitespace-separated ids, one sample per line) or a safetensors file (input_ids "
                            "[n, seq], optional attention_mask)",
                            kind == CALIB_KIND_ZIP ? "a zip archive" : "a pickle");
    int rc = kind == CALIB_KIND_SAFETENSORS ? load_safetensors(path, opt, out, err) : load_text(path, opt, out, err);
    if (rc == 0 && (*out)->n_real == 0) {
        ms_calib *c = *out;
        *out = NULL;
        if (c->n_emptied)
            ms_error_set(err, MS_EXIT_DATA, path,
                         "no real token in the first %" PRIu64 " positions of any sample: --seq-len keeps each "
                         "row's first positions (input_ids[:, :%" PRIu64 "]), and the %" PRIu64
                         " sample(s) with real tokens have them all past that (left padding?)",
                         c->seq_len, c->seq_len, c->n_emptied);
        else
            ms_error_set(err, MS_EXIT_DATA, path, "no real tokens (every position is padding)");
        ms_calib_free(c);
        return -1;
    }
    return rc;
}

int ms_calib_check_vocab(const ms_calib *c, uint64_t vocab, ms_error *err)
{
    for (uint64_t s = 0; s < c->n_samples; s++)
        for (uint64_t p = 0; p < c->seq_len; p++) {
            uint64_t k = s * c->seq_len + p;
            if (!c->mask[k] || (uint64_t)c->ids[k] < vocab)
                continue;
            char where[96];
            uint64_t row = c->origin ? c->origin[s] : s; /* a calib built by hand has no origin */
            if (c->text)
                snprintf(where, sizeof where, "line %" PRIu64 ", token %" PRIu64, row, p + 1);
            else
                st_where(where, sizeof where, "input_ids", c->ids_ndim, row, p);
            return ms_error_set(err, MS_EXIT_DATA, c->path,
                                "%s: id %" PRId64 " is not below the vocabulary size %" PRIu64, where, c->ids[k],
                                vocab);
        }
    return 0;
}
