/* The safetensors reader and validator (io/st_format.h).
 *
 * Validation follows huggingface/safetensors (src/tensor.rs): the 8-byte
 * length, the 100,000,000-byte header cap, UTF-8, a JSON object whose
 * "__metadata__" is {string: string} or null and whose other entries are
 * tensors, element counts and byte sizes with overflow checks, the sub-byte
 * rule, offsets that tile the data section from 0 with no gap or overlap, and
 * a data section that ends exactly at end of file. Where this reader is
 * stricter, the comment at the rule says so.
 *
 * The header is read in three passes over a bounded buffer: a UTF-8 check, a
 * lexical scan (numbers, string contents, bytes between tokens) that cJSON
 * cannot do because it turns numbers into doubles and treats every byte
 * <= 0x20 as whitespace, then cJSON for the structure. */
#include "io/st_format.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/atomic_file.h"
#include "io/ms_fault.h"

/* The largest integer accepted in a header. JSON numbers reach us as doubles,
 * which hold every integer up to 2^53 exactly; the lexical scan rejects larger
 * ones rather than let them round. Deliberate limit: no real file has a
 * dimension or an offset of 2^53 bytes (8 PiB) or more. */
#define ST_MAX_JSON_INT (UINT64_C(1) << 53)

#define ST_LEN_FIELD_BYTES 8 /* the little-endian header length */
#define ST_MSG_NAME_MAX 200  /* characters of a name quoted in a message */

/* ------------------------------------------------------------------------ */
/* dtypes                                                                   */
/* ------------------------------------------------------------------------ */

static const struct {
    const char *name;
    unsigned bits;
} k_dtypes[ST_DTYPE_COUNT] = {
    [ST_BOOL] = {"BOOL", 8},       [ST_F4] = {"F4", 4},
    [ST_F6_E2M3] = {"F6_E2M3", 6}, [ST_F6_E3M2] = {"F6_E3M2", 6},
    [ST_U8] = {"U8", 8},           [ST_I8] = {"I8", 8},
    [ST_F8_E5M2] = {"F8_E5M2", 8}, [ST_F8_E4M3] = {"F8_E4M3", 8},
    [ST_F8_E8M0] = {"F8_E8M0", 8}, [ST_I16] = {"I16", 16},
    [ST_U16] = {"U16", 16},        [ST_F16] = {"F16", 16},
    [ST_BF16] = {"BF16", 16},      [ST_I32] = {"I32", 32},
    [ST_U32] = {"U32", 32},        [ST_F32] = {"F32", 32},
    [ST_F64] = {"F64", 64},        [ST_I64] = {"I64", 64},
    [ST_U64] = {"U64", 64},        [ST_C64] = {"C64", 64},
};

const char *st_dtype_name(st_dtype dtype)
{
    if ((unsigned)dtype >= ST_DTYPE_COUNT)
        return NULL;
    return k_dtypes[dtype].name;
}

bool st_dtype_parse(const char *name, st_dtype *out)
{
    for (unsigned d = 0; d < ST_DTYPE_COUNT; d++) {
        if (strcmp(name, k_dtypes[d].name) == 0) {
            *out = (st_dtype)d;
            return true;
        }
    }
    return false;
}

unsigned st_dtype_bits(st_dtype dtype)
{
    if ((unsigned)dtype >= ST_DTYPE_COUNT)
        return 0;
    return k_dtypes[dtype].bits;
}

bool st_dtype_is_mergeable_float(st_dtype dtype)
{
    return dtype == ST_F16 || dtype == ST_BF16 || dtype == ST_F32;
}

int st_shape_numel(const uint64_t *shape, unsigned ndim, uint64_t *out)
{
    /* Left to right with a check at every step, as the reference does: a
     * product that wraps (2^32 * 2^32 = 0 mod 2^64) is an error even when a
     * later dimension is 0. */
    uint64_t n = 1;
    for (unsigned i = 0; i < ndim; i++) {
        if (__builtin_mul_overflow(n, shape[i], &n))
            return -EOVERFLOW;
    }
    *out = n;
    return 0;
}

int st_dtype_nbytes(st_dtype dtype, uint64_t numel, uint64_t *out)
{
    MS_ASSERT((unsigned)dtype < ST_DTYPE_COUNT);
    uint64_t bits;
    if (__builtin_mul_overflow(numel, (uint64_t)k_dtypes[dtype].bits, &bits))
        return -EOVERFLOW;
    if (bits % 8 != 0)
        return -EINVAL;
    *out = bits / 8;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */
/* ------------------------------------------------------------------------ */

/* Copies a name into buf for a message: at most ST_MSG_NAME_MAX bytes,
 * control characters shown as '?', so a hostile name cannot break the line. */
static const char *msg_name(const char *s, size_t len, char buf[ST_MSG_NAME_MAX + 4])
{
    size_t n = len < ST_MSG_NAME_MAX ? len : ST_MSG_NAME_MAX;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[i] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (len > n) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = '\0';
    return buf;
}

static bool is_json_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static uint64_t le64_load(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* ------------------------------------------------------------------------ */
/* Pass 1: UTF-8                                                            */
/* ------------------------------------------------------------------------ */

/* Offset of the first byte that does not start a well-formed UTF-8 sequence
 * (Unicode table 3-7: no overlong forms, no surrogates, nothing above
 * U+10FFFF, no truncated sequence), or len when all of s is well formed. */
static size_t utf8_first_invalid(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        /* Headers are almost all ASCII: skip it eight bytes at a time. */
        if (len - i >= 8) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if ((w & UINT64_C(0x8080808080808080)) == 0) {
                i += 8;
                continue;
            }
        }
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t more;
        unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) {
            more = 1;
        } else if (c == 0xE0) {
            more = 2, lo = 0xA0;
        } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
            more = 2;
        } else if (c == 0xED) {
            more = 2, hi = 0x9F;
        } else if (c == 0xF0) {
            more = 3, lo = 0x90;
        } else if (c >= 0xF1 && c <= 0xF3) {
            more = 3;
        } else if (c == 0xF4) {
            more = 3, hi = 0x8F;
        } else {
            return i;
        }
        if (len - i - 1 < more)
            return i;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= more; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return i;
        }
        i += more + 1;
    }
    return len;
}

/* ------------------------------------------------------------------------ */
/* Pass 2: lexical scan                                                     */
/* ------------------------------------------------------------------------ */

/* What the scan remembers to name the entry an error is in: the last key of
 * the top-level object (raw, still escaped). */
typedef struct lex_ctx {
    const char *json;
    size_t len;
    const char *where;
    ms_error *err;
    const char *key;
    size_t key_len;
} lex_ctx;

static int lex_fail(const lex_ctx *lx, size_t at, const char *what, const char *token,
                    size_t token_len)
{
    char kbuf[ST_MSG_NAME_MAX + 4], tbuf[ST_MSG_NAME_MAX + 4];
    const char *tok = token ? msg_name(token, token_len, tbuf) : "";
    if (lx->key) {
        bool is_meta = lx->key_len == 12 && memcmp(lx->key, "__metadata__", 12) == 0;
        return ms_error_set(lx->err, MS_EXIT_DATA, lx->where, "header byte %zu, %s%s%s: %s%s%s",
                            at, is_meta ? "" : "tensor '", msg_name(lx->key, lx->key_len, kbuf),
                            is_meta ? "" : "'", what, token ? " " : "", tok);
    }
    return ms_error_set(lx->err, MS_EXIT_DATA, lx->where, "header byte %zu: %s%s%s", at, what,
                        token ? " " : "", tok);
}

static bool is_number_char(unsigned char c)
{
    return (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
}

/* Checks the number token json[at .. at+n): non-negative integer text only
 * (JSON grammar without sign, fraction or exponent; no leading zero), value at
 * most 2^53. The reference reads these fields as usize, so it rejects the
 * same texts (serde_json refuses 1.0, 1e3 and -1 for an unsigned integer). */
static int lex_number(const lex_ctx *lx, size_t at, size_t n)
{
    const char *tok = lx->json + at;
    for (size_t i = 0; i < n; i++) {
        if (tok[i] < '0' || tok[i] > '9')
            return lex_fail(lx, at,
                            "numbers must be non-negative integers (no sign, fraction or "
                            "exponent), got",
                            tok, n);
    }
    if (n > 1 && tok[0] == '0')
        return lex_fail(lx, at, "numbers must not have leading zeros, got", tok, n);
    /* 2^53 has 16 digits, so a longer token (no leading zero) is larger, and a
     * shorter one fits in 64 bits. */
    uint64_t v = 0;
    for (size_t i = 0; n <= 16 && i < n; i++)
        v = v * 10 + (uint64_t)(tok[i] - '0');
    if (n > 16 || v > ST_MAX_JSON_INT)
        return lex_fail(lx, at,
                        "number exceeds 2^53 (9007199254740992), the largest integer this "
                        "reader accepts:",
                        tok, n);
    return 0;
}

/* Checks the string whose opening quote is at json[at]; stores the offset
 * just past its closing quote in *next. Rejects what JSON forbids and cJSON
 * lets through (raw control characters), and \u0000, because names and
 * values become C strings. */
static int lex_string(const lex_ctx *lx, size_t at, size_t *next)
{
    const char *s = lx->json;
    size_t i = at + 1;
    while (i < lx->len) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"') {
            *next = i + 1;
            return 0;
        }
        if (c < 0x20)
            return lex_fail(lx, i, "control character inside a string (JSON needs an escape)",
                            NULL, 0);
        if (c != '\\') {
            i++;
            continue;
        }
        if (i + 1 >= lx->len)
            break;
        unsigned char e = (unsigned char)s[i + 1];
        if (strchr("\"\\/bfnrt", e) && e != '\0') {
            i += 2;
            continue;
        }
        if (e != 'u')
            return lex_fail(lx, i, "invalid escape in a string", s + i, 2);
        if (lx->len - i < 6)
            break;
        unsigned v = 0;
        for (size_t k = 2; k < 6; k++) {
            unsigned char h = (unsigned char)s[i + k];
            unsigned d;
            if (h >= '0' && h <= '9')
                d = h - '0';
            else if (h >= 'a' && h <= 'f')
                d = h - 'a' + 10;
            else if (h >= 'A' && h <= 'F')
                d = h - 'A' + 10;
            else
                return lex_fail(lx, i, "invalid \\u escape in a string", s + i, 6);
            v = v * 16 + d;
        }
        if (v == 0)
            return lex_fail(lx, i, "\\u0000 is not allowed in names or values", NULL, 0);
        i += 6;
    }
    return lex_fail(lx, at, "unterminated string", NULL, 0);
}

static int header_lex(const char *json, size_t len, const char *where, ms_error *err)
{
    lex_ctx lx = {.json = json, .len = len, .where = where, .err = err};
    long depth = 0;         /* open brackets; cJSON checks that they match */
    bool expect_key = false; /* at depth 1, the next string is a top-level key */
    size_t i = 0;
    while (i < len) {
        unsigned char c = (unsigned char)json[i];
        if (is_json_space(c)) {
            i++;
        } else if (c == '{' || c == '[') {
            depth++;
            if (depth == 1)
                expect_key = c == '{';
            i++;
        } else if (c == '}' || c == ']') {
            depth--;
            i++;
        } else if (c == ',') {
            if (depth == 1)
                expect_key = true;
            i++;
        } else if (c == '"') {
            size_t next = 0;
            if (lex_string(&lx, i, &next) != 0)
                return -1;
            if (depth == 1 && expect_key) {
                lx.key = json + i + 1;
                lx.key_len = next - i - 2;
                expect_key = false;
            }
            i = next;
        } else if (is_number_char(c) && c != 'e' && c != 'E') {
            size_t n = 1;
            while (i + n < len && is_number_char((unsigned char)json[i + n]))
                n++;
            if (lex_number(&lx, i, n) != 0)
                return -1;
            i += n;
        } else if (c < 0x20 || c == 0x7f) {
            return lex_fail(&lx, i, "control character outside a string", NULL, 0);
        } else {
            i++; /* ':' and literals; cJSON judges them */
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Pass 3: structure                                                        */
/* ------------------------------------------------------------------------ */

/* A number item as an integer; the lexical scan already guaranteed integral
 * text of at most 2^53, this re-checks the double it became. */
static bool json_uint(const cJSON *item, uint64_t *out)
{
    if (!cJSON_IsNumber(item))
        return false;
    double d = item->valuedouble;
    if (!(d >= 0.0 && d <= (double)ST_MAX_JSON_INT))
        return false;
    uint64_t v = (uint64_t)d;
    if ((double)v != d)
        return false;
    *out = v;
    return true;
}

/* Fills t (name already set) from its header entry. Keys other than dtype,
 * shape and data_offsets are ignored, as the reference does (its TensorInfo
 * has no deny_unknown_fields); a repeated key is an error, as serde's
 * "duplicate field". */
static int tensor_entry_parse(const cJSON *entry, st_tensor *t, const char *where,
                              ms_error *err)
{
    char nb[ST_MSG_NAME_MAX + 4];
    const char *name = msg_name(t->name, strlen(t->name), nb);
    if (!cJSON_IsObject(entry))
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': entry must be an object with dtype, shape and "
                            "data_offsets",
                            name);
    const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
    for (const cJSON *k = entry->child; k; k = k->next) {
        const cJSON **slot = NULL;
        if (strcmp(k->string, "dtype") == 0)
            slot = &dtype;
        else if (strcmp(k->string, "shape") == 0)
            slot = &shape;
        else if (strcmp(k->string, "data_offsets") == 0)
            slot = &offsets;
        if (!slot)
            continue;
        if (*slot)
            return ms_error_set(err, MS_EXIT_DATA, where, "tensor '%s': duplicate key \"%s\"",
                                name, k->string);
        *slot = k;
    }
    if (!dtype || !shape || !offsets)
        return ms_error_set(err, MS_EXIT_DATA, where, "tensor '%s': missing key \"%s\"", name,
                            !dtype ? "dtype" : !shape ? "shape" : "data_offsets");

    char db[ST_MSG_NAME_MAX + 4];
    if (!cJSON_IsString(dtype))
        return ms_error_set(err, MS_EXIT_DATA, where, "tensor '%s': dtype must be a string",
                            name);
    if (!st_dtype_parse(dtype->valuestring, &t->dtype))
        return ms_error_set(err, MS_EXIT_DATA, where, "tensor '%s': unknown dtype '%s'", name,
                            msg_name(dtype->valuestring, strlen(dtype->valuestring), db));

    if (!cJSON_IsArray(shape))
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': shape must be an array of non-negative integers",
                            name);
    unsigned ndim = 0;
    for (const cJSON *d = shape->child; d; d = d->next) {
        if (ndim == ST_MAX_DIMS)
            return ms_error_set(err, MS_EXIT_DATA, where,
                                "tensor '%s': shape has more than %d dimensions", name,
                                ST_MAX_DIMS);
        if (!json_uint(d, &t->shape[ndim]))
            return ms_error_set(err, MS_EXIT_DATA, where,
                                "tensor '%s': shape[%u] must be a non-negative integer", name,
                                ndim);
        ndim++;
    }
    t->ndim = ndim;

    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': data_offsets must be an array of exactly 2 "
                            "non-negative integers",
                            name);
    if (!json_uint(offsets->child, &t->begin) || !json_uint(offsets->child->next, &t->end))
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': data_offsets must be non-negative integers", name);
    if (t->begin > t->end)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': invalid data_offsets [%llu, %llu]: begin is after end",
                            name, (unsigned long long)t->begin, (unsigned long long)t->end);

    if (st_shape_numel(t->shape, t->ndim, &t->numel) != 0)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': element count of the shape overflows 64 bits", name);
    uint64_t nbytes;
    int rc = st_dtype_nbytes(t->dtype, t->numel, &nbytes);
    if (rc == -EOVERFLOW)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': byte size of %llu %s elements overflows 64 bits", name,
                            (unsigned long long)t->numel, st_dtype_name(t->dtype));
    if (rc != 0)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': misaligned sub-byte tensor: %llu %s elements of %u "
                            "bits do not end on a byte boundary",
                            name, (unsigned long long)t->numel, st_dtype_name(t->dtype),
                            st_dtype_bits(t->dtype));
    if (t->end - t->begin != nbytes)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': data_offsets [%llu, %llu] hold %llu bytes but shape "
                            "and dtype %s need %llu",
                            name, (unsigned long long)t->begin, (unsigned long long)t->end,
                            (unsigned long long)(t->end - t->begin), st_dtype_name(t->dtype),
                            (unsigned long long)nbytes);
    return 0;
}

/* "__metadata__": an object of string values, or null. Repeated keys are an
 * error (the reference keeps the last silently; we refuse the ambiguity). */
static int header_meta_parse(const cJSON *meta, st_header *h, const char *where, ms_error *err)
{
    if (cJSON_IsNull(meta))
        return 0;
    if (!cJSON_IsObject(meta))
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "__metadata__ must be an object of string values, or null");
    size_t n = 0;
    for (const cJSON *k = meta->child; k; k = k->next)
        n++;
    if (n == 0)
        return 0;
    h->meta_keys = calloc(n, sizeof *h->meta_keys);
    h->meta_values = calloc(n, sizeof *h->meta_values);
    if (!h->meta_keys || !h->meta_values)
        return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory reading __metadata__");
    char kb[ST_MSG_NAME_MAX + 4];
    for (const cJSON *k = meta->child; k; k = k->next) {
        if (!cJSON_IsString(k))
            return ms_error_set(err, MS_EXIT_DATA, where,
                                "__metadata__: value of '%s' must be a string",
                                msg_name(k->string, strlen(k->string), kb));
        size_t i = h->n_meta;
        h->meta_keys[i] = strdup(k->string);
        h->meta_values[i] = strdup(k->valuestring);
        h->n_meta++; /* counted before the check so st_header_free frees both */
        if (!h->meta_keys[i] || !h->meta_values[i])
            return ms_error_set(err, MS_EXIT_RUNTIME, where,
                                "out of memory reading __metadata__");
    }
    return 0;
}

static int cmp_str_index(const void *a, const void *b, void *ctx)
{
    char *const *names = ctx;
    size_t ia = *(const size_t *)a, ib = *(const size_t *)b;
    int c = strcmp(names[ia], names[ib]);
    return c ? c : (ia > ib) - (ia < ib);
}

/* -1 with err set when two metadata keys are equal. */
static int meta_check_unique(const st_header *h, const char *where, ms_error *err)
{
    if (h->n_meta < 2)
        return 0;
    size_t *order = malloc(h->n_meta * sizeof *order);
    if (!order)
        return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory reading __metadata__");
    for (size_t i = 0; i < h->n_meta; i++)
        order[i] = i;
    qsort_r(order, h->n_meta, sizeof *order, cmp_str_index, h->meta_keys);
    int rc = 0;
    for (size_t i = 1; i < h->n_meta; i++) {
        const char *k = h->meta_keys[order[i]];
        if (strcmp(h->meta_keys[order[i - 1]], k) == 0) {
            char kb[ST_MSG_NAME_MAX + 4];
            rc = ms_error_set(err, MS_EXIT_DATA, where, "__metadata__: duplicate key '%s'",
                              msg_name(k, strlen(k), kb));
            break;
        }
    }
    free(order);
    return rc;
}

static int cmp_tensor_name(const void *a, const void *b, void *ctx)
{
    const st_tensor *t = ctx;
    size_t ia = *(const size_t *)a, ib = *(const size_t *)b;
    int c = strcmp(t[ia].name, t[ib].name);
    return c ? c : (ia > ib) - (ia < ib);
}

static int cmp_tensor_offsets(const void *a, const void *b, void *ctx)
{
    const st_tensor *t = ctx;
    size_t ia = *(const size_t *)a, ib = *(const size_t *)b;
    if (t[ia].begin != t[ib].begin)
        return t[ia].begin < t[ib].begin ? -1 : 1;
    if (t[ia].end != t[ib].end)
        return t[ia].end < t[ib].end ? -1 : 1;
    return (ia > ib) - (ia < ib); /* header order among equal (empty) tensors */
}

/* Reorders h->tensors by (begin, end, header index). */
static int tensors_sort_by_offset(st_header *h, const char *where, ms_error *err)
{
    size_t n = h->n_tensors;
    if (n < 2)
        return 0;
    size_t *order = malloc(n * sizeof *order);
    st_tensor *sorted = malloc(n * sizeof *sorted);
    if (!order || !sorted) {
        free(order);
        free(sorted);
        return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory sorting tensors");
    }
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    qsort_r(order, n, sizeof *order, cmp_tensor_offsets, h->tensors);
    for (size_t i = 0; i < n; i++)
        sorted[i] = h->tensors[order[i]];
    free(h->tensors);
    h->tensors = sorted;
    free(order);
    return 0;
}

/* Offsets, in sorted order, must tile [0, data_len): each tensor begins where
 * the previous one ends (the reference's InvalidOffset rule). */
static int tensors_check_layout(st_header *h, const char *where, ms_error *err)
{
    uint64_t expect = 0;
    char nb[ST_MSG_NAME_MAX + 4], pb[ST_MSG_NAME_MAX + 4];
    for (size_t i = 0; i < h->n_tensors; i++) {
        const st_tensor *t = &h->tensors[i];
        if (t->begin == expect) {
            expect = t->end;
            continue;
        }
        const char *name = msg_name(t->name, strlen(t->name), nb);
        if (i == 0)
            return ms_error_set(err, MS_EXIT_DATA, where,
                                "invalid offset for tensor '%s': the data section must start "
                                "at offset 0, but the first tensor begins at %llu",
                                name, (unsigned long long)t->begin);
        const char *prev = msg_name(h->tensors[i - 1].name, strlen(h->tensors[i - 1].name), pb);
        if (t->begin > expect)
            return ms_error_set(err, MS_EXIT_DATA, where,
                                "invalid offset for tensor '%s': gap in the data section: it "
                                "begins at %llu but tensor '%s' ends at %llu",
                                name, (unsigned long long)t->begin, prev,
                                (unsigned long long)expect);
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "invalid offset for tensor '%s': it overlaps tensor '%s' (begins at "
                            "%llu, before %llu where '%s' ends)",
                            name, prev, (unsigned long long)t->begin,
                            (unsigned long long)expect, prev);
    }
    h->data_len = expect;
    return 0;
}

/* Builds h->name_order and rejects duplicate names. */
static int tensors_index_names(st_header *h, const char *where, ms_error *err)
{
    size_t n = h->n_tensors;
    if (n == 0)
        return 0;
    h->name_order = malloc(n * sizeof *h->name_order);
    if (!h->name_order)
        return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory indexing tensor names");
    for (size_t i = 0; i < n; i++)
        h->name_order[i] = i;
    qsort_r(h->name_order, n, sizeof *h->name_order, cmp_tensor_name, h->tensors);
    for (size_t i = 1; i < n; i++) {
        const char *a = h->tensors[h->name_order[i - 1]].name;
        const char *b = h->tensors[h->name_order[i]].name;
        if (strcmp(a, b) == 0) {
            char nb[ST_MSG_NAME_MAX + 4];
            return ms_error_set(err, MS_EXIT_DATA, where, "duplicate tensor name '%s'",
                                msg_name(b, strlen(b), nb));
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Header                                                                   */
/* ------------------------------------------------------------------------ */

void st_header_free(st_header *h)
{
    if (!h)
        return;
    if (h->tensors) {
        for (size_t i = 0; i < h->n_tensors; i++)
            free(h->tensors[i].name);
    }
    free(h->tensors);
    free(h->name_order);
    for (size_t i = 0; i < h->n_meta; i++) {
        free(h->meta_keys[i]);
        free(h->meta_values[i]);
    }
    free(h->meta_keys);
    free(h->meta_values);
    memset(h, 0, sizeof *h);
}

int st_header_parse(const char *json, size_t len, uint64_t file_size, const char *where,
                    st_header *out, ms_error *err)
{
    st_header h = {.header_len = len};
    cJSON *root = NULL;
    memset(out, 0, sizeof *out);

    if (len > ST_MAX_HEADER_BYTES) {
        ms_error_set(err, MS_EXIT_DATA, where, "header too large: %zu bytes, the limit is %llu",
                     len, ST_MAX_HEADER_BYTES);
        goto fail;
    }
    size_t bad = utf8_first_invalid((const unsigned char *)json, len);
    if (bad != len) {
        ms_error_set(err, MS_EXIT_DATA, where, "header is not valid UTF-8 (byte %zu: 0x%02x)",
                     bad, (unsigned)(unsigned char)json[bad]);
        goto fail;
    }
    /* The reference has this check commented out for a future version;
     * every writer starts with '{', so we require it now. */
    if (len == 0 || json[0] != '{') {
        ms_error_set(err, MS_EXIT_DATA, where,
                     "invalid start of header: it must be a JSON object starting with '{'");
        goto fail;
    }
    if (header_lex(json, len, where, err) != 0)
        goto fail;

    /* Length-bounded: cJSON never reads json[len]. On failure it also writes
     * a process-wide "last error" (cJSON_GetErrorPtr, unused here): a benign
     * race if two threads parse broken headers at once. */
    const char *end = NULL;
    root = cJSON_ParseWithLengthOpts(json, len, &end, false);
    bool end_ok = end && end >= json && end <= json + len;
    if (!root) {
        ms_error_set(err, MS_EXIT_DATA, where, "invalid JSON in header (near byte %zu)",
                     end_ok ? (size_t)(end - json) : (size_t)0);
        goto fail;
    }
    if (!cJSON_IsObject(root) || !end_ok) {
        ms_error_set(err, MS_EXIT_DATA, where, "header must be a JSON object");
        goto fail;
    }
    /* Writers pad the header with spaces to a multiple of 8; like serde_json,
     * accept any JSON whitespace after the object and nothing else. */
    for (size_t i = (size_t)(end - json); i < len; i++) {
        if (!is_json_space((unsigned char)json[i])) {
            ms_error_set(err, MS_EXIT_DATA, where,
                         "trailing bytes after the header's JSON object (byte %zu: 0x%02x)", i,
                         (unsigned)(unsigned char)json[i]);
            goto fail;
        }
    }

    size_t n_tensors = 0;
    const cJSON *meta = NULL;
    for (const cJSON *k = root->child; k; k = k->next) {
        if (strcmp(k->string, "__metadata__") != 0) {
            n_tensors++;
        } else if (meta) {
            ms_error_set(err, MS_EXIT_DATA, where, "duplicate key \"__metadata__\"");
            goto fail;
        } else {
            meta = k;
        }
    }
    if (meta && (header_meta_parse(meta, &h, where, err) != 0 ||
                 meta_check_unique(&h, where, err) != 0))
        goto fail;

    if (n_tensors > 0) {
        h.tensors = calloc(n_tensors, sizeof *h.tensors);
        if (!h.tensors) {
            ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory reading %zu tensor entries",
                         n_tensors);
            goto fail;
        }
        h.n_tensors = n_tensors; /* names are NULL until set: st_header_free copes */
    }
    size_t ti = 0;
    for (const cJSON *k = root->child; k; k = k->next) {
        if (k == meta)
            continue;
        st_tensor *t = &h.tensors[ti++];
        t->name = strdup(k->string);
        if (!t->name) {
            ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory reading tensor names");
            goto fail;
        }
        if (tensor_entry_parse(k, t, where, err) != 0)
            goto fail;
    }
    cJSON_Delete(root);
    root = NULL;

    /* Sort first: name_order indexes the sorted array. */
    if (tensors_sort_by_offset(&h, where, err) != 0 || tensors_index_names(&h, where, err) != 0 ||
        tensors_check_layout(&h, where, err) != 0)
        goto fail;

    if (file_size != UINT64_MAX) {
        /* Cannot overflow: len <= 1e8 and data_len <= 2^53. */
        uint64_t need = ST_LEN_FIELD_BYTES + (uint64_t)len + h.data_len;
        if (need < file_size) {
            ms_error_set(err, MS_EXIT_DATA, where,
                         "incomplete metadata, file not fully covered: %llu trailing bytes "
                         "after the data section (file is %llu bytes, header and data need "
                         "%llu)",
                         (unsigned long long)(file_size - need), (unsigned long long)file_size,
                         (unsigned long long)need);
            goto fail;
        }
        if (need > file_size) {
            ms_error_set(err, MS_EXIT_DATA, where,
                         "file is truncated: header and data need %llu bytes, the file has "
                         "%llu (%llu missing)",
                         (unsigned long long)need, (unsigned long long)file_size,
                         (unsigned long long)(need - file_size));
            goto fail;
        }
    }
    *out = h;
    return 0;

fail:
    cJSON_Delete(root);
    st_header_free(&h);
    return -1;
}

long st_header_find(const st_header *h, const char *name)
{
    if (!h->name_order) {
        for (size_t i = 0; i < h->n_tensors; i++) {
            if (strcmp(h->tensors[i].name, name) == 0)
                return (long)i;
        }
        return -1;
    }
    size_t lo = 0, hi = h->n_tensors; /* the answer lies in name_order[lo, hi) */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        size_t idx = h->name_order[mid];
        int c = strcmp(name, h->tensors[idx].name);
        if (c == 0)
            return (long)idx;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return -1;
}

/* ------------------------------------------------------------------------ */
/* Length field and files                                                   */
/* ------------------------------------------------------------------------ */

/* The reference's order: the size cap first, then the bounds of the file. */
static int header_len_check(uint64_t n, uint64_t file_size, const char *where, ms_error *err)
{
    if (n > ST_MAX_HEADER_BYTES)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "header too large: the length field says %llu bytes, the limit is "
                            "%llu",
                            (unsigned long long)n, ST_MAX_HEADER_BYTES);
    if (n > file_size - ST_LEN_FIELD_BYTES) /* file_size >= 8 here */
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "invalid header length: %llu bytes run past the end of the file "
                            "(file is %llu bytes)",
                            (unsigned long long)n, (unsigned long long)file_size);
    return 0;
}

static int file_too_small(uint64_t size, const char *where, ms_error *err)
{
    return ms_error_set(err, MS_EXIT_DATA, where,
                        "header too small: the file is %llu bytes, shorter than the 8-byte "
                        "header length field",
                        (unsigned long long)size);
}

int st_image_parse(const void *data, size_t size, const char *where, st_header *out,
                   ms_error *err)
{
    memset(out, 0, sizeof *out);
    if (size < ST_LEN_FIELD_BYTES)
        return file_too_small(size, where, err);
    uint64_t n = le64_load(data);
    if (header_len_check(n, size, where, err) != 0)
        return -1;
    return st_header_parse((const char *)data + ST_LEN_FIELD_BYTES, (size_t)n, size, where, out,
                           err);
}

static bool path_has_suffix(const char *path, const char *suffix)
{
    size_t n = strlen(path), m = strlen(suffix);
    return n >= m && strcasecmp(path + n - m, suffix) == 0;
}

static int read_fail(int rc, const char *path, const char *what, ms_error *err)
{
    if (rc == -ENODATA)
        return ms_error_set(err, MS_EXIT_RUNTIME, path,
                            "reading the %s: the file ended early (did it change while open?)",
                            what);
    return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, path, "reading the %s", what);
}

int st_file_open(const char *path, st_file **out, ms_error *err)
{
    *out = NULL;
    if (path_has_suffix(path, ".bin") || path_has_suffix(path, ".pt") || path_has_suffix(path, ".pth"))
        return ms_error_set(err, MS_EXIT_DATA, path,
                            "PyTorch checkpoint files (.bin, .pt) are not supported: convert the "
                            "model to .safetensors first");
    return st_file_open_any_name(path, out, err);
}

int st_file_open_any_name(const char *path, st_file **out, ms_error *err)
{
    st_file *f = NULL;
    char *json = NULL;
    *out = NULL;
    f = calloc(1, sizeof *f);
    if (f)
        f->fd = f->direct_fd = -1;
    if (!f || !(f->path = strdup(path))) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "opening");
        goto fail;
    }
    /* O_NONBLOCK so that a FIFO cannot hang the open; cleared below. */
    f->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (f->fd < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, errno, path, "cannot open");
        goto fail;
    }
    struct stat st;
    if (fstat(f->fd, &st) != 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, errno, path, "cannot stat");
        goto fail;
    }
    if (S_ISDIR(st.st_mode)) {
        ms_error_set(err, MS_EXIT_DATA, path,
                     "is a directory, not a .safetensors file (pass the file itself, or the "
                     "directory where a model directory is expected)");
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        ms_error_set(err, MS_EXIT_DATA, path, "is not a regular file");
        goto fail;
    }
    int fl = fcntl(f->fd, F_GETFL);
    if (fl < 0 || fcntl(f->fd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, errno, path, "fcntl");
        goto fail;
    }
    f->file_size = (uint64_t)st.st_size;
    f->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    if (f->file_size < ST_LEN_FIELD_BYTES) {
        file_too_small(f->file_size, path, err);
        goto fail;
    }
    unsigned char lenbuf[ST_LEN_FIELD_BYTES];
    int rc = ms_pread_all(f->fd, lenbuf, sizeof lenbuf, 0);
    if (rc != 0) {
        read_fail(rc, path, "header length", err);
        goto fail;
    }
    uint64_t n = le64_load(lenbuf);
    if (n > ST_MAX_HEADER_BYTES) {
        /* A legitimate length is below 2^27, so these magics can only show
         * up here; name them instead of quoting an absurd length. */
        if (memcmp(lenbuf, "PK\x03\x04", 4) == 0) {
            ms_error_set(err, MS_EXIT_DATA, path,
                         "is a zip archive (a PyTorch checkpoint?), not a safetensors file");
            goto fail;
        }
        if (lenbuf[0] == 0x80 && lenbuf[1] >= 2 && lenbuf[1] <= 5) {
            ms_error_set(err, MS_EXIT_DATA, path,
                         "is a Python pickle (a PyTorch checkpoint?), not a safetensors file");
            goto fail;
        }
        bool text = true; /* a JSON or text file given where weights belong */
        for (unsigned i = 0; i < ST_LEN_FIELD_BYTES && text; i++)
            text = (lenbuf[i] >= 0x20 && lenbuf[i] < 0x7f) || lenbuf[i] == '\n' || lenbuf[i] == '\r' ||
                   lenbuf[i] == '\t';
        if (text) {
            char start[ST_LEN_FIELD_BYTES + 1];
            for (unsigned i = 0; i < ST_LEN_FIELD_BYTES; i++)
                start[i] = lenbuf[i] < 0x20 ? ' ' : (char)lenbuf[i]; /* one line */
            start[ST_LEN_FIELD_BYTES] = '\0';
            ms_error_set(err, MS_EXIT_DATA, path, "is a text file (it starts with \"%s\"), not a safetensors file",
                         start);
            goto fail;
        }
    }
    if (header_len_check(n, f->file_size, path, err) != 0)
        goto fail;
    json = malloc((size_t)n + 1); /* n <= 1e8; +1 so that n = 0 is not malloc(0) */
    if (!json) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "reading a %llu-byte header",
                       (unsigned long long)n);
        goto fail;
    }
    rc = ms_pread_all(f->fd, json, (size_t)n, ST_LEN_FIELD_BYTES);
    if (rc != 0) {
        read_fail(rc, path, "header", err);
        goto fail;
    }
    if (st_header_parse(json, (size_t)n, f->file_size, path, &f->header, err) != 0)
        goto fail;
    f->data_start = ST_LEN_FIELD_BYTES + n;
    free(json);
    *out = f;
    return 0;

fail:
    free(json);
    st_file_close(f);
    return -1;
}

void st_file_close(st_file *f)
{
    if (!f)
        return;
    if (f->fd >= 0)
        close(f->fd);
    if (f->direct_fd >= 0)
        close(f->direct_fd);
    free(f->path);
    st_header_free(&f->header);
    free(f);
}

int st_file_check_unchanged(const st_file *f, ms_error *err)
{
    struct stat now, by_path;
    if (fstat(f->fd, &now) != 0)
        return ms_error_errno(err, MS_EXIT_RUNTIME, errno, f->path, "cannot stat");
    int64_t mtime = (int64_t)now.st_mtim.tv_sec * 1000000000 + now.st_mtim.tv_nsec;
    if ((uint64_t)now.st_size != f->file_size || mtime != f->mtime_ns)
        return ms_error_set(err, MS_EXIT_DATA, f->path,
                            "the file changed during the merge (size or modification time); the output is not trusted");
    /* replaced by rename: our descriptor still reads the old file, which is
     * fine for the bytes we read, but the user's model is no longer what we merged */
    if (stat(f->path, &by_path) == 0 && (by_path.st_ino != now.st_ino || by_path.st_dev != now.st_dev))
        return ms_error_set(err, MS_EXIT_DATA, f->path, "the file was replaced during the merge");
    return 0;
}

void st_shape_format(const st_tensor *t, char *buf, size_t n)
{
    if (n == 0)
        return;
    size_t used = (size_t)snprintf(buf, n, "[");
    for (unsigned d = 0; d < t->ndim && used < n; d++)
        used += (size_t)snprintf(buf + used, n - used, d ? ", %" PRIu64 : "%" PRIu64, t->shape[d]);
    if (used < n)
        snprintf(buf + used, n - used, "]");
}
