/* The output writer (io/st_writer.h), its layout plan, the atomic file helpers
 * (io/atomic_file.h) and the checksums (io/checksum.h).
 *
 * Outputs are written from fresh random bytes, in random tensor order and
 * random chunks, then read back with the project's reader (st_file_open) and
 * compared byte for byte; the shard cut rule, the header and the index are
 * checked against small, obviously-correct reference code. The random seed is
 * printed; MS_TEST_SEED=N replays a run. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "io/atomic_file.h"
#include "io/checksum.h"
#include "io/st_format.h"
#include "io/st_writer.h"

/* ------------------------------------------------------------ utilities */

static uint64_t g_rng;

static uint64_t rnd(void)
{
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi]. */
static uint64_t rnd_range(uint64_t lo, uint64_t hi) { return lo + rnd() % (hi - lo + 1); }

/* Random bytes, never all zero. */
static void fill_random(unsigned char *buf, size_t n)
{
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)rnd();
    if (n)
        buf[0] |= 1;
}

static char *make_tmpdir(void)
{
    char tmpl[] = "/tmp/ms_writer_test_XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return strdup(d);
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static void rm_tree(char *dir)
{
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

static char *join(const char *dir, const char *name)
{
    char *p = NULL;
    assert_true(asprintf(&p, "%s/%s", dir, name) > 0);
    return p;
}

static int cmp_name(const void *a, const void *b) { return strcmp(a, b); }

/* Number of directory entries (besides . and ..); names copied into names[]
 * when not NULL (sorted). */
static size_t list_dir(const char *dir, char names[][256], size_t max)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        if (names && n < max)
            snprintf(names[n], 256, "%s", e->d_name);
        n++;
    }
    closedir(d);
    if (names)
        qsort(names, n < max ? n : max, 256, cmp_name);
    return n;
}

static bool file_exists(const char *dir, const char *name)
{
    char *p = join(dir, name);
    bool ok = access(p, F_OK) == 0;
    free(p);
    return ok;
}

static unsigned char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    unsigned char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void write_small(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* --------------------------------------------------------------- checksum */

static void test_checksum_known_values(void **state)
{
    (void)state;
    /* XXH3-64 test vectors: empty input, seed 0 and seed 1 differ. */
    assert_true(ms_hash64(NULL, 0) == 0x2D06800538D394C2ull);
    assert_true(ms_hash64_seed("", 0, 0) == 0x2D06800538D394C2ull);
    assert_true(ms_hash64_seed("abc", 3, 1) != ms_hash64("abc", 3));

    char hex[MS_HASH_HEX_LEN + 1];
    ms_hash_to_hex(0x0123456789abcdefull, hex);
    assert_string_equal(hex, "0123456789abcdef");
    ms_hash_to_hex(0, hex);
    assert_string_equal(hex, "0000000000000000");
    uint64_t v = 7;
    assert_true(ms_hash_from_hex("0123456789abcdef", &v));
    assert_true(v == 0x0123456789abcdefull);
    assert_true(ms_hash_from_hex("ffffffffffffffff", &v));
    assert_true(v == UINT64_MAX);
    v = 7;
    assert_false(ms_hash_from_hex("0123456789ABCDEF", &v)); /* uppercase */
    assert_false(ms_hash_from_hex("0123456789abcde", &v));  /* 15 digits */
    assert_false(ms_hash_from_hex("0123456789abcdef0", &v)); /* 17 */
    assert_false(ms_hash_from_hex("0123456789abcdeg", &v));
    assert_false(ms_hash_from_hex("", &v));
    assert_false(ms_hash_from_hex(NULL, &v));
    assert_true(v == 7);
    for (int i = 0; i < 100; i++) {
        uint64_t h = rnd(), back = 0;
        ms_hash_to_hex(h, hex);
        assert_int_equal(strlen(hex), MS_HASH_HEX_LEN);
        assert_true(ms_hash_from_hex(hex, &back));
        assert_true(back == h);
    }
}

static void test_checksum_streaming_matches_oneshot(void **state)
{
    (void)state;
    size_t n = (size_t)rnd_range(1, 300000);
    unsigned char *buf = malloc(n);
    assert_non_null(buf);
    fill_random(buf, n);
    uint64_t ref = ms_hash64(buf, n);
    ms_hasher h;
    assert_int_equal(ms_hasher_init(&h), 0);
    for (int round = 0; round < 5; round++) {
        ms_hasher_reset(&h);
        size_t at = 0;
        while (at < n) {
            size_t piece = (size_t)rnd_range(0, 70000);
            if (piece > n - at)
                piece = n - at;
            ms_hasher_update(&h, buf + at, piece);
            at += piece;
        }
        assert_true(ms_hasher_digest(&h) == ref);
    }
    /* Changing one byte changes the hash. */
    buf[rnd() % n] ^= 0x10;
    assert_true(ms_hash64(buf, n) != ref);
    ms_hasher_free(&h);
    ms_hasher_free(&h); /* second free: no-op */
    ms_hasher_free(NULL);
    free(buf);
}

static void test_checksum_shard_hash_definition(void **state)
{
    (void)state;
    size_t hl = (size_t)rnd_range(8, 500), n = (size_t)rnd_range(0, 20);
    unsigned char *concat = malloc(hl + 8 * n + 1);
    uint64_t hashes[20] = {0};
    fill_random(concat, hl);
    for (size_t i = 0; i < n; i++) {
        hashes[i] = rnd();
        for (int b = 0; b < 8; b++)
            concat[hl + 8 * i + (size_t)b] = (unsigned char)(hashes[i] >> (8 * b)); /* little-endian */
    }
    assert_true(ms_shard_hash(concat, hl, hashes, n) == ms_hash64(concat, hl + 8 * n));
    if (n > 1) { /* order matters */
        uint64_t t = hashes[0];
        hashes[0] = hashes[1];
        hashes[1] = t;
        if (hashes[0] != hashes[1])
            assert_true(ms_shard_hash(concat, hl, hashes, n) != ms_hash64(concat, hl + 8 * n));
    }
    free(concat);
}

/* ----------------------------------------------------------- atomic files */

static void test_atomic_write_and_copy(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *path = join(dir, "config.json");
    ms_error err = {0};
    size_t n = (size_t)rnd_range(1, 3u << 20); /* crosses the 1 MiB copy buffer */
    unsigned char *data = malloc(n);
    fill_random(data, n);

    assert_int_equal(ms_atomic_write_file(path, "old", 3, &err), 0);
    assert_int_equal(ms_atomic_write_file(path, data, n, &err), 0); /* replaces */
    size_t got_len;
    unsigned char *got = read_all(path, &got_len);
    assert_int_equal(got_len, n);
    assert_memory_equal(got, data, n);
    free(got);

    char *copy = join(dir, "tokenizer.json");
    assert_int_equal(ms_copy_file_atomic(path, copy, &err), 0);
    got = read_all(copy, &got_len);
    assert_int_equal(got_len, n);
    assert_memory_equal(got, data, n);
    free(got);
    struct stat st;
    assert_int_equal(stat(copy, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0644);

    /* Empty file. */
    assert_int_equal(ms_atomic_write_file(path, NULL, 0, &err), 0);
    got = read_all(path, &got_len);
    assert_int_equal(got_len, 0);
    free(got);
    assert_int_equal(list_dir(dir, NULL, 0), 2); /* no temp files left */

    /* A missing source: a data error naming it, nothing created. */
    char *missing = join(dir, "nope.json"), *dst = join(dir, "dst.json");
    assert_int_equal(ms_copy_file_atomic(missing, dst, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    assert_non_null(strstr(err.msg, "nope.json"));
    /* A directory as source. */
    assert_int_equal(ms_copy_file_atomic(dir, dst, &err), -1);
    assert_non_null(strstr(err.msg, "not a regular file"));
    /* A destination in a missing directory: the error names the temp file. */
    char *bad = join(dir, "no/such/dir.json");
    assert_int_equal(ms_atomic_write_file(bad, "x", 1, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_RUNTIME);
    assert_non_null(strstr(err.msg, "no/such/dir.json.tmp."));
    assert_int_equal(list_dir(dir, NULL, 0), 2);

    assert_int_equal(ms_fsync_dir(dir, &err), 0);
    assert_int_equal(ms_fsync_parent_dir(path, &err), 0);
    assert_int_equal(ms_fsync_parent_dir("relative_name", &err), 0); /* "." */
    assert_int_equal(ms_fsync_dir(missing, &err), -1);
    assert_non_null(strstr(err.msg, "nope.json"));

    free(bad);
    free(missing);
    free(dst);
    free(copy);
    free(data);
    free(path);
    rm_tree(dir);
}

/* ------------------------------------------------------------ plan layout */

/* The cut rule, written the obvious way: walk the sizes, open a new shard when
 * the current one is non-empty and would hold more than limit bytes. */
static void ref_assign(const uint64_t *sizes, size_t n, uint64_t limit, size_t *shard_of)
{
    size_t shard = 0, count = 0;
    unsigned __int128 bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (count > 0 && bytes + sizes[i] > limit) {
            shard++;
            count = 0;
            bytes = 0;
        }
        shard_of[i] = shard;
        count++;
        bytes += sizes[i];
    }
}

/* Adds U8 tensors "t0", "t1", ... of the given byte sizes. */
static st_plan *plan_u8(const uint64_t *sizes, size_t n, uint64_t limit)
{
    st_plan *p = NULL;
    ms_error err = {0};
    assert_int_equal(st_plan_create(limit, &p, &err), 0);
    for (size_t i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "t%zu", i);
        size_t idx = 99;
        assert_int_equal(st_plan_add_tensor(p, name, ST_U8, 1, &sizes[i], &idx, &err), 0);
        assert_int_equal(idx, i);
    }
    assert_int_equal(st_plan_layout(p, &err), 0);
    return p;
}

static void expect_shards(const uint64_t *sizes, size_t n, uint64_t limit, const size_t *want)
{
    st_plan *p = plan_u8(sizes, n, limit);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(st_plan_tensor_at(p, i)->shard, want[i]);
    assert_int_equal(st_plan_n_shards(p), n ? want[n - 1] + 1 : 1);
    st_plan_free(p);
}

static void test_plan_cut_boundaries(void **state)
{
    (void)state;
    /* Exactly at the limit stays; one byte over starts a new shard. */
    expect_shards((uint64_t[]){60, 40, 1}, 3, 100, (size_t[]){0, 0, 1});
    expect_shards((uint64_t[]){60, 41}, 2, 100, (size_t[]){0, 1});
    expect_shards((uint64_t[]){100, 1}, 2, 100, (size_t[]){0, 1});
    expect_shards((uint64_t[]){99, 1, 0, 0}, 4, 100, (size_t[]){0, 0, 0, 0}); /* empty tensors fit a full shard */
    /* A tensor larger than the limit: alone in its shard, never an empty shard. */
    expect_shards((uint64_t[]){150, 10}, 2, 100, (size_t[]){0, 1});
    expect_shards((uint64_t[]){10, 150, 10}, 3, 100, (size_t[]){0, 1, 2});
    expect_shards((uint64_t[]){101, 101}, 2, 100, (size_t[]){0, 1});
    expect_shards((uint64_t[]){0, 150}, 2, 100, (size_t[]){0, 1});
    /* Limit 1: one tensor per shard except empty ones. */
    expect_shards((uint64_t[]){1, 1, 0, 2}, 4, 1, (size_t[]){0, 1, 1, 2});

    /* Sizes near 2^64 (a U8 tensor holds at most 2^61 - 1 bytes: its bit
     * count must fit): the cut compares without overflow, and layout refuses
     * a file whose size would not fit. */
    st_plan *p = NULL;
    ms_error err = {0};
    const uint64_t big = (1ull << 61) - 1;
    for (int k = 0; k < 2; k++) {
        uint64_t limit = k == 0 ? 8 * big : 8 * big - 1;
        assert_int_equal(st_plan_create(limit, &p, &err), 0);
        for (int i = 0; i < 8; i++) {
            char name[8];
            snprintf(name, sizeof name, "t%d", i);
            assert_int_equal(st_plan_add_tensor(p, name, ST_U8, 1, &big, NULL, &err), 0);
        }
        assert_int_equal(st_plan_tensor_at(p, 7)->shard, k == 0 ? 0 : 1);
        uint64_t seven = 7, eight = 8; /* the total is now 2^64 - 8 */
        assert_int_equal(st_plan_add_tensor(p, "c", ST_U8, 1, &eight, NULL, &err), -1);
        assert_non_null(strstr(err.msg, "c: output size overflows"));
        assert_int_equal(st_plan_add_tensor(p, "c", ST_U8, 1, &seven, NULL, &err), 0);
        assert_int_equal(st_plan_tensor_at(p, 8)->shard, 1); /* k = 0: the full shard; k = 1: fits */
        assert_int_equal(st_plan_add_tensor(p, "d", ST_U8, 1, &seven, NULL, &err), -1);
        assert_non_null(strstr(err.msg, "d: output size overflows"));
        if (k == 0) { /* 8 * big data bytes plus a header do not fit in 64 bits */
            assert_int_equal(st_plan_layout(p, &err), -1);
            assert_string_equal(err.msg, "model-00001-of-00002.safetensors: file size overflows 64 bits");
        } else {
            assert_int_equal(st_plan_layout(p, &err), 0);
            assert_int_equal(st_plan_n_shards(p), 2);
        }
        st_plan_free(p);
    }

    assert_int_equal(st_plan_create(0, &p, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_USAGE);
    assert_null(p);
}

static void test_plan_cut_random_vs_reference(void **state)
{
    (void)state;
    for (int round = 0; round < 200; round++) {
        size_t n = (size_t)rnd_range(1, 60);
        uint64_t limit = rnd_range(1, 1000);
        uint64_t sizes[60];
        size_t want[60];
        for (size_t i = 0; i < n; i++)
            sizes[i] = rnd() % 4 == 0 ? rnd_range(0, 2 * limit) : rnd_range(0, limit / 3 + 1);
        ref_assign(sizes, n, limit, want);
        st_plan *p = plan_u8(sizes, n, limit);
        uint64_t total = 0;
        for (size_t i = 0; i < n; i++) {
            const st_plan_tensor *t = st_plan_tensor_at(p, i);
            assert_int_equal(t->shard, want[i]);
            total += sizes[i];
        }
        assert_true(st_plan_total_bytes(p) == total);
        /* Shards are never empty; data offsets are contiguous from 0; the
         * absolute offset is header + begin. */
        for (size_t s = 0; s < st_plan_n_shards(p); s++) {
            const st_plan_shard *sh = st_plan_shard_at(p, s);
            assert_true(sh->n_tensors > 0);
            uint64_t at = 0;
            for (size_t i = sh->first_tensor; i < sh->first_tensor + sh->n_tensors; i++) {
                const st_plan_tensor *t = st_plan_tensor_at(p, i);
                assert_int_equal(t->shard, s);
                assert_true(t->begin == at);
                assert_true(t->offset == sh->header_bytes + at);
                at += t->nbytes;
            }
            assert_true(sh->data_bytes == at);
            assert_true(sh->file_size == sh->header_bytes + at);
            assert_true(sh->data_bytes <= limit || sh->n_tensors == 1);
        }
        st_plan_free(p);
    }
}

/* Parses a shard header the slow way and checks it against the plan. */
static void check_header(const st_plan *p, size_t s, const char *const *meta_kv, size_t n_meta)
{
    const st_plan_shard *sh = st_plan_shard_at(p, s);
    const unsigned char *h = sh->header;
    uint64_t n = 0;
    for (int i = 0; i < 8; i++)
        n |= (uint64_t)h[i] << (8 * i);
    assert_true(8 + n == sh->header_bytes);
    assert_int_equal(n % 8, 0);
    const char *json = (const char *)h + 8;
    /* The exact prefix, then compact JSON (no space outside strings before the padding). */
    char prefix[512] = "{\"__metadata__\":{\"format\":\"pt\"";
    for (size_t i = 0; i < n_meta; i++) {
        strcat(prefix, ",\"");
        strcat(prefix, meta_kv[2 * i]);
        strcat(prefix, "\":\"");
        strcat(prefix, meta_kv[2 * i + 1]);
        strcat(prefix, "\"");
    }
    strcat(prefix, "}");
    assert_true(n >= strlen(prefix));
    assert_memory_equal(json, prefix, strlen(prefix));
    size_t end = (size_t)n;
    while (end > 0 && json[end - 1] == ' ')
        end--;
    assert_true(n - end < 8);
    assert_int_equal(json[end - 1], '}');
    bool in_str = false;
    for (size_t i = 0; i < end; i++) {
        if (json[i] == '"' && (i == 0 || json[i - 1] != '\\'))
            in_str = !in_str;
        if (!in_str)
            assert_true(json[i] != ' ' && json[i] != '\n');
    }

    cJSON *root = cJSON_ParseWithLength(json, (size_t)n);
    assert_non_null(root);
    assert_string_equal(root->child->string, "__metadata__");
    cJSON *e = root->child->next;
    for (size_t i = sh->first_tensor; i < sh->first_tensor + sh->n_tensors; i++, e = e->next) {
        const st_plan_tensor *t = st_plan_tensor_at(p, i);
        assert_non_null(e);
        assert_string_equal(e->string, t->name);
        assert_string_equal(cJSON_GetObjectItem(e, "dtype")->valuestring, st_dtype_name(t->dtype));
        cJSON *shape = cJSON_GetObjectItem(e, "shape");
        assert_int_equal(cJSON_GetArraySize(shape), t->ndim);
        for (unsigned d = 0; d < t->ndim; d++)
            assert_true((uint64_t)cJSON_GetArrayItem(shape, (int)d)->valuedouble == t->shape[d]);
        cJSON *off = cJSON_GetObjectItem(e, "data_offsets");
        assert_true((uint64_t)cJSON_GetArrayItem(off, 0)->valuedouble == t->begin);
        assert_true((uint64_t)cJSON_GetArrayItem(off, 1)->valuedouble == t->begin + t->nbytes);
        /* Key order in the object: dtype, shape, data_offsets. */
        assert_string_equal(e->child->string, "dtype");
        assert_string_equal(e->child->next->string, "shape");
        assert_string_equal(e->child->next->next->string, "data_offsets");
    }
    assert_null(e);
    cJSON_Delete(root);
}

static void test_plan_header_and_names(void **state)
{
    (void)state;
    ms_error err = {0};
    st_plan *p = NULL;
    assert_int_equal(st_plan_create(1000, &p, &err), 0);
    assert_int_equal(st_plan_add_metadata(p, "format", "x", &err), -1);
    assert_non_null(strstr(err.msg, "format"));
    assert_int_equal(st_plan_add_metadata(p, "merged_by", "mergestream", &err), 0);
    assert_int_equal(st_plan_add_metadata(p, "merged_by", "again", &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_USAGE);
    assert_int_equal(st_plan_add_metadata(p, "seed", "42", &err), 0);
    uint64_t sh2[2] = {3, 100}, sh1[1] = {7}, sh0[1] = {0};
    assert_int_equal(st_plan_add_tensor(p, "model.embed_tokens.weight", ST_BF16, 2, sh2, NULL, &err), 0); /* 600 */
    assert_int_equal(st_plan_add_tensor(p, "a.\"quoted\\name", ST_F32, 1, sh1, NULL, &err), 0);         /* 28 */
    assert_int_equal(st_plan_add_tensor(p, "scalar", ST_F64, 0, NULL, NULL, &err), 0);                    /* 8 */
    assert_int_equal(st_plan_add_tensor(p, "empty", ST_F16, 1, sh0, NULL, &err), 0);                      /* 0 */
    assert_int_equal(st_plan_add_tensor(p, "big", ST_F32, 2, sh2, NULL, &err), 0);                        /* 1200 */
    assert_int_equal(st_plan_add_tensor(p, "tail", ST_I64, 1, sh1, NULL, &err), 0);                       /* 56 */
    assert_int_equal(st_plan_layout(p, &err), 0);
    assert_int_equal(st_plan_n_shards(p), 3);
    assert_true(st_plan_has_index(p));
    assert_string_equal(st_plan_shard_at(p, 0)->file_name, "model-00001-of-00003.safetensors");
    assert_string_equal(st_plan_shard_at(p, 2)->file_name, "model-00003-of-00003.safetensors");
    assert_int_equal(st_plan_tensor_at(p, 3)->shard, 0);
    assert_int_equal(st_plan_tensor_at(p, 4)->shard, 1);
    assert_int_equal(st_plan_tensor_at(p, 5)->shard, 2);
    const char *meta[] = {"merged_by", "mergestream", "seed", "42"};
    for (size_t s = 0; s < 3; s++)
        check_header(p, s, meta, 2);
    assert_int_equal(st_plan_find(p, "big"), 4);
    assert_int_equal(st_plan_find(p, "a.\"quoted\\name"), 1);
    assert_int_equal(st_plan_find(p, "model.embed_tokens.weight"), 0);
    assert_int_equal(st_plan_find(p, "missing"), -1);
    assert_int_equal(st_plan_find(p, "bi"), -1);
    st_plan_free(p);

    /* One shard: "model.safetensors", no index. */
    p = plan_u8((uint64_t[]){5, 6}, 2, ST_DEFAULT_SHARD_BYTES);
    assert_int_equal(st_plan_n_shards(p), 1);
    assert_false(st_plan_has_index(p));
    assert_string_equal(st_plan_shard_at(p, 0)->file_name, "model.safetensors");
    assert_string_equal(st_plan_index_name(p), ST_INDEX_FILE_NAME);
    check_header(p, 0, NULL, 0);
    st_plan_free(p);

    /* Another stem, e.g. a PEFT adapter. */
    for (int k = 0; k < 2; k++) {
        assert_int_equal(st_plan_create(k == 0 ? 100 : 5, &p, &err), 0);
        assert_int_equal(st_plan_set_stem(p, "", &err), -1);
        assert_int_equal(st_plan_set_stem(p, "a/b", &err), -1);
        assert_int_equal(st_plan_set_stem(p, "adapter_model", &err), 0);
        uint64_t six = 6;
        assert_int_equal(st_plan_add_tensor(p, "x", ST_U8, 1, &six, NULL, &err), 0);
        assert_int_equal(st_plan_add_tensor(p, "y", ST_U8, 1, &six, NULL, &err), 0);
        assert_int_equal(st_plan_layout(p, &err), 0);
        assert_string_equal(st_plan_index_name(p), "adapter_model.safetensors.index.json");
        assert_string_equal(st_plan_shard_at(p, 0)->file_name,
                            k == 0 ? "adapter_model.safetensors" : "adapter_model-00001-of-00002.safetensors");
        st_plan_free(p);
    }

    /* No tensors: one shard with only the metadata. */
    p = plan_u8(NULL, 0, 10);
    assert_int_equal(st_plan_n_shards(p), 1);
    assert_int_equal(st_plan_shard_at(p, 0)->n_tensors, 0);
    check_header(p, 0, NULL, 0);
    st_plan_free(p);
}

static void test_plan_rejects_bad_tensors(void **state)
{
    (void)state;
    ms_error err = {0};
    st_plan *p = NULL;
    assert_int_equal(st_plan_create(100, &p, &err), 0);
    uint64_t odd[1] = {3}, even[1] = {4}, huge[2] = {1ull << 32, 1ull << 32}, big[1] = {UINT64_MAX / 4};
    uint64_t dims[ST_MAX_DIMS + 1];
    for (int i = 0; i <= ST_MAX_DIMS; i++)
        dims[i] = 1;
    assert_int_equal(st_plan_add_tensor(p, "", ST_F32, 1, even, NULL, &err), -1);
    assert_int_equal(st_plan_add_tensor(p, "__metadata__", ST_F32, 1, even, NULL, &err), -1);
    assert_int_equal(st_plan_add_tensor(p, "f4", ST_F4, 1, odd, NULL, &err), -1);
    assert_non_null(strstr(err.msg, "f4: "));
    assert_non_null(strstr(err.msg, "whole number of bytes"));
    assert_int_equal(st_plan_add_tensor(p, "f4", ST_F4, 1, even, NULL, &err), 0); /* 2 bytes */
    assert_int_equal(st_plan_add_tensor(p, "wrap", ST_U8, 2, huge, NULL, &err), -1);
    assert_non_null(strstr(err.msg, "overflows"));
    assert_int_equal(st_plan_add_tensor(p, "bytes", ST_F64, 1, big, NULL, &err), -1);
    assert_int_equal(st_plan_add_tensor(p, "deep", ST_U8, ST_MAX_DIMS + 1, dims, NULL, &err), -1);
    assert_int_equal(st_plan_add_tensor(p, "deep", ST_U8, ST_MAX_DIMS, dims, NULL, &err), 0);
    assert_int_equal(st_plan_add_tensor(p, "bad_dtype", (st_dtype)ST_DTYPE_COUNT, 1, even, NULL, &err), -1);
    uint64_t bits_ok[1] = {(1ull << 61) - 1}, bits_wrap[1] = {1ull << 61};
    assert_int_equal(st_plan_add_tensor(p, "h1", ST_U8, 1, bits_ok, NULL, &err), 0);
    assert_int_equal(st_plan_add_tensor(p, "h2", ST_U8, 1, bits_wrap, NULL, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    st_plan_free(p);

    /* Duplicates are found at layout, naming the tensor. */
    assert_int_equal(st_plan_create(100, &p, &err), 0);
    assert_int_equal(st_plan_add_tensor(p, "x", ST_U8, 1, even, NULL, &err), 0);
    assert_int_equal(st_plan_add_tensor(p, "y", ST_U8, 1, even, NULL, &err), 0);
    assert_int_equal(st_plan_add_tensor(p, "x", ST_U8, 1, even, NULL, &err), 0);
    assert_int_equal(st_plan_layout(p, &err), -1);
    assert_string_equal(err.msg, "x: tensor name appears twice in the output");
    st_plan_free(p);
    st_plan_free(NULL);
}

/* ---------------------------------------------------------- writing files */

typedef struct fixture {
    st_plan *plan;
    unsigned char **data; /* the reference bytes of every tensor */
    size_t n;
} fixture;

static const st_dtype k_dtypes[] = {ST_BF16, ST_F16, ST_F32, ST_U8, ST_I64};

/* A random plan: n tensors of random dtypes and 1-3 dims, random limit, and
 * random bytes for each. */
static fixture fixture_make(size_t n, uint64_t limit)
{
    fixture fx = {.n = n};
    ms_error err = {0};
    assert_int_equal(st_plan_create(limit, &fx.plan, &err), 0);
    fx.data = calloc(n ? n : 1, sizeof *fx.data);
    for (size_t i = 0; i < n; i++) {
        char name[64];
        snprintf(name, sizeof name, "model.layers.%zu.w%" PRIu64, i, rnd() % 1000);
        uint64_t shape[3];
        unsigned ndim = (unsigned)rnd_range(1, 3);
        for (unsigned d = 0; d < ndim; d++)
            shape[d] = rnd_range(1, 24);
        st_dtype dt = k_dtypes[rnd() % 5];
        assert_int_equal(st_plan_add_tensor(fx.plan, name, dt, ndim, shape, NULL, &err), 0);
        const st_plan_tensor *t = st_plan_tensor_at(fx.plan, i);
        fx.data[i] = malloc(t->nbytes);
        fill_random(fx.data[i], t->nbytes);
    }
    assert_int_equal(st_plan_layout(fx.plan, &err), 0);
    return fx;
}

static void fixture_free(fixture *fx)
{
    for (size_t i = 0; i < fx->n; i++)
        free(fx->data[i]);
    free(fx->data);
    st_plan_free(fx->plan);
}

/* Writes every tensor of fx in a random order and random pieces; half the
 * tensors in pieces get their hash from the caller, the others are written
 * whole with st_writer_write_tensor. */
static void write_all_random(st_writer *w, const fixture *fx)
{
    ms_error err = {0};
    size_t *order = malloc((fx->n ? fx->n : 1) * sizeof *order);
    for (size_t i = 0; i < fx->n; i++)
        order[i] = i;
    for (size_t i = fx->n; i > 1; i--) {
        size_t j = (size_t)(rnd() % i), t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    for (size_t k = 0; k < fx->n; k++) {
        size_t i = order[k];
        const st_plan_tensor *t = st_plan_tensor_at(fx->plan, i);
        if (rnd() % 3 == 0) {
            assert_int_equal(st_writer_write_tensor(w, i, fx->data[i], &err), 0);
            continue;
        }
        /* Cut into pieces, written in a shuffled order. */
        uint64_t cuts[10];
        size_t nc = 0;
        cuts[nc++] = 0;
        for (int c = 0; c < 8 && t->nbytes > 1; c++)
            cuts[nc++] = rnd_range(0, t->nbytes);
        cuts[nc++] = t->nbytes;
        for (size_t a = 1; a < nc; a++) /* insertion sort: tiny */
            for (size_t b = a; b > 0 && cuts[b - 1] > cuts[b]; b--) {
                uint64_t tmp = cuts[b];
                cuts[b] = cuts[b - 1];
                cuts[b - 1] = tmp;
            }
        size_t pieces[9];
        for (size_t c = 0; c + 1 < nc; c++)
            pieces[c] = c;
        for (size_t c = nc - 1; c > 1; c--) {
            size_t j = (size_t)(rnd() % c), tmp = pieces[c - 1];
            pieces[c - 1] = pieces[j];
            pieces[j] = tmp;
        }
        st_writer_set_tensor_hash(w, i, ms_hash64(fx->data[i], t->nbytes));
        for (size_t c = 0; c + 1 < nc; c++) {
            uint64_t b = cuts[pieces[c]], e = cuts[pieces[c] + 1];
            assert_int_equal(st_writer_write(w, i, b, fx->data[i] + b, e - b, &err), 0);
        }
    }
    free(order);
}

/* Reads the output back with st_file_open and compares every byte and hash. */
static void check_output(const char *dir, const fixture *fx, const st_writer *w)
{
    ms_error err = {0};
    const st_plan *p = fx->plan;
    size_t ns = st_plan_n_shards(p);
    for (size_t s = 0; s < ns; s++) {
        const st_plan_shard *sh = st_plan_shard_at(p, s);
        char *path = join(dir, sh->file_name);
        st_file *f = NULL;
        if (st_file_open(path, &f, &err) != 0)
            fail_msg("%s", err.msg);
        assert_true(f->file_size == sh->file_size);
        assert_true(f->data_start == sh->header_bytes);
        assert_int_equal(f->header.n_tensors, sh->n_tensors);
        assert_true(f->header.n_meta >= 1);
        assert_string_equal(f->header.meta_keys[0], "format");
        assert_string_equal(f->header.meta_values[0], "pt");
        size_t len;
        unsigned char *bytes = read_all(path, &len);
        assert_int_equal(len, sh->file_size);
        assert_memory_equal(bytes, sh->header, sh->header_bytes);
        uint64_t hashes[256] = {0};
        assert_true(sh->n_tensors <= 256);
        for (size_t k = 0; k < sh->n_tensors; k++) {
            size_t i = sh->first_tensor + k;
            const st_plan_tensor *t = st_plan_tensor_at(p, i);
            const st_tensor *ft = &f->header.tensors[k]; /* on-disk order = plan order */
            assert_string_equal(ft->name, t->name);
            assert_int_equal(ft->dtype, t->dtype);
            assert_int_equal(ft->ndim, t->ndim);
            assert_true(st_file_tensor_offset(f, ft) == t->offset);
            assert_memory_equal(bytes + t->offset, fx->data[i], t->nbytes);
            hashes[k] = ms_hash64(bytes + t->offset, t->nbytes);
            if (w)
                assert_true(st_writer_tensor_hash(w, i) == hashes[k]);
        }
        if (w)
            assert_true(st_writer_shard_hash(w, s) == ms_shard_hash(bytes, sh->header_bytes, hashes, sh->n_tensors));
        free(bytes);
        st_file_close(f);
        free(path);
    }
    /* Nothing else in the directory but the shards and the index. */
    size_t want = ns + (ns > 1 ? 1 : 0);
    assert_int_equal(list_dir(dir, NULL, 0), want);
    assert_int_equal(file_exists(dir, ST_INDEX_FILE_NAME), ns > 1);
}

static void check_index(const char *dir, const st_plan *p)
{
    char *path = join(dir, ST_INDEX_FILE_NAME);
    size_t len;
    char *text = (char *)read_all(path, &len);
    cJSON *root = cJSON_Parse(text);
    assert_non_null(root);
    cJSON *meta = cJSON_GetObjectItem(root, "metadata");
    assert_true((uint64_t)cJSON_GetObjectItem(meta, "total_size")->valuedouble == st_plan_total_bytes(p));
    cJSON *map = cJSON_GetObjectItem(root, "weight_map");
    assert_int_equal(cJSON_GetArraySize(map), st_plan_n_tensors(p));
    const char *prev = NULL;
    for (cJSON *e = map->child; e; e = e->next) {
        if (prev)
            assert_true(strcmp(prev, e->string) < 0); /* sorted, unique */
        prev = e->string;
        long i = st_plan_find(p, e->string);
        assert_true(i >= 0);
        const st_plan_tensor *t = st_plan_tensor_at(p, (size_t)i);
        assert_string_equal(e->valuestring, st_plan_shard_at(p, t->shard)->file_name);
    }
    /* transformers' layout: 2-space indent, trailing newline. */
    const char *head = "{\n  \"metadata\": {\n    \"total_size\": ";
    assert_memory_equal(text, head, strlen(head));
    assert_non_null(strstr(text, "\n  \"weight_map\": {\n    \""));
    assert_int_equal(text[len - 1], '\n');
    cJSON_Delete(root);
    free(text);
    free(path);
}

static void test_write_multishard_random_order(void **state)
{
    (void)state;
    for (int round = 0; round < 6; round++) {
        char *dir = make_tmpdir();
        ms_error err = {0};
        fixture fx = fixture_make((size_t)rnd_range(3, 40), rnd_range(200, 3000));
        st_writer *w = NULL;
        assert_int_equal(st_writer_open(fx.plan, dir, &w, &err), 0);
        assert_int_equal(list_dir(dir, NULL, 0), 0); /* open creates nothing */
        write_all_random(w, &fx);
        for (size_t s = 0; s < st_plan_n_shards(fx.plan); s++) {
            assert_true(st_writer_shard_is_final(w, s)); /* finalized by its last write */
            assert_true(st_writer_shard_missing(w, s) == 0);
        }
        assert_int_equal(st_writer_finish(w, &err), 0);
        check_output(dir, &fx, w);
        if (st_plan_has_index(fx.plan))
            check_index(dir, fx.plan);
        st_writer_close(w);
        check_output(dir, &fx, NULL); /* close after finish keeps the files */
        fixture_free(&fx);
        rm_tree(dir);
    }
}

static void test_write_shard_finalizes_on_last_byte(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    ms_error err = {0};
    uint64_t sizes[4] = {10, 10, 10, 10};
    st_plan *p = plan_u8(sizes, 4, 20); /* shards {t0,t1}, {t2,t3} */
    unsigned char buf[10];
    fill_random(buf, 10);
    st_writer *w = NULL;
    assert_int_equal(st_writer_open(p, dir, &w, &err), 0);
    const char *f1 = "model-00001-of-00002.safetensors", *f2 = "model-00002-of-00002.safetensors";
    assert_int_equal(st_writer_write(w, 1, 0, buf, 10, &err), 0);
    assert_true(file_exists(dir, "model-00001-of-00002.safetensors.partial"));
    assert_true(st_writer_shard_missing(w, 0) == 10);
    assert_int_equal(st_writer_write(w, 0, 0, buf, 9, &err), 0);
    assert_false(st_writer_shard_is_final(w, 0));
    /* Errors that write nothing: overlap, outside the tensor. */
    assert_int_equal(st_writer_write(w, 0, 8, buf, 2, &err), -1);
    assert_non_null(strstr(err.msg, "t0: write of bytes [8, +2) overlaps"));
    assert_int_equal(st_writer_write(w, 0, 9, buf, 2, &err), -1);
    assert_non_null(strstr(err.msg, "outside the tensor's 10 bytes"));
    assert_int_equal(st_writer_write(w, 0, 11, buf, 0, &err), -1);
    assert_int_equal(st_writer_write(w, 0, UINT64_MAX, buf, 2, &err), -1);
    assert_int_equal(st_writer_write(w, 1, 0, buf, 1, &err), -1); /* t1 is complete */
    assert_int_equal(st_writer_write(w, 0, 10, buf, 0, &err), 0);  /* empty write at the end: fine */
    /* finish before everything landed names the tensor. */
    assert_int_equal(st_writer_finish(w, &err), -1);
    assert_non_null(strstr(err.msg, "model-00001-of-00002.safetensors.partial: 1 bytes never written (tensor t0"));
    /* The last byte of shard 1 finalizes it. */
    assert_int_equal(st_writer_write(w, 0, 9, buf + 9, 1, &err), 0);
    assert_true(st_writer_shard_is_final(w, 0));
    assert_true(file_exists(dir, f1));
    assert_false(file_exists(dir, "model-00001-of-00002.safetensors.partial"));
    /* Shard 2 through the io-engine path: target + landed. */
    int fd = -1;
    uint64_t off = 0;
    assert_int_equal(st_writer_tensor_target(w, 3, &fd, &off, &err), 0);
    assert_true(off == st_plan_tensor_at(p, 3)->offset);
    assert_int_equal(pwrite(fd, buf, 10, (off_t)off), 10);
    assert_int_equal(st_writer_tensor_landed(w, 3, 0, 10, &err), 0);
    assert_int_equal(st_writer_tensor_landed(w, 3, 5, 1, &err), -1);
    assert_int_equal(st_writer_tensor_target(w, 2, &fd, &off, &err), 0);
    assert_int_equal(pwrite(fd, buf, 10, (off_t)off), 10);
    assert_int_equal(st_writer_tensor_landed(w, 2, 0, 10, &err), 0);
    assert_true(st_writer_shard_is_final(w, 1));
    assert_true(file_exists(dir, f2));
    assert_int_equal(st_writer_tensor_target(w, 2, &fd, &off, &err), -1); /* shard done */
    /* A tensor without a hash fails finish, naming it. */
    for (size_t i = 0; i < 4; i++)
        if (i != 2)
            st_writer_set_tensor_hash(w, i, 1);
    assert_int_equal(st_writer_finish(w, &err), -1);
    assert_string_equal(err.msg, "t2: no hash recorded for the tensor");
    st_writer_set_tensor_hash(w, 2, 1);
    assert_int_equal(st_writer_finish(w, &err), 0);
    assert_int_equal(st_writer_finish(w, &err), -1); /* only once */
    assert_int_equal(st_writer_write(w, 0, 0, buf, 1, &err), -1);
    assert_true(file_exists(dir, ST_INDEX_FILE_NAME));
    st_writer_close(w);
    assert_int_equal(list_dir(dir, NULL, 0), 3);
    st_plan_free(p);
    rm_tree(dir);
}

static void test_write_single_shard_and_empty(void **state)
{
    (void)state;
    ms_error err = {0};
    /* One shard: model.safetensors and no index. */
    char *dir = make_tmpdir();
    fixture fx = fixture_make(12, ST_DEFAULT_SHARD_BYTES);
    st_writer *w = NULL;
    assert_int_equal(st_writer_open(fx.plan, dir, &w, &err), 0);
    write_all_random(w, &fx);
    assert_int_equal(st_writer_finish(w, &err), 0);
    char names[4][256];
    assert_int_equal(list_dir(dir, names, 4), 1);
    assert_string_equal(names[0], "model.safetensors");
    check_output(dir, &fx, w);
    st_writer_close(w);
    fixture_free(&fx);
    rm_tree(dir);

    /* Only empty tensors, and no tensors at all: finish creates the files. */
    for (int k = 0; k < 2; k++) {
        dir = make_tmpdir();
        uint64_t zeros[3] = {0, 0, 0};
        st_plan *p = plan_u8(zeros, k == 0 ? 3 : 0, 5);
        assert_int_equal(st_writer_open(p, dir, &w, &err), 0);
        for (size_t i = 0; i < st_plan_n_tensors(p); i++)
            st_writer_set_tensor_hash(w, i, ms_hash64(NULL, 0));
        assert_int_equal(st_writer_finish(w, &err), 0);
        char *path = join(dir, "model.safetensors");
        st_file *f = NULL;
        if (st_file_open(path, &f, &err) != 0)
            fail_msg("%s", err.msg);
        assert_int_equal(f->header.n_tensors, st_plan_n_tensors(p));
        assert_true(f->file_size == st_plan_shard_at(p, 0)->header_bytes);
        st_file_close(f);
        free(path);
        st_writer_close(w);
        assert_int_equal(list_dir(dir, NULL, 0), 1);
        st_plan_free(p);
        rm_tree(dir);
    }
}

static void test_abort_leaves_nothing(void **state)
{
    (void)state;
    ms_error err = {0};
    for (int when = 0; when < 4; when++) {
        char *dir = make_tmpdir();
        char *keep = join(dir, "config.json"); /* not ours: must survive */
        write_small(keep, "{}");
        fixture fx = fixture_make(30, 400);
        assert_true(st_plan_n_shards(fx.plan) > 1);
        st_writer *w = NULL;
        assert_int_equal(st_writer_open(fx.plan, dir, &w, &err), 0);
        if (when == 1) { /* some partial, nothing final */
            const st_plan_tensor *t = st_plan_tensor_at(fx.plan, 0);
            assert_int_equal(st_writer_shard_open(w, 0, &err), 0);
            assert_int_equal(st_writer_write(w, 0, 0, fx.data[0], t->nbytes - 1, &err), 0);
            assert_int_equal(st_writer_shard_open(w, st_plan_n_shards(fx.plan) - 1, &err), 0);
            assert_true(list_dir(dir, NULL, 0) == 3);
        } else if (when >= 2) { /* everything written; then finished */
            write_all_random(w, &fx);
            assert_true(list_dir(dir, NULL, 0) == 1 + st_plan_n_shards(fx.plan));
            if (when == 3)
                assert_int_equal(st_writer_finish(w, &err), 0);
        }
        if (when == 2)
            st_writer_close(w); /* close before finish = abort */
        else
            st_writer_abort(w);
        char names[4][256];
        assert_int_equal(list_dir(dir, names, 4), 1);
        assert_string_equal(names[0], "config.json");
        free(keep);
        fixture_free(&fx);
        rm_tree(dir);
    }
    st_writer_abort(NULL);
    st_writer_close(NULL);
}

static void test_write_errors_name_the_file(void **state)
{
    (void)state;
    ms_error err = {0};
    char *dir = make_tmpdir();
    char *gone = join(dir, "gone");
    uint64_t sizes[2] = {4, 4};
    st_plan *p = plan_u8(sizes, 2, 4);
    st_writer *w = NULL;
    assert_int_equal(st_writer_open(p, gone, &w, &err), 0); /* the directory does not exist */
    assert_int_equal(st_writer_write(w, 0, 0, "abcd", 4, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_RUNTIME);
    char want[512];
    snprintf(want, sizeof want, "%s/model-00001-of-00002.safetensors.partial: cannot create: %s", gone,
             strerror(ENOENT));
    assert_string_equal(err.msg, want);
    assert_int_equal(st_writer_write(w, 1, 0, "abcd", 4, &err), -1); /* unusable now */
    assert_non_null(strstr(err.msg, "failed earlier"));
    st_writer_abort(w);

    /* A trailing slash on dir does not double the separator. */
    char *slashed = NULL;
    assert_true(asprintf(&slashed, "%s/", dir) > 0);
    assert_int_equal(st_writer_open(p, slashed, &w, &err), 0);
    assert_int_equal(st_writer_write_tensor(w, 0, "abcd", &err), 0);
    assert_true(file_exists(dir, "model-00001-of-00002.safetensors"));
    st_writer_abort(w);
    assert_int_equal(list_dir(dir, NULL, 0), 0);
    free(slashed);
    free(gone);
    st_plan_free(p);
    rm_tree(dir);
}

int main(void)
{
    const char *seed = getenv("MS_TEST_SEED");
    g_rng = seed ? strtoull(seed, NULL, 0) : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    fprintf(stderr, "test_st_writer: MS_TEST_SEED=%" PRIu64 "\n", g_rng);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checksum_known_values),
        cmocka_unit_test(test_checksum_streaming_matches_oneshot),
        cmocka_unit_test(test_checksum_shard_hash_definition),
        cmocka_unit_test(test_atomic_write_and_copy),
        cmocka_unit_test(test_plan_cut_boundaries),
        cmocka_unit_test(test_plan_cut_random_vs_reference),
        cmocka_unit_test(test_plan_header_and_names),
        cmocka_unit_test(test_plan_rejects_bad_tensors),
        cmocka_unit_test(test_write_multishard_random_order),
        cmocka_unit_test(test_write_shard_finalizes_on_last_byte),
        cmocka_unit_test(test_write_single_shard_and_empty),
        cmocka_unit_test(test_abort_leaves_nothing),
        cmocka_unit_test(test_write_errors_name_the_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
