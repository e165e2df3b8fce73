/* mergestream perplexity MODEL --calib FILE: the mean next-token negative
 * log-likelihood of the calibration tokens under MODEL and its exponential,
 * with the forward pass `hessian` uses (streamed layer by layer). */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <cjson/cJSON.h>

#include "pipeline/cli.h"
#include "pipeline/cli_hessian.h"
#include "pipeline/progress.h"

static const char k_help[] =
    "usage: mergestream perplexity MODEL --calib FILE [OPTIONS]\n"
    "\n"
    "Runs the calibration tokens through MODEL (a LlamaForCausalLM, MistralForCausalLM\n"
    "or Qwen2ForCausalLM directory, or BASE_DIR+ADAPTER_DIR: that model with a PEFT\n"
    "LoRA adapter applied on the fly) layer by layer and prints the mean negative\n"
    "log-likelihood (nats) of every real token that follows a real token in its\n"
    "sample, and the perplexity exp(mean NLL). Padding never counts.\n"
    "\n"
    "  --calib FILE          token ids: a safetensors file (input_ids [n, seq], optional\n"
    "                        attention_mask) or a text file, one sample per line\n"
    "  --max-samples N       use the first N samples\n"
    "  --seq-len N           pad or truncate every sample to N positions\n"
    "  --batch-size N        samples per batch (default: about 2048 tokens)\n"
    "  --max-memory SIZE     memory for weights and activations; activations beyond it\n"
    "                        go to a temporary file in $TMPDIR (default: a quarter of RAM,\n"
    "                        at most 8G)\n"
    "  --threads N           compute threads (default: all cores)\n"
    "  --device auto|cpu|cuda where the GEMMs run (default auto: the GPU when one is\n"
    "                        usable, else the CPU); a batch the GPU has no memory for\n"
    "                        is redone on the CPU (one warning line)\n"
    "  --gpu-memory-limit SIZE  most GPU memory this run may hold (shared GPUs)\n"
    "  --json                print the result as JSON\n"
    "  --quiet               no progress or summary on stderr\n"
    "  -h, --help            this text\n"
    "\n"
    MS_FWD_HELP_TAIL;

int ms_cmd_perplexity(int argc, char **argv)
{
    ms_fwd_cli o;
    int prc = ms_fwd_cli_parse("perplexity", k_help, false, argc, argv, &o);
    if (prc != 0)
        return prc < 0 ? MS_EXIT_OK : prc;
    ms_error err = {0};
    ms_llama_session s = {0};
    cpu_pool *pool = NULL;
    ms_gpu_gemm *gpu = NULL;
    ms_llama_run_opts ro;
    ms_llama_result r;
    if (ms_fwd_cli_gpu_open(&o, "perplexity", &gpu, &err) < 0)
        goto fail;
    if (ms_fwd_cli_setup(&o, "perplexity", true, NULL, gpu != NULL, &s, &pool, &ro, &err) < 0)
        goto fail;
    ro.nll = true;
    cpu_llama_gemm seam = gpu ? ms_gpu_gemm_seam(gpu) : cpu_llama_gemm_blas();
    if (ms_llama_run(&s.src, &s.config.llama, s.calib, &ro, pool, gpu ? &seam : NULL, &r, &err) < 0)
        goto fail;
    if (ms_llama_session_check_unchanged(&s, &err) < 0)
        goto fail;
    if (r.n_predicted == 0) {
        ms_error_set(&err, MS_EXIT_DATA, o.calib, "no token has a real successor: nothing to predict");
        goto fail;
    }
    double mean = r.nll_sum / (double)r.n_predicted, ppl = exp(mean);
    if (!isfinite(mean)) { /* a log-softmax is finite for finite logits: the model holds NaN or Inf */
        ms_error_set(&err, MS_EXIT_DATA, o.model,
                     "the mean NLL is %g: the model's weights or activations hold NaN or Inf", mean);
        goto fail;
    }
    double tok_s = r.seconds > 0 ? (double)r.n_tokens / r.seconds : 0;
    char where[256];
    ms_fwd_cli_backend_report(&r, gpu, NULL, where, sizeof where);
    if (o.json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "command", "perplexity");
        cJSON_AddStringToObject(j, "model", o.model);
        cJSON_AddStringToObject(j, "architecture", ms_arch_name(s.config.arch));
        cJSON_AddNumberToObject(j, "n_samples", (double)r.n_samples);
        cJSON_AddNumberToObject(j, "n_tokens", (double)r.n_tokens);
        cJSON_AddNumberToObject(j, "n_predicted", (double)r.n_predicted);
        cJSON_AddNumberToObject(j, "mean_nll", mean);
        cJSON_AddNumberToObject(j, "perplexity", ppl);
        cJSON_AddNumberToObject(j, "seconds", r.seconds);
        cJSON_AddNumberToObject(j, "tokens_per_second", tok_s);
        ms_fwd_cli_backend_report(&r, gpu, j, where, sizeof where);
        cJSON_AddNumberToObject(j, "peak_rss_bytes", (double)ms_peak_rss_bytes());
        ms_cli_print_json(j);
    } else {
        printf("perplexity %.6f  mean NLL %.6f nats over %" PRIu64 " predicted tokens (%" PRIu64 " samples, %" PRIu64
               " tokens)\n",
               ppl, mean, r.n_predicted, r.n_samples, r.n_tokens);
    }
    ms_log_info("perplexity: %.1f s, %.0f tokens/s, %.1f GFLOP/s, peak RSS %.2f GB; %s", r.seconds, tok_s,
                r.seconds > 0 ? r.flops / r.seconds / 1e9 : 0.0, (double)ms_peak_rss_bytes() / 1e9, where);
    ms_gpu_gemm_close(gpu);
    ms_llama_session_close(&s); /* before the pool its LoRA source computes on */
    cpu_pool_close(pool);
    return MS_EXIT_OK;
fail:
    ms_gpu_gemm_close(gpu);
    ms_llama_session_close(&s); /* before the pool its LoRA source computes on */
    cpu_pool_close(pool);
    return ms_cli_fail(&err);
}
