/* Reading a LoRA target's factors (A, B, DoRA magnitude) from its adapter
 * file and preparing them for cpu_lora_rows: shared by the merge's compute
 * stage and the hessian/perplexity forward pass. */
#ifndef MS_LORA_LOAD_H
#define MS_LORA_LOAD_H

#include "cpu/lora_delta.h"
#include "io/ms_error.h"
#include "io/peft_adapter.h"

/* Reads t's factors from peft and opens them. Returns 0 and *out (close with
 * cpu_lora_close), or -1 with err set naming the adapter and the tensor
 * (MS_EXIT_RUNTIME for memory, including the host_alloc fault site, or an
 * I/O error). Blocks on the reads. */
int ms_lora_load(const ms_peft *peft, const ms_lora_target *t, cpu_lora **out, ms_error *err);

#endif
