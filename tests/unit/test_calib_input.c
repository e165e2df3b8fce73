/* Tests for io/calib_input.c: calibration tokens from text files and from
 * safetensors files (input_ids, optional attention_mask).
 *
 * Random ragged sample sets are written in both formats (text; safetensors
 * with every integer id dtype and mask dtype) and read back: the ids, the
 * mask, the real-token count must equal the generator's, with --seq-len
 * truncating and padding and --max-samples cutting, on both sides of each
 * boundary, samples without a real token dropped and each row's origin
 * (line or input_ids row) kept. Then every rejection: malformed ids,
 * negative and overflowing ids, mask values other than 0/1, shape and dtype
 * mismatches, missing input_ids, no samples, no real token, ids at and
 * above the vocabulary, each naming its place as the user counts it (text:
 * 1-based line and token; safetensors: input_ids[row][position]) with odd
 * bytes escaped; a byte order mark; the format told by content, not by the
 * name (a safetensors calib.bin, a PyTorch checkpoint refused as such);
 * left padding cut by --seq-len. The seed is printed; MS_TEST_SEED=N
 * replays a run. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "io/calib_input.h"
#include "io/st_writer.h"

static uint64_t g_rng;
static char g_dir[64];

static uint64_t rnd(void)
{
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t below(uint64_t n) { return rnd() % n; }

static const char *path_of(const char *name)
{
    static char p[160];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    return p;
}

static void write_bytes(const char *name, const void *data, size_t n)
{
    FILE *f = fopen(path_of(name), "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void write_text(const char *name, const char *text) { write_bytes(name, text, strlen(text)); }

/* A ragged sample set: lengths[s] real tokens, ids below max_id; line[s]:
 * the 1-based line samples_to_text wrote sample s on. */
typedef struct samples {
    uint64_t n, longest;
    uint64_t len[16];
    int64_t id[16][40];
    uint64_t line[16];
} samples;

static void gen_samples(samples *s, uint64_t max_id)
{
    memset(s, 0, sizeof *s);
    s->n = 1 + below(12);
    for (uint64_t i = 0; i < s->n; i++) {
        s->len[i] = below(40) + (i == 0); /* some empty, at least one not */
        for (uint64_t p = 0; p < s->len[i]; p++)
            s->id[i][p] = (int64_t)below(max_id);
        s->longest = s->len[i] > s->longest ? s->len[i] : s->longest;
    }
}

/* c must hold s cut to max_samples and seq (0: defaults), right-padded,
 * without its empty samples; each row's origin is its line (text) or its
 * index in s (safetensors). */
static void expect_samples(const ms_calib *c, const samples *s, uint64_t max_samples, uint64_t seq, bool text)
{
    uint64_t n = max_samples && max_samples < s->n ? max_samples : s->n;
    uint64_t longest = 0, empty = 0;
    for (uint64_t i = 0; i < n; i++) {
        longest = s->len[i] > longest ? s->len[i] : longest;
        empty += s->len[i] == 0;
    }
    assert_int_equal(c->text, text);
    assert_int_equal(c->n_read, n);
    assert_int_equal(c->n_empty, empty);
    assert_int_equal(c->n_emptied, 0); /* right padding keeps position 0 */
    assert_int_equal(c->n_samples, n - empty);
    uint64_t want_seq = seq ? seq : longest;
    assert_int_equal(c->seq_len, want_seq);
    uint64_t real = 0, truncated = 0, row = 0, max_pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (s->len[i] == 0)
            continue;
        truncated += s->len[i] > want_seq;
        assert_int_equal(c->origin[row], text ? s->line[i] : i);
        for (uint64_t p = 0; p < want_seq; p++) {
            bool r = p < s->len[i];
            assert_int_equal(c->mask[row * want_seq + p], r);
            if (r) {
                assert_int_equal(c->ids[row * want_seq + p], s->id[i][p]);
                real++;
                max_pos = p + 1 > max_pos ? p + 1 : max_pos;
            }
        }
        row++;
    }
    assert_int_equal(c->n_real, real);
    assert_int_equal(c->n_truncated, truncated);
    assert_int_equal(c->max_position, max_pos);
}

static void samples_to_text(samples *s, const char *name)
{
    char *buf = malloc(1 << 16);
    size_t used = 0;
    uint64_t line = 1;
    if (below(4) == 0)
        used += (size_t)sprintf(buf + used, "\xef\xbb\xbf"); /* a UTF-8 byte order mark is skipped */
    for (uint64_t i = 0; i < s->n; i++) {
        s->line[i] = 0;
        if (below(3) == 0) {
            used += (size_t)sprintf(buf + used, below(2) ? "\n" : "  \t \n"); /* blank lines are skipped */
            line++;
        }
        if (s->len[i] == 0)
            continue; /* an empty sample cannot be written as text */
        s->line[i] = line++;
        if (below(2))
            used += (size_t)sprintf(buf + used, " ");
        for (uint64_t p = 0; p < s->len[i]; p++)
            used += (size_t)sprintf(buf + used, "%s%" PRId64, p ? (below(4) ? " " : "\t  ") : "", s->id[i][p]);
        used += (size_t)sprintf(buf + used, below(3) == 0 ? "\r\n" : (i + 1 == s->n && below(2) ? "" : "\n"));
    }
    buf[used] = 0;
    write_text(name, buf);
    free(buf);
}

/* Writes tensors (name, dtype, ndim, shape, raw bytes) as a safetensors file. */
typedef struct raw_tensor {
    const char *name;
    st_dtype dtype;
    unsigned ndim;
    uint64_t shape[2];
    void *data;
} raw_tensor;

static void write_st(const char *name, const raw_tensor *t, size_t n)
{
    ms_error err = {0};
    st_plan *plan = NULL;
    st_writer *w = NULL;
    assert_int_equal(st_plan_create(UINT64_MAX, &plan, &err), 0);
    assert_int_equal(st_plan_set_stem(plan, "staging", &err), 0);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(st_plan_add_tensor(plan, t[i].name, t[i].dtype, t[i].ndim, t[i].shape, NULL, &err), 0);
    assert_int_equal(st_plan_layout(plan, &err), 0);
    assert_int_equal(st_writer_open(plan, g_dir, &w, &err), 0);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(st_writer_write_tensor(w, i, t[i].data, &err), 0);
    if (st_writer_finish(w, &err) != 0)
        fail_msg("%s", err.msg);
    st_writer_close(w);
    st_plan_free(plan);
    char from[160];
    snprintf(from, sizeof from, "%s/staging.safetensors", g_dir);
    assert_int_equal(rename(from, path_of(name)), 0);
}

/* v as a little-endian integer of dtype d at element i. */
static void put_int(void *buf, st_dtype d, uint64_t i, int64_t v)
{
    unsigned char *p = buf;
    switch (d) {
    case ST_BOOL:
    case ST_U8:
    case ST_I8: p[i] = (unsigned char)v; break;
    case ST_I16:
    case ST_U16: { uint16_t x = (uint16_t)v; memcpy(p + 2 * i, &x, 2); break; }
    case ST_I32:
    case ST_U32: { uint32_t x = (uint32_t)v; memcpy(p + 4 * i, &x, 4); break; }
    default: { uint64_t x = (uint64_t)v; memcpy(p + 8 * i, &x, 8); break; }
    }
}

/* The samples as input_ids [n, width] (padding filled with junk) plus a mask. */
static void samples_to_st(const samples *s, const char *name, st_dtype id_dt, st_dtype mask_dt)
{
    uint64_t width = s->longest + below(3), n = s->n;
    unsigned ib = st_dtype_bits(id_dt) / 8, mb = st_dtype_bits(mask_dt) / 8;
    void *ids = calloc(n * width, ib), *mask = calloc(n * width, mb);
    for (uint64_t i = 0; i < n; i++)
        for (uint64_t p = 0; p < width; p++) {
            bool r = p < s->len[i];
            put_int(ids, id_dt, i * width + p, r ? s->id[i][p] : (int64_t)below(100));
            put_int(mask, mask_dt, i * width + p, r);
        }
    raw_tensor t[2] = {{"attention_mask", mask_dt, 2, {n, width}, mask}, {"input_ids", id_dt, 2, {n, width}, ids}};
    write_st(name, t, 2);
    free(ids);
    free(mask);
}

static ms_calib *load_ok(const char *name, uint64_t max_samples, uint64_t seq)
{
    ms_error err = {0};
    ms_calib *c = NULL;
    ms_calib_options o = {max_samples, seq};
    if (ms_calib_load(path_of(name), &o, &c, &err) != 0)
        fail_msg("%s: %s", name, err.msg);
    return c;
}

static void load_fails(const char *name, int code, const char *needle)
{
    ms_error err = {0};
    ms_calib *c = NULL;
    if (ms_calib_load(path_of(name), NULL, &c, &err) == 0)
        fail_msg("%s was accepted", name);
    assert_null(c);
    assert_int_equal(err.exit_code, code);
    if (!strstr(err.msg, needle))
        fail_msg("'%s' does not mention '%s'", err.msg, needle);
}

/* ============================================================ tests */

static void test_text_round_trip(void **state)
{
    (void)state;
    for (int round = 0; round < 40; round++) {
        samples s;
        gen_samples(&s, round % 2 ? 200000 : 50);
        samples_to_text(&s, "calib.txt");
        /* text cannot carry an empty sample: drop them from the expectation */
        samples t = {0};
        for (uint64_t i = 0; i < s.n; i++)
            if (s.len[i]) {
                t.len[t.n] = s.len[i];
                t.line[t.n] = s.line[i];
                memcpy(t.id[t.n], s.id[i], sizeof s.id[i]);
                t.longest = s.len[i] > t.longest ? s.len[i] : t.longest;
                t.n++;
            }
        uint64_t longest = t.longest;
        /* both sides of the seq_len boundary, and the max_samples cut */
        uint64_t seqs[] = {0, longest, longest - 1 ? longest - 1 : 1, longest + 1, 1};
        uint64_t maxs[] = {0, t.n, t.n > 1 ? t.n - 1 : 1, t.n + 1, 1};
        for (int k = 0; k < 5; k++) {
            ms_calib *c = load_ok("calib.txt", maxs[k], seqs[k]);
            expect_samples(c, &t, maxs[k], seqs[k], true);
            ms_calib_free(c);
        }
    }
}

static void test_safetensors_round_trip(void **state)
{
    (void)state;
    static const st_dtype k_ids[] = {ST_I64, ST_I32, ST_U32, ST_I16, ST_U16, ST_U8, ST_I8, ST_U64};
    static const st_dtype k_masks[] = {ST_I64, ST_BOOL, ST_U8, ST_I32, ST_I8};
    for (int round = 0; round < 40; round++) {
        samples s;
        st_dtype idt = k_ids[round % 8], mdt = k_masks[round % 5];
        gen_samples(&s, idt == ST_U8 || idt == ST_I8 ? 100 : 30000);
        /* names: ".safetensors", and others sniffed by content (".bin" too) */
        const char *name = round % 3 ? "calib.safetensors" : round % 2 ? "calib-st.dat" : "calib.bin";
        samples_to_st(&s, name, idt, mdt);
        uint64_t seqs[] = {0, s.longest, s.longest > 1 ? s.longest - 1 : 1, s.longest + 3};
        uint64_t maxs[] = {0, s.n, s.n > 1 ? s.n - 1 : 1, s.n + 1};
        for (int k = 0; k < 4; k++) {
            ms_error err = {0};
            ms_calib *c = NULL;
            ms_calib_options o = {maxs[k], seqs[k]};
            int rc = ms_calib_load(path_of(name), &o, &c, &err);
            /* a cut that leaves only empty samples has no real token */
            uint64_t n = maxs[k] && maxs[k] < s.n ? maxs[k] : s.n;
            bool any = false;
            for (uint64_t i = 0; i < n; i++)
                any |= s.len[i] > 0;
            if (!any) {
                assert_int_equal(rc, -1);
                assert_non_null(strstr(err.msg, "no real tokens"));
                continue;
            }
            if (rc != 0)
                fail_msg("%s", err.msg);
            /* the file's width is longest + 0..2 columns of padding */
            if (seqs[k] == 0)
                assert_true(c->seq_len >= s.longest && c->seq_len <= s.longest + 2);
            expect_samples(c, &s, maxs[k], c->seq_len, false);
            ms_calib_free(c);
        }
    }
    /* no mask: every position is real; a 1-D input_ids is one sample */
    int64_t ids[6] = {5, 4, 3, 2, 1, 0};
    raw_tensor t = {"input_ids", ST_I64, 2, {2, 3}, ids};
    write_st("nomask.safetensors", &t, 1);
    ms_calib *c = load_ok("nomask.safetensors", 0, 0);
    assert_int_equal(c->n_samples, 2);
    assert_int_equal(c->seq_len, 3);
    assert_int_equal(c->n_real, 6);
    assert_memory_equal(c->ids, ids, sizeof ids);
    ms_calib_free(c);
    t = (raw_tensor){"input_ids", ST_I64, 1, {6, 0}, ids};
    write_st("flat.safetensors", &t, 1);
    c = load_ok("flat.safetensors", 0, 0);
    assert_int_equal(c->n_samples, 1);
    assert_int_equal(c->seq_len, 6);
    ms_calib_free(c);
}

static void test_rejections(void **state)
{
    (void)state;
    write_text("letters.txt", "1 2 3\n4 x5 6\n");
    load_fails("letters.txt", MS_EXIT_DATA, "line 2, token 2: 'x5'");
    write_text("negative.txt", "1 -2 3\n");
    load_fails("negative.txt", MS_EXIT_DATA, "'-2'");
    write_text("big.txt", "9223372036854775807\n9223372036854775808\n");
    load_fails("big.txt", MS_EXIT_DATA, "line 2");
    write_text("float.txt", "1 2.5\n");
    load_fails("float.txt", MS_EXIT_DATA, "'2.5'");
    write_text("empty.txt", "");
    load_fails("empty.txt", MS_EXIT_DATA, "no calibration samples");
    write_text("blank.txt", "\n  \n\t\n");
    load_fails("blank.txt", MS_EXIT_DATA, "no calibration samples");
    load_fails("missing.txt", MS_EXIT_DATA, "cannot open");
    load_fails(".", MS_EXIT_DATA, "not a regular file");

    int64_t ids[4] = {1, 2, 3, 4}, neg[4] = {1, -2, 3, 4}, mask2[4] = {1, 1, 2, 0}, zeros[4] = {0};
    float fl[4] = {1, 2, 3, 4};
    raw_tensor t[2];
    t[0] = (raw_tensor){"input_ids", ST_F32, 2, {2, 2}, fl};
    write_st("f32.safetensors", t, 1);
    load_fails("f32.safetensors", MS_EXIT_DATA, "input_ids: dtype F32");
    t[0] = (raw_tensor){"tokens", ST_I64, 2, {2, 2}, ids};
    write_st("noids.safetensors", t, 1);
    load_fails("noids.safetensors", MS_EXIT_DATA, "no \"input_ids\"");
    t[0] = (raw_tensor){"input_ids", ST_I64, 2, {2, 2}, neg};
    write_st("neg.safetensors", t, 1);
    load_fails("neg.safetensors", MS_EXIT_DATA, "input_ids[0][1]: token id is negative");
    t[1] = (raw_tensor){"attention_mask", ST_I64, 2, {2, 2}, mask2};
    t[0] = (raw_tensor){"input_ids", ST_I64, 2, {2, 2}, ids};
    write_st("mask2.safetensors", t, 2);
    load_fails("mask2.safetensors", MS_EXIT_DATA, "attention_mask[1][0] is 2");
    t[1] = (raw_tensor){"attention_mask", ST_I64, 2, {4, 1}, zeros};
    write_st("maskshape.safetensors", t, 2);
    load_fails("maskshape.safetensors", MS_EXIT_DATA, "shape differs");
    t[1] = (raw_tensor){"attention_mask", ST_F32, 2, {2, 2}, fl};
    write_st("maskf32.safetensors", t, 2);
    load_fails("maskf32.safetensors", MS_EXIT_DATA, "attention_mask: dtype F32");
    t[1] = (raw_tensor){"attention_mask", ST_I64, 2, {2, 2}, zeros};
    write_st("allpad.safetensors", t, 2);
    load_fails("allpad.safetensors", MS_EXIT_DATA, "no real tokens");
    t[0] = (raw_tensor){"input_ids", ST_I64, 2, {0, 2}, ids};
    write_st("zero.safetensors", t, 1);
    load_fails("zero.safetensors", MS_EXIT_DATA, "no calibration samples");
    /* a negative id under padding is never read: accepted */
    int64_t negpad[4] = {1, 2, -7, 4}, m1[4] = {1, 1, 0, 1};
    t[0] = (raw_tensor){"input_ids", ST_I64, 2, {2, 2}, negpad};
    t[1] = (raw_tensor){"attention_mask", ST_I64, 2, {2, 2}, m1};
    write_st("negpad.safetensors", t, 2);
    ms_calib *c = load_ok("negpad.safetensors", 0, 0);
    assert_int_equal(c->n_real, 3);
    ms_calib_free(c);
}

static void test_vocab_check(void **state)
{
    (void)state;
    write_text("v.txt", "0 1 2\n3 9\n");
    ms_calib *c = load_ok("v.txt", 0, 0);
    ms_error err = {0};
    assert_int_equal(ms_calib_check_vocab(c, 10, &err), 0);
    assert_int_equal(ms_calib_check_vocab(c, 9, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    if (!strstr(err.msg, "line 2, token 2: id 9 is not below the vocabulary size 9"))
        fail_msg("%s", err.msg);
    /* padding ids are not checked: the text's padding is 0, make it huge */
    c->ids[1 * c->seq_len + 2] = 1000;
    assert_int_equal(c->mask[1 * c->seq_len + 2], 0);
    assert_int_equal(ms_calib_check_vocab(c, 10, &err), 0);
    ms_calib_free(c);
}

/* Where an error is: text by 1-based line and token, as an editor shows
 * them (blank lines counted, a truncated line too); safetensors by the
 * indices into input_ids, whatever rows before it were dropped. */
static void test_error_locations(void **state)
{
    (void)state;
    ms_error err = {0};
    write_text("where.txt", "1 2 3\n\n\n4 5 200\n7 300 9\n");
    ms_calib *c = load_ok("where.txt", 0, 0);
    assert_int_equal(ms_calib_check_vocab(c, 256, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    if (!strstr(err.msg, "line 5, token 2: id 300 is not below the vocabulary size 256"))
        fail_msg("%s", err.msg);
    ms_calib_free(c);
    /* CRLF, leading blanks, --seq-len cutting the line after the bad id */
    write_text("where2.txt", "\r\n  \t 0 1\r\n\r\n 5  6   7 999 8 9\r\n");
    c = load_ok("where2.txt", 0, 4);
    assert_int_equal(ms_calib_check_vocab(c, 256, &err), -1);
    if (!strstr(err.msg, "line 4, token 4: id 999 is not below"))
        fail_msg("%s", err.msg);
    ms_calib_free(c);
    write_text("where3.txt", "1 2 3\n\n\n4 5 x\n");
    load_fails("where3.txt", MS_EXIT_DATA, "line 4, token 3: 'x' is not a token id");

    /* safetensors: row 1 has no real token (dropped), the bad id is at [3][17] */
    enum { N = 4, W = 20 };
    int64_t ids[N * W], mask[N * W];
    for (int i = 0; i < N * W; i++) {
        ids[i] = i % 200;
        mask[i] = i / W != 1;
    }
    ids[3 * W + 17] = 300;
    ids[1 * W + 5] = 9999; /* under padding: never read */
    raw_tensor t[2] = {{"input_ids", ST_I64, 2, {N, W}, ids}, {"attention_mask", ST_I64, 2, {N, W}, mask}};
    write_st("where.safetensors", t, 2);
    c = load_ok("where.safetensors", 0, 0);
    assert_int_equal(c->n_samples, 3);
    assert_int_equal(c->origin[2], 3);
    assert_int_equal(ms_calib_check_vocab(c, 256, &err), -1);
    if (!strstr(err.msg, "input_ids[3][17]: id 300 is not below the vocabulary size 256"))
        fail_msg("%s", err.msg);
    ms_calib_free(c);
    /* a 1-D input_ids is indexed once */
    t[0] = (raw_tensor){"input_ids", ST_I64, 1, {W, 0}, ids + 3 * W};
    write_st("where1d.safetensors", t, 1);
    c = load_ok("where1d.safetensors", 0, 0);
    assert_int_equal(ms_calib_check_vocab(c, 256, &err), -1);
    if (!strstr(err.msg, "input_ids[17]: id 300"))
        fail_msg("%s", err.msg);
    ms_calib_free(c);
    int64_t neg[W];
    memcpy(neg, ids, sizeof neg);
    neg[6] = -1;
    t[0] = (raw_tensor){"input_ids", ST_I64, 1, {W, 0}, neg};
    write_st("neg1d.safetensors", t, 1);
    load_fails("neg1d.safetensors", MS_EXIT_DATA, "input_ids[6]: token id is negative");
}

/* A NUL, a byte order mark or any other odd byte shows as \xHH; a leading
 * UTF-8 byte order mark is skipped, a UTF-16 one named. */
static void test_odd_bytes(void **state)
{
    (void)state;
    write_bytes("nul.txt", "1 2\0 3\n", 7);
    load_fails("nul.txt", MS_EXIT_DATA, "line 1, token 2: '2\\x00' is not a token id");
    write_text("bommid.txt", "1 2\n3 \xef\xbb\xbf" "4\n");
    load_fails("bommid.txt", MS_EXIT_DATA, "line 2, token 2: '\\xef\\xbb\\xbf4'");
    write_text("quote.txt", "1 'a\\\n");
    load_fails("quote.txt", MS_EXIT_DATA, "'\\x27a\\x5c'");
    char longtok[64];
    memset(longtok, 'z', sizeof longtok - 2);
    longtok[sizeof longtok - 2] = '\n';
    longtok[sizeof longtok - 1] = 0;
    write_text("long.txt", longtok);
    load_fails("long.txt", MS_EXIT_DATA, "'zzzzzzzzzzzzzzzzzzzzzzzz...' is not");

    write_text("bom.txt", "\xef\xbb\xbf" "5 6 7\n\n8 9\n");
    ms_calib *c = load_ok("bom.txt", 0, 0);
    assert_int_equal(c->n_samples, 2);
    assert_int_equal(c->seq_len, 3);
    assert_int_equal(c->ids[0], 5);
    assert_int_equal(c->origin[1], 3);
    ms_calib_free(c);
    write_text("bomx.txt", "\xef\xbb\xbf" "5 x\n");
    load_fails("bomx.txt", MS_EXIT_DATA, "line 1, token 2: 'x'");
    write_text("bomonly.txt", "\xef\xbb\xbf\n");
    load_fails("bomonly.txt", MS_EXIT_DATA, "no calibration samples");
    write_bytes("utf16.txt", "\xff\xfe" "1\0 \0" "2\0", 8);
    load_fails("utf16.txt", MS_EXIT_DATA, "UTF-16");
}

/* The format comes from the content: a safetensors file called .bin is
 * read; a text file called .bin is text; a PyTorch checkpoint, whatever its
 * name, is not a calibration file (and not advice to convert a model). */
static void test_format_by_content(void **state)
{
    (void)state;
    int64_t ids[6] = {1, 2, 3, 4, 5, 6};
    raw_tensor t = {"input_ids", ST_I64, 2, {2, 3}, ids};
    write_st("calib.bin", &t, 1);
    ms_calib *c = load_ok("calib.bin", 0, 0);
    assert_false(c->text);
    assert_int_equal(c->n_samples, 2);
    assert_int_equal(c->n_real, 6);
    assert_memory_equal(c->ids, ids, sizeof ids);
    ms_calib_free(c);
    write_st("calib.pt", &t, 1);
    c = load_ok("calib.pt", 0, 0);
    ms_calib_free(c);
    write_text("ids.bin", "1 2\n3\n");
    c = load_ok("ids.bin", 0, 0);
    assert_true(c->text);
    assert_int_equal(c->n_real, 3);
    ms_calib_free(c);

    static const char zip[] = "PK\x03\x04\x14\0\0\0\0\0archive/data.pkl";
    static const char pickle[] = "\x80\x02\x8a\x0a" "lZ\xfc\x9c" "F\xf9 j\xa8P\x19.";
    write_bytes("model.bin", zip, sizeof zip - 1);
    load_fails("model.bin", MS_EXIT_DATA, "is a PyTorch checkpoint (a zip archive), not a calibration file");
    write_bytes("legacy.pt", pickle, sizeof pickle - 1);
    load_fails("legacy.pt", MS_EXIT_DATA, "is a PyTorch checkpoint (a pickle), not a calibration file");
    load_fails("legacy.pt", MS_EXIT_DATA, "text file");
    /* a checkpoint called .safetensors, and a damaged .safetensors, named as such */
    write_bytes("zip.safetensors", zip, sizeof zip - 1);
    load_fails("zip.safetensors", MS_EXIT_DATA, "PyTorch checkpoint (a zip archive)");
    write_bytes("short.safetensors", "\x05\0\0", 3);
    load_fails("short.safetensors", MS_EXIT_DATA, "header too small");
    write_bytes("long.safetensors", "\xff\0\0\0\0\0\0\0{}", 10);
    load_fails("long.safetensors", MS_EXIT_DATA, "invalid header length");
    write_bytes("junk.safetensors", "\x02\0\0\0\0\0\0\0{x", 10);
    load_fails("junk.safetensors", MS_EXIT_DATA, "junk.safetensors");
}

/* Left padding and --seq-len: the first seq_len positions of each row are
 * kept (input_ids[:, :N]); a row whose real tokens all lie past them is
 * counted as emptied and dropped, and a file where every row is is an
 * error that says why. max_position is the real tokens' extent, not the
 * padded width. */
enum { LEFT_N = 6, LEFT_W = 30 };

/* LEFT_N rows of LEFT_W positions, row s's lens[s] real tokens at the end. */
static void write_left_padded(const char *name, const uint64_t *lens)
{
    enum { N = LEFT_N, W = LEFT_W };
    int64_t ids[N * W];
    uint8_t mask[N * W];
    for (uint64_t s = 0; s < N; s++)
        for (uint64_t p = 0; p < W; p++) {
            mask[s * W + p] = p >= W - lens[s];
            ids[s * W + p] = mask[s * W + p] ? (int64_t)(s * 40 + p) : 0;
        }
    raw_tensor t[2] = {{"input_ids", ST_I64, 2, {N, W}, ids}, {"attention_mask", ST_BOOL, 2, {N, W}, mask}};
    write_st(name, t, 2);
}

static void test_left_padding(void **state)
{
    (void)state;
    static const uint64_t lens[LEFT_N] = {30, 12, 5, 25, 8, 10}, short_lens[LEFT_N] = {12, 5, 25, 8, 10, 3};
    write_left_padded("left.safetensors", lens);
    ms_calib *c = load_ok("left.safetensors", 0, 20);
    assert_int_equal(c->n_read, 6);
    assert_int_equal(c->n_samples, 3); /* lengths 30, 12, 25 keep some of positions 0..19 */
    assert_int_equal(c->n_emptied, 3);
    assert_int_equal(c->n_empty, 0);
    assert_int_equal(c->n_truncated, 6);
    assert_int_equal(c->n_real, 20 + 2 + 15);
    assert_int_equal(c->max_position, 20);
    assert_int_equal(c->origin[0], 0);
    assert_int_equal(c->origin[1], 1);
    assert_int_equal(c->origin[2], 3);
    for (uint64_t p = 0; p < 20; p++) {
        assert_int_equal(c->mask[1 * 20 + p], p >= 18);
        if (p >= 18)
            assert_int_equal(c->ids[1 * 20 + p], 1 * 40 + p);
        assert_int_equal(c->mask[2 * 20 + p], p >= 5);
    }
    ms_calib_free(c);
    /* the whole width: nothing emptied, nothing cut */
    c = load_ok("left.safetensors", 0, 0);
    assert_int_equal(c->n_samples, 6);
    assert_int_equal(c->n_emptied + c->n_truncated, 0);
    assert_int_equal(c->max_position, 30);
    ms_calib_free(c);
    /* every row emptied: an error naming the cause */
    ms_error err = {0};
    ms_calib_options o = {0, 5};
    write_left_padded("left-short.safetensors", short_lens);
    c = (ms_calib *)1;
    assert_int_equal(ms_calib_load(path_of("left-short.safetensors"), &o, &c, &err), -1);
    assert_null(c);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    if (!strstr(err.msg, "no real token in the first 5 positions") || !strstr(err.msg, "left padding") ||
        !strstr(err.msg, "6 sample(s)"))
        fail_msg("%s", err.msg);
    o = (ms_calib_options){2, 19}; /* rows 0 and 1: row 1's 12 tokens start at 18 */
    c = NULL;
    assert_int_equal(ms_calib_load(path_of("left.safetensors"), &o, &c, &err), 0);
    assert_int_equal(c->n_samples, 2);
    assert_int_equal(c->n_emptied, 0);
    ms_calib_free(c);
    o = (ms_calib_options){3, 18};
    c = NULL;
    assert_int_equal(ms_calib_load(path_of("left.safetensors"), &o, &c, &err), 0);
    assert_int_equal(c->n_samples, 1);
    assert_int_equal(c->n_emptied, 2);
    ms_calib_free(c);
}

/* Short samples padded to a long --seq-len: max_position is the longest
 * real extent, which is what max_position_embeddings must cover. */
static void test_max_position(void **state)
{
    (void)state;
    write_text("short.txt", "1 2 3\n4 5\n");
    ms_calib *c = load_ok("short.txt", 0, 100);
    assert_int_equal(c->seq_len, 100);
    assert_int_equal(c->max_position, 3);
    ms_calib_free(c);
    c = load_ok("short.txt", 0, 2);
    assert_int_equal(c->max_position, 2);
    ms_calib_free(c);
    enum { N = 2, W = 100 };
    int64_t ids[N * W] = {0}, mask[N * W] = {0};
    for (int p = 0; p < 60; p++)
        mask[p] = 1;
    for (int p = 10; p < 40; p++)
        mask[W + p] = 1; /* a hole at the start: positions are raw */
    raw_tensor t[2] = {{"input_ids", ST_I64, 2, {N, W}, ids}, {"attention_mask", ST_I64, 2, {N, W}, mask}};
    write_st("pad100.safetensors", t, 2);
    c = load_ok("pad100.safetensors", 0, 0);
    assert_int_equal(c->seq_len, 100);
    assert_int_equal(c->max_position, 60);
    ms_calib_free(c);
}

/* n_samples counts the samples that reach the forward pass: an all-zero
 * attention_mask row is read (n_read, and it counts for --max-samples, as
 * input_ids[:N] does) but dropped. */
static void test_empty_rows_dropped(void **state)
{
    (void)state;
    enum { N = 6, W = 4 };
    int64_t ids[N * W], mask[N * W];
    for (int i = 0; i < N * W; i++) {
        ids[i] = i;
        mask[i] = i / W != 2;
    }
    raw_tensor t[2] = {{"input_ids", ST_I64, 2, {N, W}, ids}, {"attention_mask", ST_I64, 2, {N, W}, mask}};
    write_st("gap.safetensors", t, 2);
    ms_calib *c = load_ok("gap.safetensors", 0, 0);
    assert_int_equal(c->n_read, 6);
    assert_int_equal(c->n_samples, 5);
    assert_int_equal(c->n_empty, 1);
    assert_int_equal(c->n_emptied, 0);
    assert_int_equal(c->n_real, 20);
    static const uint64_t origin[5] = {0, 1, 3, 4, 5};
    for (int s = 0; s < 5; s++) {
        assert_int_equal(c->origin[s], origin[s]);
        assert_int_equal(c->ids[s * W], (int64_t)origin[s] * W);
        assert_int_equal(c->mask[s * W + W - 1], 1);
    }
    ms_calib_free(c);
    c = load_ok("gap.safetensors", 3, 0);
    assert_int_equal(c->n_read, 3);
    assert_int_equal(c->n_samples, 2);
    ms_calib_free(c);
}

int main(void)
{
    const char *seed = getenv("MS_TEST_SEED");
    g_rng = seed ? strtoull(seed, NULL, 0) : (uint64_t)time(NULL);
    printf("test_calib_input: MS_TEST_SEED=%" PRIu64 "\n", g_rng);
    snprintf(g_dir, sizeof g_dir, "/tmp/ms-calib-test.XXXXXX");
    if (!mkdtemp(g_dir))
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_round_trip),
        cmocka_unit_test(test_safetensors_round_trip),
        cmocka_unit_test(test_rejections),
        cmocka_unit_test(test_vocab_check),
        cmocka_unit_test(test_error_locations),
        cmocka_unit_test(test_odd_bytes),
        cmocka_unit_test(test_format_by_content),
        cmocka_unit_test(test_left_padding),
        cmocka_unit_test(test_max_position),
        cmocka_unit_test(test_empty_rows_dropped),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0)
        rc = rc ? rc : 1;
    return rc;
}
