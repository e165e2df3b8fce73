/* The whole pipeline against the float64 reference for the interpolation
 * and model-soup methods: generated models (mixed dtypes, sharded inputs)
 * are merged by the mergestream binary with each method's recipe, under a
 * memory budget that forces row chunks, and every output tensor must equal
 * tests/unit/merge_reference_interp.h's merge of the same input tensors,
 * byte for byte. The per-tensor parameters come from the planner
 * (ms_plan_build), so this checks the recipe resolution (t gradients and
 * filters, optional bases, defaults), reading, chunking, the stages and the
 * writer; the arithmetic itself is checked in test_cpu_merge_interp. Needs
 * MS_BIN and MS_GEN (set by ctest); exit 77 without. */
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
#include "merge_reference_interp.h"
#include "pipeline/merge_plan.h"
#include "pipeline_check.h"

static char g_dir[256];

static void check_recipe(const char *name, const char *recipe_text, const char *options)
{
    pc_check_recipe(g_dir, name, recipe_text, options, refi_merge);
}

static void test_every_method_matches_reference(void **state)
{
    (void)state;
    /* the options: whole tensors on 1 thread with pread, or a budget that
     * cuts the embeddings into row chunks on 2 threads (the smallest each
     * method's scratch allows; tests/e2e/merge_methods.sh checks that every
     * method does chunk) */
    static const char *const k_whole = "--threads 1 --io pread", *const k_chunk = "--max-memory 30M --threads 2";
    static const struct {
        const char *name, *text, *options;
    } k_cases[] = {
        {"slerp", "merge_method: slerp\nbase_model: ./base\nmodels:\n  - model: ./base\n  - model: ./ft1\n"
                  "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                  "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: bfloat16\n", k_chunk},
        {"nuslerp", "merge_method: nuslerp\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 0.3}\n"
                    "  - model: ./ft2\n    parameters: {weight: [1, 0.2]}\n", k_whole},
        {"nuslerp_rows", "merge_method: nuslerp\nmodels:\n  - model: ./ft1\n    parameters: {weight: 1}\n"
                         "  - model: ./ft2\n    parameters: {weight: 2}\nparameters: {nuslerp_flatten: false}\n", k_chunk},
        {"nuslerp_cols", "merge_method: nuslerp\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 1}\n"
                         "  - model: ./ft2\n    parameters: {weight: 1}\n"
                         "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\nout_dtype: float32\n", k_chunk},
        {"multislerp", "merge_method: multislerp\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 1}\n"
                       "  - model: ./ft2\n    parameters: {weight: 0.5}\n", k_whole},
        {"multislerp_nobase", "merge_method: multislerp\nmodels:\n  - model: ./ft1\n  - model: ./ft2\n"
                              "parameters: {weight: 1, normalize_weights: false}\n", k_chunk},
        {"karcher", "merge_method: karcher\nbase_model: ./base\nmodels:\n  - model: ./ft1\n  - model: ./ft2\n"
                    "parameters: {max_iter: 20}\ndtype: float16\n", k_chunk},
        {"model_stock", "merge_method: model_stock\nbase_model: ./base\nmodels:\n  - model: ./ft1\n  - model: ./ft2\n", k_whole},
        {"model_stock_fw", "merge_method: model_stock\nbase_model: ./base\nmodels:\n  - model: ./ft1\n  - model: ./ft2\n"
                           "parameters: {filter_wise: true}\ndtype: bfloat16\n", k_chunk},
        {"nearswap", "merge_method: nearswap\nbase_model: ./base\nmodels:\n  - model: ./ft2\nparameters: {t: [0.0001, 0.01]}\n", k_chunk},
        {"sce", "merge_method: sce\nbase_model: ./base\nmodels:\n  - model: ./ft1\n  - model: ./ft2\n"
                "parameters: {select_topk: 0.4}\n", k_chunk},
        {"ram", "merge_method: ram\nbase_model: ./base\nmodels:\n  - model: ./ft1\n  - model: ./ft2\n", k_whole},
        {"ramplus_tl", "merge_method: ramplus_tl\nbase_model: ./base\nmodels:\n  - model: ./ft1\n  - model: ./ft2\n"
                       "    parameters: {epsilon: 0.0001}\nparameters: {r: 0.3, alpha: 0.5}\n", k_chunk},
        {"arcee_fusion", "merge_method: arcee_fusion\nbase_model: ./base\nmodels:\n  - model: ./ft1\n", "--max-memory 32M --threads 2"},
    };
    for (size_t c = 0; c < sizeof k_cases / sizeof k_cases[0]; c++)
        check_recipe(k_cases[c].name, k_cases[c].text, k_cases[c].options);
}

int main(void)
{
    const char *bin = getenv("MS_BIN"), *gen = getenv("MS_GEN");
    if (!bin || !gen) {
        puts("SKIP: MS_BIN and MS_GEN not set (run through ctest)");
        return 77;
    }
    snprintf(g_dir, sizeof g_dir, "%s/ms-pipeline-interp.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(g_dir))
        return 1;
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "'%1$s' base %2$s/base --preset small --dtype bf16 --seed 21 --shard-size 2M && "
             "'%1$s' finetune %2$s/base %2$s/ft1 --seed 22 --dtype f16 && "
             "'%1$s' finetune %2$s/base %2$s/ft2 --seed 23 --dtype f32 --touched-fraction 0.3",
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
