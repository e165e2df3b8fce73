#include "cpu/dtype_convert.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_kernel.h"
#include "pipeline/merge_math.h"

#define CONVERT_TILE 2048u

static void convert_fail(st_dtype in_dt, st_dtype out_dt)
{
    fprintf(stderr, "mergestream: internal error at %s:%d: cpu_convert from dtype %d to %d\n", __FILE__, __LINE__,
            (int)in_dt, (int)out_dt);
    abort();
}

static int convert_size(st_dtype dt)
{
    return dt == ST_F32 ? 4 : dt == ST_F16 || dt == ST_BF16 ? 2 : 0;
}

static void convert_narrow(const float *src, unsigned char *dst, st_dtype dt, size_t n)
{
    switch (dt) {
    case ST_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case ST_BF16:
        for (size_t j = 0; j < n; j++) {
            uint16_t h = ms_f32_to_bf16(src[j]);
            memcpy(dst + 2 * j, &h, 2);
        }
        break;
    default: /* ST_F16 */
        for (size_t j = 0; j < n; j++) {
            uint16_t h = ms_f32_to_f16(src[j]);
            memcpy(dst + 2 * j, &h, 2);
        }
        break;
    }
}

void cpu_convert(const void *in, st_dtype in_dt, void *out, st_dtype out_dt, uint64_t n)
{
    int in_size = convert_size(in_dt), out_size = convert_size(out_dt);
    if (!in_size || !out_size)
        convert_fail(in_dt, out_dt);
    if (in_dt == out_dt) {
        memcpy(out, in, (size_t)(n * (uint64_t)in_size));
        return;
    }
    const unsigned char *src = in;
    unsigned char *dst = out;
    float tile[CONVERT_TILE];
    for (uint64_t done = 0; done < n;) {
        size_t m = n - done < CONVERT_TILE ? (size_t)(n - done) : CONVERT_TILE;
        cpu_widen(tile, src + done * (uint64_t)in_size, in_dt, m);
        convert_narrow(tile, dst + done * (uint64_t)out_size, out_dt, m);
        done += m;
    }
}

/* Counts in blocks into 32-bit lanes, which vectorise 8 or 16 wide, instead
 * of one 64-bit sum. */
#define NONFINITE_BLOCK 4096u

CPU_CLONES static uint64_t count_exp_all_ones16(const uint16_t *v, uint64_t n, uint16_t exp_mask)
{
    uint64_t count = 0;
    for (uint64_t i = 0; i < n; i += NONFINITE_BLOCK) {
        uint64_t m = n - i < NONFINITE_BLOCK ? n - i : NONFINITE_BLOCK;
        uint32_t block = 0;
        for (uint64_t j = 0; j < m; j++)
            block += (v[i + j] & exp_mask) == exp_mask;
        count += block;
    }
    return count;
}

CPU_CLONES static uint64_t count_exp_all_ones32(const uint32_t *v, uint64_t n)
{
    uint64_t count = 0;
    for (uint64_t i = 0; i < n; i += NONFINITE_BLOCK) {
        uint64_t m = n - i < NONFINITE_BLOCK ? n - i : NONFINITE_BLOCK;
        uint32_t block = 0;
        for (uint64_t j = 0; j < m; j++)
            block += (v[i + j] & 0x7f800000u) == 0x7f800000u;
        count += block;
    }
    return count;
}

uint64_t cpu_count_nonfinite(const void *buf, st_dtype dtype, uint64_t n)
{
    switch (dtype) {
    case ST_F32:
        return count_exp_all_ones32(buf, n);
    case ST_BF16:
        return count_exp_all_ones16(buf, n, 0x7f80u);
    case ST_F16:
        return count_exp_all_ones16(buf, n, 0x7c00u);
    default:
        return 0;
    }
}
