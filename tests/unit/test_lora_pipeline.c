/* LoRA adapters through the whole merge, against float64: a base model plus
 * generated PEFT adapters (plain and rsLoRA) merged by the mergestream binary
 * with task_arithmetic, weight 1, fp32 output, must give base + scale * B @ A
 * for every targeted weight (within fp32 rounding of the rank-r sum) and the
 * base's exact bytes for every other tensor. The adapter's scale is computed
 * here from adapter_config.json, independently of io/peft_adapter.c. Needs
 * MS_BIN and MS_GEN (set by ctest); exit 77 without. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "io/model_dir.h"
#include "io/small_file.h"
#include "merge_reference.h"

static char g_dir[256];

static void sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    if (system(cmd) != 0)
        fail_msg("command failed: %s", cmd);
}

static double *read_f64(const ms_model *m, const char *name, uint64_t *numel)
{
    long t = ms_model_find(m, name);
    if (t < 0)
        return NULL;
    const st_tensor *ti = m->tensors[t].info;
    const st_file *f = ms_model_tensor_file(m, (size_t)t);
    uint64_t bytes = ti->end - ti->begin;
    uint8_t *raw = malloc(bytes + 1);
    assert_true(pread(f->fd, raw, bytes, (off_t)st_file_tensor_offset(f, ti)) == (ssize_t)bytes);
    double *v = malloc(ti->numel * sizeof *v + 1);
    for (uint64_t e = 0; e < ti->numel; e++)
        v[e] = ref_load(raw, ti->dtype, e);
    free(raw);
    *numel = ti->numel;
    return v;
}

static void check_adapter(const char *adapter, bool rslora)
{
    char recipe[512], out[512], base[512], ad[512];
    snprintf(base, sizeof base, "%s/base", g_dir);
    snprintf(ad, sizeof ad, "%s/%s", g_dir, adapter);
    snprintf(recipe, sizeof recipe, "%s/%s.yml", g_dir, adapter);
    snprintf(out, sizeof out, "%s/out_%s", g_dir, adapter);
    FILE *f = fopen(recipe, "w");
    fprintf(f, "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
               "  - model: ./base+./%s\n    parameters: {weight: 1.0}\nout_dtype: float32\n", adapter);
    fclose(f);
    sh("rm -rf '%s' && '%s' merge '%s' -o '%s' --quiet --max-memory 40M", out, getenv("MS_BIN"), recipe, out);

    ms_error err = {0};
    ms_model *mb = NULL, *ma = NULL, *mo = NULL;
    assert_int_equal(ms_model_open(base, &mb, &err), 0);
    assert_int_equal(ms_model_open(ad, &ma, &err), 0);
    assert_int_equal(ms_model_open(out, &mo, &err), 0);
    double r = cJSON_GetObjectItem(ma->config, "r")->valuedouble;
    double alpha = cJSON_GetObjectItem(ma->config, "lora_alpha")->valuedouble;
    double scale = rslora ? alpha / sqrt(r) : alpha / r;
    unsigned targeted = 0;
    for (size_t t = 0; t < mb->n_tensors; t++) {
        const char *name = mb->tensors[t].info->name;
        uint64_t n, nb, na = 0, nbb = 0;
        double *w = read_f64(mb, name, &nb);
        double *o = read_f64(mo, name, &n);
        assert_non_null(o);
        assert_int_equal(n, nb);
        char key[512];
        size_t len = strlen(name) - strlen(".weight");
        snprintf(key, sizeof key, "base_model.model.%.*s.lora_A.weight", (int)len, name);
        double *A = read_f64(ma, key, &na);
        snprintf(key, sizeof key, "base_model.model.%.*s.lora_B.weight", (int)len, name);
        double *B = read_f64(ma, key, &nbb);
        if (!A) {
            for (uint64_t e = 0; e < n; e++)
                assert_true((float)w[e] == (float)o[e]); /* untouched: the base, exactly */
        } else {
            targeted++;
            const st_tensor *bt = mb->tensors[t].info;
            uint64_t rows = bt->shape[0], cols = bt->shape[1], rank = na / cols;
            assert_int_equal(nbb, rows * rank);
            for (uint64_t i = 0; i < rows; i++) {
                for (uint64_t j = 0; j < cols; j++) {
                    double d = 0, mag = 0;
                    for (uint64_t k = 0; k < rank; k++) {
                        d += B[i * rank + k] * A[k * cols + j];
                        mag += fabs(B[i * rank + k] * A[k * cols + j]);
                    }
                    double want = w[i * cols + j] + scale * d;
                    double tol = 4 * 0x1p-24 * (fabs(w[i * cols + j]) + scale * mag + 1e-30) * (double)(rank + 2);
                    if (fabs(o[i * cols + j] - want) > tol)
                        fail_msg("%s %s[%llu,%llu]: %.9g, want %.9g", adapter, name, (unsigned long long)i,
                                 (unsigned long long)j, o[i * cols + j], want);
                }
            }
        }
        free(w);
        free(o);
        free(A);
        free(B);
    }
    assert_true(targeted >= 4);
    ms_model_close(mb);
    ms_model_close(ma);
    ms_model_close(mo);
}

static void test_plain_lora(void **state) { (void)state; check_adapter("plain", false); }
static void test_rslora(void **state) { (void)state; check_adapter("rs", true); }

int main(void)
{
    const char *bin = getenv("MS_BIN"), *gen = getenv("MS_GEN");
    if (!bin || !gen) {
        puts("SKIP: MS_BIN and MS_GEN not set (run through ctest)");
        return 77;
    }
    snprintf(g_dir, sizeof g_dir, "%s/ms-lora.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(g_dir))
        return 1;
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "'%1$s' base %2$s/base --preset small --dtype bf16 --seed 31 && "
             "'%1$s' lora %2$s/base %2$s/plain --seed 32 --rank 8 --alpha 16 --targets q_proj,v_proj,down_proj && "
             "'%1$s' lora %2$s/base %2$s/rs --seed 33 --rank 16 --alpha 4 --rslora --targets all-linear",
             gen, g_dir);
    if (system(cmd) != 0)
        return 1;
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_plain_lora), cmocka_unit_test(test_rslora)};
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0 && rc == 0)
        rc = 1;
    return rc;
}
