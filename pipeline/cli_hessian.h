/* The calibration commands (pipeline/cmd_hessian.c, pipeline/cmd_perplexity.c)
 * and the option handling they share. main.c dispatches "hessian" and
 * "perplexity" to the two entry points, which follow pipeline/cli.h's
 * convention: argc/argv past the subcommand name in, the exit code out. */
#ifndef MS_CLI_HESSIAN_H
#define MS_CLI_HESSIAN_H

#include <stdbool.h>
#include <stdint.h>

#include <stddef.h>

#include <cjson/cJSON.h>

#include "cpu/cpu_pool.h"
#include "io/calib_input.h"
#include "io/ms_error.h"
#include "pipeline/backend_registry.h"
#include "pipeline/llama_run.h"

int ms_cmd_hessian(int argc, char **argv);
int ms_cmd_perplexity(int argc, char **argv);

/* ============================================================ shared */

typedef enum ms_fwd_device { MS_FWD_DEVICE_AUTO, MS_FWD_DEVICE_CPU, MS_FWD_DEVICE_CUDA } ms_fwd_device;

/* The end of both commands' --help: how MODEL's BASE+ADAPTER form splits,
 * and the exit codes. */
#define MS_FWD_HELP_TAIL                                                                               \
    "BASE_DIR+ADAPTER_DIR splits at the last '+' that follows an existing path and\n"                  \
    "precedes a directory holding adapter_config.json (else at the last '+' before\n"                  \
    "such a directory; a path that exists as written is never split), so both\n"                       \
    "paths may contain '+'. The weights are base + LoRA delta in fp32, as\n"                           \
    "`mergestream merge` materialises them.\n"                                                         \
    "\n"                                                                                               \
    "Exit codes: 0 ok, 1 runtime failure, 2 usage error or unsupported model or\n"                     \
    "adapter (PiSSA, ...), 3 invalid input data (a token id beyond the vocabulary,\n"                  \
    "a malformed file, an adapter that does not fit the base).\n"

/* The options both commands take (see their --help). */
typedef struct ms_fwd_cli {
    const char *model;
    const char *calib;
    const char *out_dir;        /* hessian only */
    ms_calib_options calib_opt; /* --max-samples, --seq-len */
    uint64_t batch_size;        /* 0: auto (about 2048 tokens per batch) */
    unsigned threads;
    uint64_t max_memory;
    ms_fwd_device device;      /* --device */
    uint64_t gpu_memory_limit; /* --gpu-memory-limit; 0: no cap */
    uint64_t shard_size; /* hessian only */
    bool force;          /* hessian only */
    bool json;
} ms_fwd_cli;

/* Parses argv for command cmd ("hessian" or "perplexity"; with_output
 * enables -o/--force/--out-shard-size). Returns 0, -1 after printing help
 * (exit 0), or MS_EXIT_USAGE after printing the usage error. */
int ms_fwd_cli_parse(const char *cmd, const char *help, bool with_output, int argc, char **argv, ms_fwd_cli *o);

/* Opens the pool, then the session (need_head: perplexity; o->model may be
 * BASE_DIR+ADAPTER_DIR, ms_llama_session_open) and OpenBLAS's threads, and
 * fills the run options every command shares: batch size, activation budget
 * (--max-memory minus what one layer and the weight source hold; a warning
 * when that alone exceeds it), progress label. stats_buf: NULL for a run
 * without statistics (perplexity); else it receives the bytes of the
 * statistics' output buffer (hessian_sink.h), counted in the budget: a
 * whole layer's where the activations still fit, else 16 MiB. gpu: a GPU
 * runs the layers; then the next layer's weights are loaded meanwhile where
 * they fit too (ms_llama_run_opts.prefetch_weights). Returns 0, or -1 with
 * err set (nothing left open, *pool NULL). */
int ms_fwd_cli_setup(const ms_fwd_cli *o, const char *label, bool need_head, uint64_t *stats_buf, bool gpu,
                     ms_llama_session *s, cpu_pool **pool, ms_llama_run_opts *ro, ms_error *err);

/* --device: opens the GPU for the GEMMs (ms_gpu_gemm_open with
 * --gpu-memory-limit) unless cpu. auto without a usable GPU logs one line
 * why and leaves *gpu NULL (the CPU computes); cuda without one is an error
 * (MS_EXIT_USAGE, "--device cuda: no usable GPU: WHY"). Returns 0 (close
 * *gpu with ms_gpu_gemm_close), or -1 with err set. */
int ms_fwd_cli_gpu_open(const ms_fwd_cli *o, const char *label, ms_gpu_gemm **gpu, ms_error *err);

/* Where the run computed, for the summaries: into j (when not NULL) the
 * fields "device" ("cuda" or "cpu"), "gpu" (the device's name, or null),
 * "batches_gpu", "batches_cpu" (batch steps: one batch through one layer or
 * one lm_head slice), "gpu_fallbacks" and "gpu_disabled"; into line (n
 * bytes) the same in words. */
void ms_fwd_cli_backend_report(const ms_llama_result *r, const ms_gpu_gemm *gpu, cJSON *j, char *line, size_t n);

#endif
