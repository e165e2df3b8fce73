/* Tests for io/st_format.c: the safetensors reader and validator.
 *
 * Every file is generated at test time in a mkdtemp directory: an 8-byte
 * length, a JSON header, random data bytes. Each rule is checked on both
 * sides of its boundary; sizes, overflow and layout rules are also checked
 * against slow reference code (128-bit arithmetic, an exact-cover bitmap, a
 * code-point UTF-8 decoder) on random inputs. The seed is printed; set
 * ST_TEST_SEED to replay a run. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "io/st_format.h"

static char g_dir[PATH_MAX];
static unsigned g_file_no;
static uint64_t g_rng;

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static uint64_t rng_next(void) /* splitmix64 */
{
    uint64_t z = (g_rng += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static uint64_t rng_below(uint64_t n) { return n ? rng_next() % n : 0; }

static void fill_random(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(rng_next() | 1); /* never a run of zeros */
}

static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    char *s = NULL;
    assert_true(vasprintf(&s, f, ap) >= 0);
    va_end(ap);
    return s;
}

static char *path_new(const char *ext)
{
    return fmt("%s/t%04u%s", g_dir, g_file_no++, ext);
}

static void le64_store(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* Writes len_field (little endian), hdr[0..hdr_len), then data_len random
 * bytes (or the given data) to a fresh file; returns its path (caller frees). */
static char *file_write_data(uint64_t len_field, const void *hdr, size_t hdr_len,
                             const void *data, size_t data_len)
{
    char *path = path_new(".safetensors");
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    assert_true(fd >= 0);
    unsigned char lb[8];
    le64_store(lb, len_field);
    unsigned char *rnd = NULL;
    if (!data && data_len) {
        rnd = malloc(data_len);
        assert_non_null(rnd);
        fill_random(rnd, data_len);
        data = rnd;
    }
    assert_int_equal(write(fd, lb, 8), 8);
    if (hdr_len)
        assert_int_equal(write(fd, hdr, hdr_len), (ssize_t)hdr_len);
    if (data_len)
        assert_int_equal(write(fd, data, data_len), (ssize_t)data_len);
    assert_int_equal(close(fd), 0);
    free(rnd);
    return path;
}

static char *file_write(uint64_t len_field, const void *hdr, size_t hdr_len, size_t data_len)
{
    return file_write_data(len_field, hdr, hdr_len, NULL, data_len);
}

static char *file_json(const char *json, size_t data_len)
{
    return file_write(strlen(json), json, strlen(json), data_len);
}

static void check_failure(int rc, const ms_error *err, const char *path, const char *needle,
                          int exit_code)
{
    if (rc == 0 || err->exit_code != exit_code || (path && !strstr(err->msg, path)) ||
        !strstr(err->msg, needle))
        print_error("expected failure with \"%s\" (exit %d), got rc %d exit %d: %s\n", needle,
                    exit_code, rc, err->exit_code, err->msg);
    assert_int_equal(rc, -1);
    assert_int_equal(err->exit_code, exit_code);
    if (path)
        assert_non_null(strstr(err->msg, path));
    assert_non_null(strstr(err->msg, needle));
}

/* Writes json + data_len bytes, expects st_file_open to fail with a message
 * naming the file and containing needle; the in-memory parser must agree. */
static void expect_fail_n(const char *json, size_t json_len, size_t data_len, const char *needle)
{
    char *path = file_write(json_len, json, json_len, data_len);
    st_file *f = (st_file *)0x1;
    ms_error err = {0};
    int rc = st_file_open(path, &f, &err);
    check_failure(rc, &err, path, needle, MS_EXIT_DATA);
    assert_null(f);

    st_header h;
    ms_error err2 = {0};
    rc = st_header_parse(json, json_len, 8 + json_len + data_len, "mem", &h, &err2);
    check_failure(rc, &err2, "mem", needle, MS_EXIT_DATA);
    assert_null(h.tensors);
    assert_int_equal(h.n_tensors, 0);
    free(path);
}

static void expect_fail(const char *json, size_t data_len, const char *needle)
{
    expect_fail_n(json, strlen(json), data_len, needle);
}

static st_file *expect_ok_n(const char *json, size_t json_len, size_t data_len)
{
    char *path = file_write(json_len, json, json_len, data_len);
    st_file *f = NULL;
    ms_error err = {0};
    int rc = st_file_open(path, &f, &err);
    if (rc != 0)
        print_error("unexpected failure: %s\nheader: %.*s\n", err.msg, (int)json_len, json);
    assert_int_equal(rc, 0);
    assert_non_null(f);
    assert_string_equal(f->path, path);
    assert_int_equal(f->file_size, 8 + json_len + data_len);
    assert_int_equal(f->data_start, 8 + json_len);
    assert_int_equal(f->header.header_len, json_len);
    assert_int_equal(f->header.data_len, data_len);
    free(path);
    return f;
}

static st_file *expect_ok(const char *json, size_t data_len)
{
    return expect_ok_n(json, strlen(json), data_len);
}

/* A one-tensor header. */
static char *one_tensor(const char *dtype, const char *shape, const char *offsets)
{
    return fmt("{\"t\":{\"dtype\":\"%s\",\"shape\":%s,\"data_offsets\":%s}}", dtype, shape,
               offsets);
}

static void expect_one_fail(const char *dtype, const char *shape, const char *offsets,
                            size_t data_len, const char *needle)
{
    char *j = one_tensor(dtype, shape, offsets);
    expect_fail(j, data_len, needle);
    free(j);
}

static void expect_one_ok(const char *dtype, const char *shape, const char *offsets,
                          size_t data_len)
{
    char *j = one_tensor(dtype, shape, offsets);
    st_file_close(expect_ok(j, data_len));
    free(j);
}

/* ------------------------------------------------------------------------ */
/* dtypes                                                                   */
/* ------------------------------------------------------------------------ */

/* The reference's table (safetensors Dtype::bitsize), written out again. */
static const struct {
    const char *name;
    unsigned bits;
} k_ref_dtypes[] = {
    {"BOOL", 8},     {"F4", 4},       {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},
    {"I8", 8},       {"F8_E5M2", 8},  {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"I16", 16},
    {"U16", 16},     {"F16", 16},     {"BF16", 16},   {"I32", 32},    {"U32", 32},
    {"F32", 32},     {"F64", 64},     {"I64", 64},    {"U64", 64},    {"C64", 64},
};
#define N_REF_DTYPES (sizeof k_ref_dtypes / sizeof k_ref_dtypes[0])

static void test_dtype_table(void **state)
{
    (void)state;
    assert_int_equal(N_REF_DTYPES, ST_DTYPE_COUNT);
    for (size_t i = 0; i < N_REF_DTYPES; i++) {
        st_dtype d = ST_DTYPE_COUNT;
        assert_true(st_dtype_parse(k_ref_dtypes[i].name, &d));
        assert_string_equal(st_dtype_name(d), k_ref_dtypes[i].name);
        assert_int_equal(st_dtype_bits(d), k_ref_dtypes[i].bits);
        bool merge = !strcmp(k_ref_dtypes[i].name, "F16") || !strcmp(k_ref_dtypes[i].name, "BF16") ||
                     !strcmp(k_ref_dtypes[i].name, "F32");
        assert_int_equal(st_dtype_is_mergeable_float(d), merge);
    }
    for (unsigned d = 0; d < ST_DTYPE_COUNT; d++)
        assert_non_null(st_dtype_name((st_dtype)d));
    assert_null(st_dtype_name(ST_DTYPE_COUNT));
    assert_int_equal(st_dtype_bits(ST_DTYPE_COUNT), 0);
    st_dtype d = ST_F32;
    const char *bad[] = {"f32", "F32 ", "", "F8_E4M3FN", "PackedI4", "float32", "BF"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_false(st_dtype_parse(bad[i], &d));
        assert_int_equal(d, ST_F32);
    }
}

static void test_every_dtype_file(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_REF_DTYPES; i++) {
        /* 8 elements: bits bytes, a whole number for every dtype */
        unsigned bytes = k_ref_dtypes[i].bits;
        char *off = fmt("[0,%u]", bytes);
        char *j = one_tensor(k_ref_dtypes[i].name, "[2,4]", off);
        st_file *f = expect_ok(j, bytes);
        assert_int_equal(f->header.n_tensors, 1);
        const st_tensor *t = &f->header.tensors[0];
        assert_string_equal(st_dtype_name(t->dtype), k_ref_dtypes[i].name);
        assert_int_equal(t->numel, 8);
        assert_int_equal(t->ndim, 2);
        assert_int_equal(st_tensor_nbytes(t), bytes);
        st_file_close(f);
        free(j);
        free(off);
        /* one byte short of the need: rejected */
        off = fmt("[0,%u]", bytes - 1);
        expect_one_fail(k_ref_dtypes[i].name, "[2,4]", off, bytes - 1, "need");
        free(off);
    }
    expect_one_fail("F128", "[1]", "[0,16]", 16, "unknown dtype 'F128'");
    expect_one_fail("f32", "[1]", "[0,4]", 4, "unknown dtype");
}

static void test_subbyte_alignment(void **state)
{
    (void)state;
    expect_one_ok("F4", "[2]", "[0,1]", 1);
    expect_one_ok("F4", "[3,2]", "[0,3]", 3);
    expect_one_fail("F4", "[3]", "[0,2]", 2, "misaligned");
    expect_one_fail("F4", "[1]", "[0,1]", 1, "byte boundary");
    expect_one_ok("F6_E2M3", "[4]", "[0,3]", 3);
    expect_one_ok("F6_E3M2", "[8]", "[0,6]", 6);
    expect_one_fail("F6_E2M3", "[2]", "[0,2]", 2, "misaligned");
    expect_one_fail("F6_E3M2", "[5]", "[0,4]", 4, "misaligned");
    expect_one_ok("F6_E3M2", "[0]", "[0,0]", 0);
    expect_one_ok("F4", "[0,3]", "[0,0]", 0);
    /* st_dtype_nbytes directly, both sides */
    uint64_t b = 0;
    assert_int_equal(st_dtype_nbytes(ST_F4, 2, &b), 0);
    assert_int_equal(b, 1);
    assert_int_equal(st_dtype_nbytes(ST_F4, 3, &b), -EINVAL);
    assert_int_equal(st_dtype_nbytes(ST_F6_E2M3, 4, &b), 0);
    assert_int_equal(b, 3);
    assert_int_equal(st_dtype_nbytes(ST_F6_E2M3, 6, &b), -EINVAL);
    assert_int_equal(st_dtype_nbytes(ST_U8, UINT64_MAX / 8, &b), 0);
    assert_int_equal(st_dtype_nbytes(ST_U8, UINT64_MAX / 8 + 1, &b), -EOVERFLOW);
}

/* ------------------------------------------------------------------------ */
/* The length field                                                         */
/* ------------------------------------------------------------------------ */

static void open_expect(const char *path, const char *needle, int exit_code)
{
    st_file *f = (st_file *)0x1;
    ms_error err = {0};
    int rc = st_file_open(path, &f, &err);
    check_failure(rc, &err, path, needle, exit_code);
    assert_null(f);
}

static void test_header_length(void **state)
{
    (void)state;
    /* files shorter than the length field: 0 and 7 bytes */
    for (size_t n = 0; n < 8; n += 7) {
        char *path = path_new(".safetensors");
        unsigned char buf[8];
        fill_random(buf, sizeof buf);
        FILE *fp = fopen(path, "wb");
        assert_non_null(fp);
        assert_int_equal(fwrite(buf, 1, n, fp), n);
        fclose(fp);
        open_expect(path, "shorter than the 8-byte", MS_EXIT_DATA);
        free(path);
        st_header h;
        ms_error err = {0};
        check_failure(st_image_parse(buf, n, "img", &h, &err), &err, "img", "too small",
                      MS_EXIT_DATA);
    }
    /* N = 0 with an 8-byte file: size rules pass, the empty header fails */
    char *p = file_write(0, "", 0, 0);
    open_expect(p, "must be a JSON object", MS_EXIT_DATA);
    free(p);

    const char *j = "{}";
    /* N = 2^64 - 1: the cap, not an overflowing bounds check */
    p = file_write(UINT64_MAX, j, 2, 0);
    open_expect(p, "header too large", MS_EXIT_DATA);
    free(p);
    /* N = 2^64 - 8: 8 + N wraps to 0 if computed naively */
    p = file_write(UINT64_MAX - 7, j, 2, 0);
    open_expect(p, "header too large", MS_EXIT_DATA);
    free(p);
    /* the cap: 100,000,001 is too large; 100,000,000 passes the cap and fails
     * the end-of-file bound instead */
    p = file_write(ST_MAX_HEADER_BYTES + 1, j, 2, 0);
    open_expect(p, "header too large", MS_EXIT_DATA);
    free(p);
    p = file_write(ST_MAX_HEADER_BYTES, j, 2, 0);
    open_expect(p, "run past the end of the file", MS_EXIT_DATA);
    free(p);
    /* N one past the end of the file, then exactly the file */
    p = file_write(3, j, 2, 0);
    open_expect(p, "run past the end of the file", MS_EXIT_DATA);
    free(p);
    st_file_close(expect_ok(j, 0));
}

/* The cap itself, accepted: a 100,000,000-byte header (an object padded with
 * spaces) in memory, and a sparse file whose length field says 100,000,000
 * (zeros after the object: the length rules pass, the byte rules do not). */
static void test_header_length_cap_exact(void **state)
{
    (void)state;
    size_t n = (size_t)ST_MAX_HEADER_BYTES;
    char *img = malloc(8 + n);
    assert_non_null(img);
    le64_store((unsigned char *)img, n);
    const char *j = "{\"__metadata__\":{\"format\":\"pt\"}}";
    memset(img + 8, ' ', n);
    memcpy(img + 8, j, strlen(j));
    st_header h;
    ms_error err = {0};
    int rc = st_image_parse(img, 8 + n, "img", &h, &err);
    if (rc != 0)
        print_error("%s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(h.header_len, n);
    assert_int_equal(h.n_meta, 1);
    st_header_free(&h);
    /* one byte more claimed than the image holds */
    le64_store((unsigned char *)img, n + 1);
    check_failure(st_image_parse(img, 8 + n, "img", &h, &err), &err, "img", "header too large",
                  MS_EXIT_DATA);
    free(img);

    char *path = path_new(".safetensors");
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    unsigned char lb[8];
    le64_store(lb, n);
    assert_int_equal(write(fd, lb, 8), 8);
    assert_int_equal(write(fd, "{}", 2), 2);
    assert_int_equal(ftruncate(fd, (off_t)(8 + n)), 0);
    close(fd);
    st_file *f = NULL;
    rc = st_file_open(path, &f, &err);
    assert_int_equal(rc, -1);
    assert_null(strstr(err.msg, "too large"));
    assert_null(strstr(err.msg, "past the end"));
    assert_non_null(strstr(err.msg, "control character outside a string"));
    unlink(path);
    free(path);
}

/* ------------------------------------------------------------------------ */
/* UTF-8 and JSON shape                                                     */
/* ------------------------------------------------------------------------ */

/* Reference: decode one code point the long way and judge it. */
static bool ref_utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        unsigned len, cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (n - i < len)
            return false;
        for (unsigned k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

/* Parses {"__metadata__":{"k":"<bytes>"}} in memory. */
static int parse_meta_value(const unsigned char *v, size_t n, ms_error *err)
{
    const char *pre = "{\"__metadata__\":{\"k\":\"", *post = "\"}}";
    size_t len = strlen(pre) + n + strlen(post);
    char *j = malloc(len);
    assert_non_null(j);
    memcpy(j, pre, strlen(pre));
    memcpy(j + strlen(pre), v, n);
    memcpy(j + strlen(pre) + n, post, strlen(post));
    st_header h;
    int rc = st_header_parse(j, len, UINT64_MAX, "mem", &h, err);
    if (rc == 0) {
        assert_int_equal(h.n_meta, 1);
        assert_int_equal(strlen(h.meta_values[0]), n);
        assert_memory_equal(h.meta_values[0], v, n);
        st_header_free(&h);
    }
    free(j);
    return rc;
}

static void test_utf8(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        bool ok;
    } cases[] = {
        {"caf\xC3\xA9", true},          {"\xE2\x82\xAC", true},     {"\xF0\x9F\x98\x80", true},
        {"\xF4\x8F\xBF\xBF", true},      {"\xED\x9F\xBF", true},     {"\xEE\x80\x80", true},
        {"\xFF", false},                 {"\xC0\xAF", false},        {"\xC1\xBF", false},
        {"\xE0\x9F\xBF", false},         {"\xED\xA0\x80", false},    {"\xED\xBF\xBF", false},
        {"\xF0\x8F\xBF\xBF", false},     {"\xF4\x90\x80\x80", false}, {"\xF5\x80\x80\x80", false},
        {"\xC3", false},                 {"\xE2\x82", false},        {"\x80", false},
        {"\xC3\xA9\xC3", false},         {"abcdefgh\xC3\xA9xyz", true}, {"abcdefg\x80zz", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const unsigned char *s = (const unsigned char *)cases[i].s;
        size_t n = strlen(cases[i].s);
        assert_int_equal(ref_utf8_valid(s, n), cases[i].ok);
        ms_error err = {0};
        int rc = parse_meta_value(s, n, &err);
        if (cases[i].ok)
            assert_int_equal(rc, 0);
        else
            check_failure(rc, &err, "mem", "not valid UTF-8", MS_EXIT_DATA);
    }
    /* random strings (no quote, backslash or control byte) against the
     * reference decoder: valid code points of every length mixed with
     * random lead and continuation bytes */
    unsigned n_valid = 0, n_invalid = 0;
    for (int iter = 0; iter < 4000; iter++) {
        unsigned char v[40];
        size_t n = 0, pieces = 1 + rng_below(4);
        bool corrupt = rng_below(2);
        for (size_t k = 0; k < pieces; k++) {
            uint32_t cp;
            do {
                static const uint32_t top[4] = {0x80, 0x800, 0x10000, 0x110000};
                cp = (uint32_t)rng_below(top[rng_below(4)]);
            } while (cp < 0x20 || cp == '"' || cp == '\\' || cp == 0x7f ||
                     (cp >= 0xD800 && cp <= 0xDFFF));
            if (cp < 0x80) {
                v[n++] = (unsigned char)cp;
            } else if (cp < 0x800) {
                v[n++] = (unsigned char)(0xC0 | cp >> 6);
                v[n++] = (unsigned char)(0x80 | (cp & 0x3F));
            } else if (cp < 0x10000) {
                v[n++] = (unsigned char)(0xE0 | cp >> 12);
                v[n++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
                v[n++] = (unsigned char)(0x80 | (cp & 0x3F));
            } else {
                v[n++] = (unsigned char)(0xF0 | cp >> 18);
                v[n++] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
                v[n++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
                v[n++] = (unsigned char)(0x80 | (cp & 0x3F));
            }
        }
        if (corrupt) { /* overwrite one byte with a random byte >= 0x80 */
            v[rng_below(n)] = (unsigned char)(0x80 | rng_next());
        }
        ms_error err = {0};
        bool want = ref_utf8_valid(v, n);
        int rc = parse_meta_value(v, n, &err);
        if ((rc == 0) != want)
            print_error("utf8 mismatch (want %d): %s\n", want, err.msg);
        assert_int_equal(rc == 0, want);
        if (want)
            n_valid++;
        else
            n_invalid++;
    }
    assert_true(n_valid > 100 && n_invalid > 100);
    /* a valid multibyte tensor name survives */
    st_file *f = expect_ok("{\"\xC3\xA9\xF0\x9F\x98\x80\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1);
    assert_string_equal(f->header.tensors[0].name, "\xC3\xA9\xF0\x9F\x98\x80");
    st_file_close(f);
    /* invalid UTF-8 in a file */
    expect_fail("{\"\xC3(\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
                "not valid UTF-8");
}

static void test_json_shape(void **state)
{
    (void)state;
    expect_fail("[]", 0, "must be a JSON object");
    expect_fail("5", 0, "must be a JSON object");
    expect_fail("\"x\"", 0, "must be a JSON object");
    expect_fail("null", 0, "must be a JSON object");
    expect_fail(" {}", 0, "starting with '{'");
    expect_fail("\xEF\xBB\xBF{}", 0, "starting with '{'");
    expect_fail("{", 0, "invalid JSON");
    expect_fail("{\"a\"}", 0, "invalid JSON");
    expect_fail("{\"a\":}", 0, "invalid JSON");
    expect_fail("{\"__metadata__\":null,}", 0, "invalid JSON");
    expect_fail("{\"__metadata__\":nul}", 0, "invalid JSON");
    expect_fail("{}x", 0, "trailing bytes");
    expect_fail("{} }", 0, "trailing bytes");
    expect_fail("{}{}", 0, "trailing bytes");
    expect_fail_n("{}\0", 3, 0, "control character");
    expect_fail("{}\x01", 0, "control character");
    expect_fail("{\x0b}", 0, "control character");
    expect_fail("{\"__metadata__\":{\"a\":\"x\ty\"}}", 0, "control character inside a string");
    expect_fail("{\"__metadata__\":{\"a\":\"x\\qy\"}}", 0, "invalid escape");
    expect_fail("{\"__metadata__\":{\"a\":\"x\\u12G4\"}}", 0, "invalid \\u escape");
    expect_fail("{\"__metadata__\":{\"a\":\"x\\u0000\"}}", 0, "\\u0000");
    expect_fail("{\"__metadata__\":{\"a\":\"x\\ud800\"}}", 0, "invalid JSON");
    expect_fail("{\"__metadata__\":{\"a\":\"x", 0, "unterminated string");
    expect_fail("{\"__metadata__\":{\"a\":\"x\\", 0, "unterminated string");
    expect_fail("{\"__metadata__\":{\"a\":\"\\u12", 0, "unterminated string");
    st_file_close(expect_ok("{}", 0));
    st_file_close(expect_ok("{}        ", 0));
    st_file_close(expect_ok("{}\n\t\r ", 0));
    st_file_close(expect_ok("{ \"__metadata__\" : { \"a\" : \"\\u00e9\\ud83d\\ude00\\n\" } }", 0));
    st_file *f = expect_ok("{\"__metadata__\":{\"a\":\"\\u00e9\\ud83d\\ude00\\n\\\"\"}}", 0);
    assert_string_equal(f->header.meta_values[0], "\xC3\xA9\xF0\x9F\x98\x80\n\"");
    st_file_close(f);
}

static void test_metadata(void **state)
{
    (void)state;
    st_file *f = expect_ok("{\"__metadata__\":{\"format\":\"pt\",\"b\":\"\",\"a\":\"x\"}}", 0);
    assert_int_equal(f->header.n_meta, 3);
    assert_string_equal(f->header.meta_keys[0], "format");
    assert_string_equal(f->header.meta_values[0], "pt");
    assert_string_equal(f->header.meta_keys[1], "b");
    assert_string_equal(f->header.meta_values[1], "");
    assert_string_equal(f->header.meta_keys[2], "a");
    assert_int_equal(f->header.n_tensors, 0);
    st_file_close(f);
    f = expect_ok("{\"__metadata__\":null}", 0);
    assert_int_equal(f->header.n_meta, 0);
    st_file_close(f);
    f = expect_ok("{\"__metadata__\":{}}", 0);
    assert_int_equal(f->header.n_meta, 0);
    st_file_close(f);
    expect_fail("{\"__metadata__\":{\"k\":1}}", 0, "__metadata__");
    expect_fail("{\"__metadata__\":{\"k\":1.5}}", 0, "__metadata__: numbers must be");
    expect_fail("{\"__metadata__\":{\"k\":12}}", 0, "value of 'k' must be a string");
    expect_fail("{\"__metadata__\":{\"k\":{\"x\":\"y\"}}}", 0, "value of 'k' must be a string");
    expect_fail("{\"__metadata__\":{\"k\":null}}", 0, "value of 'k' must be a string");
    expect_fail("{\"__metadata__\":{\"k\":true}}", 0, "value of 'k' must be a string");
    expect_fail("{\"__metadata__\":{\"k\":[\"a\"]}}", 0, "value of 'k' must be a string");
    expect_fail("{\"__metadata__\":\"pt\"}", 0, "__metadata__ must be an object");
    expect_fail("{\"__metadata__\":[]}", 0, "__metadata__ must be an object");
    expect_fail("{\"__metadata__\":7}", 0, "__metadata__ must be an object");
    expect_fail("{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"}}", 0, "duplicate key 'a'");
    expect_fail("{\"__metadata__\":null,\"__metadata__\":null}", 0, "duplicate key \"__metadata__\"");
}

/* ------------------------------------------------------------------------ */
/* Tensor entries                                                           */
/* ------------------------------------------------------------------------ */

static void test_tensor_fields(void **state)
{
    (void)state;
    expect_fail("{\"t\":5}", 0, "tensor 't': entry must be an object");
    expect_fail("{\"t\":null}", 0, "entry must be an object");
    expect_fail("{\"t\":[\"F32\"]}", 0, "entry must be an object");
    expect_fail("{\"t\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "missing key \"dtype\"");
    expect_fail("{\"t\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 1, "missing key \"shape\"");
    expect_fail("{\"t\":{\"dtype\":\"U8\",\"shape\":[1]}}", 1, "missing key \"data_offsets\"");
    expect_one_fail("U8\",\"dtype\":\"U8", "[1]", "[0,1]", 1, "duplicate key \"dtype\"");
    expect_fail("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
                "duplicate key \"shape\"");
    expect_fail("{\"t\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
                "dtype must be a string");
    expect_fail("{\"t\":{\"dtype\":null,\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
                "dtype must be a string");
    expect_one_fail("U8", "1", "[0,1]", 1, "shape must be an array");
    expect_one_fail("U8", "{}", "[0,1]", 1, "shape must be an array");
    expect_one_fail("U8", "[\"1\"]", "[0,1]", 1, "shape[0] must be a non-negative integer");
    expect_one_fail("U8", "[1,null]", "[0,1]", 1, "shape[1] must be");
    expect_one_fail("U8", "[[1]]", "[0,1]", 1, "shape[0] must be");
    expect_one_fail("U8", "[1]", "[0]", 1, "exactly 2");
    expect_one_fail("U8", "[1]", "[0,1,1]", 1, "exactly 2");
    expect_one_fail("U8", "[1]", "[]", 1, "exactly 2");
    expect_one_fail("U8", "[1]", "{\"a\":0,\"b\":1}", 1, "exactly 2");
    expect_one_fail("U8", "[1]", "[0,\"1\"]", 1, "data_offsets must be non-negative integers");
    expect_one_fail("U8", "[1]", "[true,1]", 1, "data_offsets must be non-negative integers");
    expect_one_fail("U8", "[0]", "[1,0]", 0, "begin is after end");
    /* dimensions: ST_MAX_DIMS is accepted, one more is not */
    expect_one_ok("U8", "[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,2]", "[0,2]", 2);
    expect_one_fail("U8", "[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,2]", "[0,2]", 2,
                    "more than 16 dimensions");
    /* unknown keys in an entry are ignored, as the reference does; but their
     * numbers obey the integer rule (stricter than the reference) */
    expect_fail("{\"t\":{\"extra\":1.5,\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                1, "numbers must be non-negative integers");
    st_file *f = expect_ok("{\"t\":{\"extra\":[\"x\",{},7],\"dtype\":\"I16\",\"shape\":[3],"
                           "\"data_offsets\":[0,6],\"dtype_\":\"x\"}}",
                           6);
    assert_int_equal(f->header.tensors[0].dtype, ST_I16);
    st_file_close(f);
}

static void test_numbers(void **state)
{
    (void)state;
    const char *bad[] = {"1.0", "1e3", "1E3", "-1", "+1", "-0", "1.", ".5", "1e+2", "0.0", "2-1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *shape = fmt("[%s]", bad[i]);
        expect_one_fail("U8", shape, "[0,1]", 1, "non-negative integers");
        expect_one_fail("U8", shape, "[0,1]", 1, "tensor 't'");
        free(shape);
        char *off = fmt("[0,%s]", bad[i]);
        expect_one_fail("U8", "[1]", off, 1, "non-negative integers");
        free(off);
    }
    expect_one_fail("U8", "[01]", "[0,1]", 1, "leading zeros");
    expect_one_fail("U8", "[1]", "[00,1]", 1, "leading zeros");
    expect_one_ok("U8", "[1]", "[0,1]", 1);
    expect_one_ok("U8", "[10]", "[0,10]", 10);
    /* 2^53 is the largest accepted integer: shape [2^53, 0] holds no bytes */
    st_file *f;
    char *j = one_tensor("U8", "[9007199254740992,0]", "[0,0]");
    f = expect_ok(j, 0);
    assert_int_equal(f->header.tensors[0].shape[0], UINT64_C(9007199254740992));
    assert_int_equal(f->header.tensors[0].numel, 0);
    st_file_close(f);
    free(j);
    expect_one_fail("U8", "[9007199254740993,0]", "[0,0]", 0, "exceeds 2^53");
    expect_one_fail("U8", "[18446744073709551616,0]", "[0,0]", 0, "exceeds 2^53");
    expect_one_fail("U8", "[99999999999999999999999999999999999999999,0]", "[0,0]", 0,
                    "exceeds 2^53");
    expect_one_fail("U8", "[0]", "[0,9007199254740993]", 0, "exceeds 2^53");
    /* and as an offset: 2^53 parses, then fails the size rule */
    expect_one_fail("U8", "[0]", "[9007199254740992,9007199254740992]", 0, "must start at offset 0");
}

/* numel and byte size overflow, both sides */
static void test_numel_overflow(void **state)
{
    (void)state;
    /* 2^32 * 2^32 wraps to 0 */
    expect_one_fail("U8", "[4294967296,4294967296]", "[0,0]", 0, "overflows 64 bits");
    expect_one_fail("U8", "[4294967296,4294967296,0]", "[0,0]", 0, "element count");
    /* a 0 before the large dimensions keeps every partial product at 0 */
    expect_one_ok("U8", "[0,4294967296,4294967296]", "[0,0]", 0);
    /* 2^32 * (2^32 - 1) elements fit, their bits do not */
    expect_one_fail("U8", "[4294967296,4294967295]", "[0,1]", 1, "byte size");
    /* bits, not bytes, must fit (as the reference computes): 2^61 U8
     * elements are 2^64 bits; 2^61 - 2^30 elements fit */
    expect_one_fail("U8", "[2147483648,1073741824]", "[0,1]", 1, "byte size of");
    expect_one_fail("U8", "[1073741824,2147483647]", "[0,1]", 1, "need 2305843008139952128");
    expect_one_fail("U8", "[1073741824,1073741824]", "[0,1]", 1, "need 1152921504606846976");
    expect_one_fail("U16", "[2147483648,2147483648]", "[0,1]", 1, "byte size of");
    uint64_t n = 0, shape[3] = {UINT64_C(1) << 32, UINT64_C(1) << 32, 0};
    assert_int_equal(st_shape_numel(shape, 2, &n), -EOVERFLOW);
    assert_int_equal(st_shape_numel(shape, 3, &n), -EOVERFLOW);
    shape[1] = (UINT64_C(1) << 32) - 1;
    assert_int_equal(st_shape_numel(shape, 2, &n), 0);
    assert_int_equal(n, UINT64_MAX - ((UINT64_C(1) << 32) - 1));
    assert_int_equal(st_shape_numel(shape, 0, &n), 0);
    assert_int_equal(n, 1);
}

/* Random shapes and dtypes against 128-bit reference arithmetic. */
static void test_sizes_vs_reference(void **state)
{
    (void)state;
    unsigned n_ok = 0, n_overflow = 0, n_misaligned = 0;
    for (int iter = 0; iter < 3000; iter++) {
        size_t di = rng_below(N_REF_DTYPES);
        unsigned ndim = (unsigned)rng_below(6);
        uint64_t shape[6];
        char sh[512];
        size_t pos = 0;
        sh[pos++] = '[';
        for (unsigned k = 0; k < ndim; k++) {
            switch (rng_below(4)) {
            case 0: shape[k] = rng_below(8); break;
            case 1: shape[k] = rng_below(100000); break;
            case 2: shape[k] = UINT64_C(1) << rng_below(54); break;
            default: shape[k] = rng_below((UINT64_C(1) << 53) + 1); break;
            }
            pos += (size_t)snprintf(sh + pos, sizeof sh - pos, "%s%llu", k ? "," : "",
                                    (unsigned long long)shape[k]);
        }
        sh[pos++] = ']';
        sh[pos] = '\0';
        /* reference: 128-bit products, overflow when a partial product >= 2^64 */
        unsigned __int128 prod = 1;
        bool overflow = false;
        for (unsigned k = 0; k < ndim && !overflow; k++) {
            prod *= shape[k];
            overflow = prod >> 64 != 0;
        }
        unsigned __int128 bits = overflow ? 0 : prod * k_ref_dtypes[di].bits;
        overflow = overflow || bits >> 64 != 0;
        bool misaligned = !overflow && bits % 8 != 0;
        uint64_t bytes = overflow || misaligned ? 1 : (uint64_t)(bits / 8);
        bool fits = bytes <= (UINT64_C(1) << 53);
        char *off = fmt("[0,%llu]", (unsigned long long)(fits ? bytes : 0));
        char *j = one_tensor(k_ref_dtypes[di].name, sh, off);
        st_header h;
        ms_error err = {0};
        int rc = st_header_parse(j, strlen(j), UINT64_MAX, "mem", &h, &err);
        if (overflow) {
            check_failure(rc, &err, "mem", "overflows 64 bits", MS_EXIT_DATA);
            n_overflow++;
        } else if (misaligned) {
            check_failure(rc, &err, "mem", "misaligned", MS_EXIT_DATA);
            n_misaligned++;
        } else if (!fits) {
            check_failure(rc, &err, "mem", "need", MS_EXIT_DATA);
        } else {
            if (rc != 0)
                print_error("%s\n", err.msg);
            assert_int_equal(rc, 0);
            assert_int_equal(h.tensors[0].numel, (uint64_t)prod);
            assert_int_equal(h.tensors[0].ndim, ndim);
            assert_int_equal(h.data_len, bytes);
            for (unsigned k = 0; k < ndim; k++)
                assert_int_equal(h.tensors[0].shape[k], shape[k]);
            st_header_free(&h);
            n_ok++;
        }
        free(j);
        free(off);
    }
    assert_true(n_ok > 200 && n_overflow > 100 && n_misaligned > 10);
}

/* ------------------------------------------------------------------------ */
/* Layout                                                                   */
/* ------------------------------------------------------------------------ */

#define FMT_A "\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[%d,%d]}"
#define FMT_B "\"b\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[%d,%d]}"

/* Tensor a (4 bytes) at [a0, a1), tensor b (3 bytes) at [b0, b1); needle
 * NULL means the file must open. */
static void two_tensors(int a0, int a1, int b0, int b1, size_t data_len, const char *needle)
{
    char *j = fmt("{" FMT_A "," FMT_B "}", a0, a1, b0, b1);
    if (needle)
        expect_fail(j, data_len, needle);
    else
        st_file_close(expect_ok(j, data_len));
    free(j);
}

static void test_offsets(void **state)
{
    (void)state;
    const char *a = FMT_A, *b = FMT_B;
    char *ta, *tb, *j;
    two_tensors(0, 4, 4, 7, 7, NULL);
    two_tensors(3, 7, 0, 3, 7, NULL);                      /* header order != offset order */
    two_tensors(0, 4, 5, 8, 8, "gap in the data section"); /* one byte gap */
    two_tensors(0, 4, 3, 6, 7, "overlaps tensor 'a'");      /* one byte overlap */
    two_tensors(1, 5, 5, 8, 8, "must start at offset 0");   /* does not start at 0 */
    two_tensors(0, 4, 7, 4, 7, "begin is after end");       /* reversed */
    two_tensors(0, 4, 4, 8, 8, "need 3");                   /* b one byte too long */
    two_tensors(0, 4, 4, 6, 6, "need 3");                   /* b one byte too short */
    two_tensors(0, 4, 0, 3, 4, "overlaps");                 /* both at 0 */
    /* empty tensors: at 0, between, at the end; not inside another */
    const char *e = "\"e%d\":{\"dtype\":\"F32\",\"shape\":[2,0],\"data_offsets\":[%d,%d]}";
    char *e0 = fmt(e, 0, 0, 0), *e1 = fmt(e, 1, 4, 4), *e2 = fmt(e, 2, 7, 7);
    ta = fmt(a, 0, 4);
    tb = fmt(b, 4, 7);
    j = fmt("{%s,%s,%s,%s,%s}", e2, tb, e1, ta, e0);
    st_file *f = expect_ok(j, 7);
    const char *order[] = {"e0", "a", "e1", "b", "e2"};
    for (int i = 0; i < 5; i++)
        assert_string_equal(f->header.tensors[i].name, order[i]);
    st_file_close(f);
    free(j);
    free(e1);
    e1 = fmt(e, 1, 2, 2);
    j = fmt("{%s,%s,%s}", ta, tb, e1);
    expect_fail(j, 7, "invalid offset for tensor 'e1'");
    free(j);
    free(e1);
    e1 = fmt(e, 1, 8, 8);
    j = fmt("{%s,%s,%s}", ta, tb, e1);
    expect_fail(j, 7, "gap in the data section");
    free(j), free(e0), free(e1), free(e2), free(ta), free(tb);
    /* equal (empty) tensors keep their header order, both ways round */
    f = expect_ok("{\"z\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
                  "\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
                  0);
    assert_string_equal(f->header.tensors[0].name, "z");
    assert_string_equal(f->header.tensors[1].name, "a");
    st_file_close(f);
    f = expect_ok("{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
                  "\"z\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
                  0);
    assert_string_equal(f->header.tensors[0].name, "a");
    assert_string_equal(f->header.tensors[1].name, "z");
    st_file_close(f);
    /* an empty tensor with begin != end */
    expect_one_fail("F32", "[0]", "[0,4]", 4, "need 0");
}

/* Reference for the layout rule: the non-empty tensors cover [0, max end)
 * exactly once, and each empty tensor sits at 0 or at a non-empty tensor's
 * end. */
static bool ref_layout_valid(const uint64_t *b, const uint64_t *e, size_t n, uint64_t *data_len)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (b[i] > e[i])
            return false;
        if (e[i] > total)
            total = e[i];
    }
    unsigned char *cover = calloc(total + 1, 1);
    assert_non_null(cover);
    bool ok = true;
    for (size_t i = 0; i < n && ok; i++) {
        for (uint64_t x = b[i]; x < e[i]; x++)
            ok = ok && cover[x]++ == 0;
    }
    for (uint64_t x = 0; x < total && ok; x++)
        ok = cover[x] == 1;
    for (size_t i = 0; i < n && ok; i++) {
        if (b[i] != e[i])
            continue;
        bool at_boundary = b[i] == 0;
        for (size_t k = 0; k < n && !at_boundary; k++)
            at_boundary = e[k] != b[k] && e[k] == b[i];
        ok = at_boundary;
    }
    free(cover);
    *data_len = total;
    return ok;
}

static void test_layout_vs_reference(void **state)
{
    (void)state;
    unsigned n_ok = 0, n_bad = 0;
    for (int iter = 0; iter < 2000; iter++) {
        size_t n = 1 + rng_below(7);
        uint64_t b[8], e[8], pos = 0;
        for (size_t i = 0; i < n; i++) {
            uint64_t len = rng_below(3) == 0 ? 0 : 1 + rng_below(9);
            b[i] = pos;
            e[i] = pos + len;
            pos += len;
        }
        /* perturb one offset by -1, 0 or +1 (keeping sizes consistent with
         * the shape below, which is computed from the final offsets) */
        if (rng_below(2)) {
            size_t i = rng_below(n);
            int64_t dlt = (int64_t)rng_below(3) - 1;
            if (rng_below(2)) {
                if (!(dlt < 0 && b[i] == 0))
                    b[i] += (uint64_t)dlt, e[i] += (uint64_t)dlt;
            } else if (!(dlt < 0 && e[i] == b[i])) {
                e[i] += (uint64_t)dlt;
            }
        }
        /* shuffle the header order */
        size_t perm[8];
        for (size_t i = 0; i < n; i++)
            perm[i] = i;
        for (size_t i = n; i > 1; i--) {
            size_t k = rng_below(i), t = perm[i - 1];
            perm[i - 1] = perm[k];
            perm[k] = t;
        }
        char j[2048];
        size_t p = 0;
        j[p++] = '{';
        for (size_t q = 0; q < n; q++) {
            size_t i = perm[q];
            p += (size_t)snprintf(j + p, sizeof j - p,
                                  "%s\"w%zu\":{\"dtype\":\"U8\",\"shape\":[%llu],\"data_offsets\":[%llu,%llu]}",
                                  q ? "," : "", i, (unsigned long long)(e[i] - b[i]),
                                  (unsigned long long)b[i], (unsigned long long)e[i]);
        }
        j[p++] = '}';
        j[p] = '\0';
        uint64_t data_len = 0;
        bool want = ref_layout_valid(b, e, n, &data_len);
        st_header h;
        ms_error err = {0};
        int rc = st_header_parse(j, p, 8 + p + data_len, "mem", &h, &err);
        if ((rc == 0) != want)
            print_error("layout mismatch (want %d): %s\n%s\n", want, err.msg, j);
        assert_int_equal(rc == 0, want);
        if (rc == 0) {
            assert_int_equal(h.data_len, data_len);
            assert_int_equal(h.n_tensors, n);
            for (size_t i = 1; i < n; i++) {
                assert_true(h.tensors[i - 1].begin <= h.tensors[i].begin);
                assert_int_equal(h.tensors[i - 1].end, h.tensors[i].begin);
            }
            st_header_free(&h);
            n_ok++;
        } else {
            assert_non_null(strstr(err.msg, "invalid offset"));
            n_bad++;
        }
    }
    assert_true(n_ok > 200 && n_bad > 200);
}

static void test_file_size(void **state)
{
    (void)state;
    char *j = one_tensor("F16", "[3]", "[0,6]");
    st_file_close(expect_ok(j, 6));
    expect_fail(j, 7, "1 trailing bytes");
    expect_fail(j, 5, "file is truncated");
    expect_fail(j, 0, "6 missing");
    free(j);
    expect_fail("{}", 1, "trailing bytes");
    st_file_close(expect_ok("{\"__metadata__\":{\"format\":\"pt\"}}", 0));
    /* the file-size rule is skipped with UINT64_MAX and applied otherwise */
    j = one_tensor("F16", "[3]", "[0,6]");
    st_header h;
    ms_error err = {0};
    assert_int_equal(st_header_parse(j, strlen(j), UINT64_MAX, "mem", &h, &err), 0);
    st_header_free(&h);
    st_header_free(&h); /* twice: emptied the first time */
    st_header_free(NULL);
    free(j);
}

/* Tensors of odd byte sizes behind a header whose length is not a multiple
 * of 8: every tensor starts unaligned and reads back exactly. */
static void test_unaligned_reads(void **state)
{
    (void)state;
    static const struct {
        const char *dtype;
        unsigned elem_bytes;
        unsigned count;
    } spec[] = {{"U8", 1, 3}, {"F16", 2, 5}, {"F32", 4, 7}, {"I8", 1, 1}, {"BF16", 2, 1},
                {"F64", 8, 3}, {"U8", 1, 13}, {"I64", 8, 1}, {"F32", 4, 0}, {"U16", 2, 9}};
    enum { N = sizeof spec / sizeof spec[0] };
    uint64_t begin[N], end[N], pos = 0;
    for (int i = 0; i < N; i++) {
        begin[i] = pos;
        pos += (uint64_t)spec[i].elem_bytes * spec[i].count;
        end[i] = pos;
    }
    unsigned char *data = malloc(pos);
    assert_non_null(data);
    fill_random(data, pos);
    char j[4096];
    size_t p = 0;
    j[p++] = '{';
    for (int q = N - 1; q >= 0; q--) /* header order: reversed */
        p += (size_t)snprintf(j + p, sizeof j - p,
                              "\"layer.%d\":{\"dtype\":\"%s\",\"shape\":[%u],\"data_offsets\":[%llu,%llu]},",
                              q, spec[q].dtype, spec[q].count, (unsigned long long)begin[q],
                              (unsigned long long)end[q]);
    p += (size_t)snprintf(j + p, sizeof j - p, "\"__metadata__\":{\"format\":\"pt\"}}");
    if (p % 8 == 0)
        j[p++] = ' ';
    assert_true(p % 8 != 0);
    char *path = file_write_data(p, j, p, data, pos);
    st_file *f = NULL;
    ms_error err = {0};
    assert_int_equal(st_file_open(path, &f, &err), 0);
    assert_int_equal(f->header.n_tensors, N);
    assert_int_equal(f->header.data_len, pos);
    int fl = fcntl(f->fd, F_GETFL);
    assert_true(fl >= 0);
    assert_int_equal(fl & O_NONBLOCK, 0); /* the engines may read it with io_uring */
    assert_int_equal(fl & O_ACCMODE, O_RDONLY);
    assert_true(fcntl(f->fd, F_GETFD) & FD_CLOEXEC);
    for (int i = 0; i < N; i++) {
        const st_tensor *t = &f->header.tensors[i];
        char name[32];
        snprintf(name, sizeof name, "layer.%d", i);
        assert_string_equal(t->name, name);
        assert_int_equal(t->begin, begin[i]);
        assert_int_equal(st_tensor_nbytes(t), end[i] - begin[i]);
        unsigned char buf[128];
        uint64_t nb = st_tensor_nbytes(t);
        assert_true(nb <= sizeof buf);
        if (nb)
            assert_int_equal(pread(f->fd, buf, nb, (off_t)st_file_tensor_offset(f, t)), (ssize_t)nb);
        assert_memory_equal(buf, data + begin[i], nb);
        assert_int_equal(st_header_find(&f->header, name), i);
    }
    st_file_close(f);
    free(path);
    free(data);
}

static void test_duplicates(void **state)
{
    (void)state;
    expect_fail("{\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                "\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                2, "duplicate tensor name 'x'");
    expect_fail("{\"x\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
                "\"y\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                "\"x\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[1,1]}}",
                1, "duplicate tensor name 'x'");
    /* names that differ only in their last byte are distinct */
    st_file_close(expect_ok("{\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                            "\"x \":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                            2));
}

static void test_scalar_empty_zero(void **state)
{
    (void)state;
    st_file *f = expect_ok("{\"s\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[0,8]}}", 8);
    assert_int_equal(f->header.tensors[0].ndim, 0);
    assert_int_equal(f->header.tensors[0].numel, 1);
    st_file_close(f);
    expect_one_fail("F64", "[]", "[0,4]", 4, "need 8");
    f = expect_ok("{\"e\":{\"dtype\":\"BF16\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0);
    assert_int_equal(f->header.tensors[0].numel, 0);
    assert_int_equal(f->header.data_len, 0);
    st_file_close(f);
    f = expect_ok("{\"e\":{\"dtype\":\"BF16\",\"shape\":[3,0,5],\"data_offsets\":[0,0]}}", 0);
    assert_int_equal(f->header.tensors[0].numel, 0);
    st_file_close(f);
    f = expect_ok("{}", 0);
    assert_int_equal(f->header.n_tensors, 0);
    assert_int_equal(f->header.data_len, 0);
    assert_int_equal(st_header_find(&f->header, "x"), -1);
    st_file_close(f);
    st_file_close(NULL);
}

static void test_find(void **state)
{
    (void)state;
    enum { N = 300 };
    char **names = calloc(N, sizeof *names);
    assert_non_null(names);
    size_t cap = 64 * N, p = 0;
    char *j = malloc(cap);
    assert_non_null(j);
    j[p++] = '{';
    for (int i = 0; i < N; i++) {
        /* names that share prefixes, including "" and prefixes of others */
        switch (i % 4) {
        case 0: names[i] = fmt("m.%d", i); break;
        case 1: names[i] = fmt("m.%d.w", i - 1); break;
        case 2: names[i] = i == 2 ? fmt("%s", "") : fmt("%x.%d", (unsigned)rng_next(), i); break;
        default: names[i] = fmt("z%d", i); break;
        }
        p += (size_t)snprintf(j + p, cap - p,
                              "%s\"%s\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[%d,%d]}",
                              i ? "," : "", names[i], i, i + 1);
    }
    j[p++] = '}';
    j[p] = '\0';
    st_header h;
    ms_error err = {0};
    int rc = st_header_parse(j, p, UINT64_MAX, "mem", &h, &err);
    if (rc != 0)
        print_error("%s\n", err.msg);
    assert_int_equal(rc, 0);
    for (int i = 0; i < N; i++) {
        long k = st_header_find(&h, names[i]);
        assert_true(k >= 0);
        assert_string_equal(h.tensors[k].name, names[i]);
        assert_int_equal(h.tensors[k].begin, i);
        char *miss = fmt("%s!", names[i]);
        assert_int_equal(st_header_find(&h, miss), -1);
        free(miss);
    }
    assert_int_equal(st_header_find(&h, "m."), -1);
    assert_int_equal(st_header_find(&h, "zzzzzz"), -1);
    assert_int_equal(st_header_find(&h, "\x01"), -1);
    /* the linear fallback of a header without an index agrees */
    size_t *order = h.name_order;
    h.name_order = NULL;
    for (int i = 0; i < N; i += 7)
        assert_int_equal(st_header_find(&h, names[i]), i);
    assert_int_equal(st_header_find(&h, "m."), -1);
    h.name_order = order;
    st_header_free(&h);
    for (int i = 0; i < N; i++)
        free(names[i]);
    free(names);
    free(j);
}

/* ------------------------------------------------------------------------ */
/* Messages and I/O errors                                                  */
/* ------------------------------------------------------------------------ */

static void test_error_messages(void **state)
{
    (void)state;
    char *j = one_tensor("Q7", "[1]", "[0,1]");
    char *path = file_json(j, 1);
    st_file *f = NULL;
    ms_error err = {0};
    assert_int_equal(st_file_open(path, &f, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    /* "PATH: what" */
    assert_int_equal(strncmp(err.msg, path, strlen(path)), 0);
    assert_int_equal(strncmp(err.msg + strlen(path), ": ", 2), 0);
    assert_non_null(strstr(err.msg, "tensor 't'"));
    assert_non_null(strstr(err.msg, "dtype"));
    assert_null(strchr(err.msg, '\n'));
    free(path);
    free(j);
    /* a hostile name is cut and its control characters hidden */
    char name[700];
    memset(name, 'n', sizeof name - 1);
    name[sizeof name - 1] = '\0';
    memcpy(name, "a\\nb", 4);
    j = fmt("{\"%s\":{\"dtype\":\"Q7\",\"shape\":[1],\"data_offsets\":[0,1]}}", name);
    path = file_json(j, 1);
    assert_int_equal(st_file_open(path, &f, &err), -1);
    assert_non_null(strstr(err.msg, "tensor 'a?bnnn"));
    assert_non_null(strstr(err.msg, "n...'"));
    assert_null(strchr(err.msg, '\n'));
    free(path);
    free(j);
}

static void test_open_errors(void **state)
{
    (void)state;
    char *missing = fmt("%s/does-not-exist.safetensors", g_dir);
    open_expect(missing, strerror(ENOENT), MS_EXIT_RUNTIME);
    free(missing);
    open_expect(g_dir, "is a directory", MS_EXIT_DATA);
    char *bin = path_new(".bin");
    FILE *fp = fopen(bin, "wb");
    fputs("PK\x03\x04 whatever", fp);
    fclose(fp);
    open_expect(bin, "PyTorch", MS_EXIT_DATA);
    free(bin);
    /* a zip or a pickle under a .safetensors name */
    char *zip = path_new(".safetensors");
    fp = fopen(zip, "wb");
    fwrite("PK\x03\x04\x14\x00\x00\x00\x08\x00", 1, 10, fp);
    fclose(fp);
    open_expect(zip, "zip archive", MS_EXIT_DATA);
    free(zip);
    char *pkl = path_new(".safetensors");
    fp = fopen(pkl, "wb");
    fwrite("\x80\x02\x63\x63ollections\n", 1, 16, fp);
    fclose(fp);
    open_expect(pkl, "pickle", MS_EXIT_DATA);
    free(pkl);
    /* a JSON file (config.json given as weights): named as text, on one line */
    char *txt = path_new(".safetensors");
    fp = fopen(txt, "wb");
    fputs("{\n  \"architectures\": [\"LlamaForCausalLM\"]\n}\n", fp);
    fclose(fp);
    open_expect(txt, "is a text file (it starts with \"{   \"arc\"), not a safetensors file", MS_EXIT_DATA);
    free(txt);
    char *fifo = path_new(".safetensors");
    assert_int_equal(mkfifo(fifo, 0600), 0);
    open_expect(fifo, "not a regular file", MS_EXIT_DATA);
    unlink(fifo);
    free(fifo);
}

/* The fault seam is read once per process, so each N runs in a child: this
 * binary re-executed with --fault-child PATH and MERGESTREAM_FAULT=read:N.
 * The child exits 0 on a clean EIO failure, 2 when the open succeeded, 1 on
 * anything else. */
static int fault_child(const char *path)
{
    st_file *f = NULL;
    ms_error err = {0};
    if (st_file_open(path, &f, &err) == 0) {
        st_file_close(f);
        return 2;
    }
    bool ok = f == NULL && err.exit_code == MS_EXIT_RUNTIME && strstr(err.msg, path) &&
              strstr(err.msg, strerror(EIO));
    if (!ok)
        fprintf(stderr, "fault child: unexpected error %d: %s\n", err.exit_code, err.msg);
    return ok ? 0 : 1;
}

static void test_read_faults(void **state)
{
    (void)state;
    char *j = one_tensor("F32", "[2]", "[0,8]");
    char *path = file_json(j, 8);
    int n;
    for (n = 1; n < 10; n++) {
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            char spec[32];
            snprintf(spec, sizeof spec, "read:%d", n);
            setenv("MERGESTREAM_FAULT", spec, 1);
            execl("/proc/self/exe", "test_st_format", "--fault-child", path, (char *)NULL);
            _exit(127);
        }
        int status = 0;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status));
        int code = WEXITSTATUS(status);
        if (code == 2)
            break;
        assert_int_equal(code, 0);
    }
    assert_int_equal(n, 3); /* two reads: the length field, then the header */
    free(path);
    free(j);
}

/* ------------------------------------------------------------------------ */

static int remove_tree(const char *dir)
{
    char *cmd = fmt("rm -rf '%s'", dir);
    int rc = system(cmd);
    free(cmd);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--fault-child") == 0)
        return fault_child(argv[2]);

    const char *seed = getenv("ST_TEST_SEED");
    g_rng = seed ? strtoull(seed, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    fprintf(stderr, "test_st_format: ST_TEST_SEED=%llu\n", (unsigned long long)g_rng);
    const char *tmp = getenv("TMPDIR");
    snprintf(g_dir, sizeof g_dir, "%s/st_format.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_table),
        cmocka_unit_test(test_every_dtype_file),
        cmocka_unit_test(test_subbyte_alignment),
        cmocka_unit_test(test_header_length),
        cmocka_unit_test(test_header_length_cap_exact),
        cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_json_shape),
        cmocka_unit_test(test_metadata),
        cmocka_unit_test(test_tensor_fields),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_numel_overflow),
        cmocka_unit_test(test_sizes_vs_reference),
        cmocka_unit_test(test_offsets),
        cmocka_unit_test(test_layout_vs_reference),
        cmocka_unit_test(test_file_size),
        cmocka_unit_test(test_unaligned_reads),
        cmocka_unit_test(test_duplicates),
        cmocka_unit_test(test_scalar_empty_zero),
        cmocka_unit_test(test_find),
        cmocka_unit_test(test_error_messages),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_read_faults),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    remove_tree(g_dir);
    return failed ? 1 : 0;
}
