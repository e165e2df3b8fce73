/* The GPU is found and named when present; exit 77 (skipped) without one. */
#include <stdio.h>

#include "pipeline/backend_registry.h"

int main(void)
{
    const char *why = NULL;
    char name[256];
    int n = ms_backend_gpu_count(&why, name, sizeof name);
    if (n <= 0) {
        printf("SKIP: no usable GPU (%s)\n", why ? why : "?");
        return 77;
    }
    printf("%d GPU(s); device 0: %s\n", n, name);
    return name[0] ? 0 : 1;
}
