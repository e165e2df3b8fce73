/* The whole pipeline against the float64 reference: generated models (mixed
 * dtypes, sharded inputs) are merged by the mergestream binary for every
 * method, under a memory budget that forces row chunks, and every output
 * tensor must equal tests/unit/merge_reference.h's merge of the same input
 * tensors, byte for byte. The per-tensor parameters come from the planner
 * (ms_plan_build), so this checks reading, chunking, the stages, the writer
 * and the layout; the arithmetic itself is checked independently in
 * test_cpu_merge. Needs MS_BIN and MS_GEN (set by ctest); exit 77 without. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "io/model_dir.h"
#include "merge_reference.h"
#include "pipeline/merge_plan.h"
#include "pipeline_check.h"

static char g_dir[256];

/* ref_merge without the L1 sums it can report */
static void reference(const ms_tensor_params *p, const void *const *in, void *out) { ref_merge(p, in, out, NULL); }

static void check_recipe(const char *name, const char *recipe_text, const char *options)
{
    pc_check_recipe(g_dir, name, recipe_text, options, reference);
}

#define MODELS                                                                                               \
    "  - model: ./ft1\n    parameters: {weight: 0.7%s}\n"                                                    \
    "  - model: ./ft2\n    parameters: {weight: [-0.2, 0.9]%s}\n"

static void test_every_method_matches_reference(void **state)
{
    (void)state;
    static const struct {
        const char *method, *params, *top;
    } k_cases[] = {
        {"ties", ", density: 0.3", "dtype: bfloat16\n"},
        {"dare_ties", ", density: 0.4", "out_dtype: float32\nrandom_seed: 5\n"},
        {"dare_linear", ", density: 0.6", "parameters: {lambda: 1.3}\n"},
        {"task_arithmetic", "", "dtype: float16\n"},
        {"breadcrumbs", ", density: 0.7, gamma: 0.02", ""},
        {"breadcrumbs_ties", ", density: 0.5, gamma: 0.1", "dtype: float32\n"},
        {"della", ", density: 0.5, epsilon: 0.2", ""},
        {"della_linear", ", density: 0.4, epsilon: 0.1", "parameters: {normalize: true}\n"},
    };
    for (size_t c = 0; c < sizeof k_cases / sizeof k_cases[0]; c++) {
        char text[2048], models[512];
        snprintf(models, sizeof models, MODELS, k_cases[c].params, k_cases[c].params);
        snprintf(text, sizeof text, "merge_method: %s\nbase_model: ./base\nmodels:\n%s%s", k_cases[c].method, models,
                 k_cases[c].top);
        /* 30M: about 2 MiB of staging pool, so the embeddings are cut into chunks */
        check_recipe(k_cases[c].method, text, "--max-memory 30M --threads 2");
    }
    check_recipe("linear",
                 "merge_method: linear\nmodels:\n  - model: ./ft1\n    parameters: {weight: 2}\n"
                 "  - model: ./ft2\n    parameters: {weight: 0.5}\ndtype: bfloat16\n",
                 "--io pread");
}

int main(void)
{
    const char *bin = getenv("MS_BIN"), *gen = getenv("MS_GEN");
    if (!bin || !gen) {
        puts("SKIP: MS_BIN and MS_GEN not set (run through ctest)");
        return 77;
    }
    snprintf(g_dir, sizeof g_dir, "%s/ms-pipeline.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(g_dir))
        return 1;
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "'%1$s' base %2$s/base --preset small --dtype bf16 --seed 21 --shard-size 2M && "
             "'%1$s' finetune %2$s/base %2$s/ft1 --seed 22 --dtype f16 && "
             "'%1$s' finetune %2$s/base %2$s/ft2 --seed 23 --dtype f32",
             gen, g_dir);
    if (system(cmd) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_method_matches_reference),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0)
        rc = rc ? rc : 1;
    return rc;
}
