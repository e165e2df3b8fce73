#include "pipeline/lora_load.h"

#include <errno.h>
#include <stdlib.h>

#include "io/ms_fault.h"

int ms_lora_load(const ms_peft *peft, const ms_lora_target *t, cpu_lora **out, ms_error *err)
{
    *out = NULL;
    const st_tensor *parts[3] = {t->A, t->B, t->magnitude};
    void *buf[3] = {NULL, NULL, NULL};
    int rc = -1;
    for (int k = 0; k < 3; k++) {
        if (!parts[k])
            continue;
        if (ms_fault_hit(MS_FAULT_HOST_ALLOC) || !(buf[k] = malloc((size_t)st_tensor_nbytes(parts[k]) + 1))) {
            ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, ms_peft_path(peft), "cannot allocate the LoRA factors of %s",
                           t->base_name);
            goto done;
        }
        if (ms_peft_read_tensor(peft, parts[k], buf[k], err) != 0)
            goto done;
    }
    if (ms_fault_hit(MS_FAULT_HOST_ALLOC) || cpu_lora_open(t, buf[0], buf[1], buf[2], out) != 0) {
        *out = NULL;
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, ms_peft_path(peft), "cannot allocate the LoRA factors of %s",
                       t->base_name);
        goto done;
    }
    rc = 0;
done:
    for (int k = 0; k < 3; k++)
        free(buf[k]);
    return rc;
}
