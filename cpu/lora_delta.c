/* LoRA deltas on the CPU (cpu/lora_delta.h states the arithmetic). */
#include "cpu/lora_delta.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_kernel.h"
#include "cpu/dtype_convert.h"

#define LORA_RB 4                 /* rows of a register tile */
#define LORA_CB 64                /* columns of a register tile */
#define SUM_BLOCK 65536u          /* DESIGN.md's fixed-order reduction block */
#define ROWS_PER_TASK_MIN 16u     /* pool tasks: at least this many rows ... */
#define COLS_PER_TASK_MIN 256u    /* ... or columns (statistics pass) */

struct cpu_lora {
    ms_lora_kind kind;
    uint64_t rows, cols;
    uint64_t rank;
    float scale;
    bool transposed;
    bool dora;
    float *L;         /* [rows, rank]: B, or A^T when transposed */
    float *R;         /* [rank, cols]: A, or B^T when transposed */
    float *magnitude; /* DoRA: [rows] (plain) or [cols] (transposed) */
    /* Transposed DoRA: the column statistics. col_block / col_total are
     * written during cpu_lora_stats_rows by its pool tasks, each task its own
     * column range (no element is shared); col_factor and stats_rows are
     * written by the thread calling cpu_lora_stats_rows and only read
     * afterwards, by any thread calling cpu_lora_rows. */
    double *col_block; /* [cols] sum of v^2 over the current 65,536-row block */
    double *col_total; /* [cols] sum of the finished block sums */
    float *col_factor; /* [cols] m / sqrt(S), once every row was fed */
    uint64_t stats_rows; /* rows fed so far */
};

/* ============================================================ helpers */

static bool mul_u64(uint64_t a, uint64_t b, uint64_t *out) { return !__builtin_mul_overflow(a, b, out); }

static void *alloc_floats(uint64_t n, size_t elem)
{
    uint64_t bytes;
    if (!mul_u64(n ? n : 1, elem, &bytes) || bytes > SIZE_MAX)
        return NULL;
    return malloc((size_t)bytes);
}

/* n elements of a F16/BF16/F32 tensor, widened. */
static void widen(const void *src, st_dtype dt, float *dst, uint64_t n) { cpu_convert(src, dt, dst, ST_F32, n); }

static unsigned dtype_bytes(st_dtype dt)
{
    CPU_ASSERT(dt == ST_F32 || dt == ST_BF16 || dt == ST_F16);
    return dt == ST_F32 ? 4u : 2u;
}

uint64_t cpu_lora_host_bytes(const ms_lora_target *t)
{
    if (t->kind == MS_LORA_REPLACE)
        return 0;
    uint64_t bytes = 4 * (uint64_t)t->rank * (t->rows + t->cols);
    if (t->magnitude)
        bytes += 4 * t->n_features;
    if (t->magnitude && t->transposed)
        bytes += (8 + 8 + 4) * t->cols;
    return bytes;
}

/* ============================================================ open / close */

void cpu_lora_close(cpu_lora *l)
{
    if (!l)
        return;
    free(l->L);
    free(l->R);
    free(l->magnitude);
    free(l->col_block);
    free(l->col_total);
    free(l->col_factor);
    free(l);
}

int cpu_lora_open(const ms_lora_target *t, const void *a, const void *b, const void *magnitude, cpu_lora **out)
{
    *out = NULL;
    cpu_lora *l = calloc(1, sizeof *l);
    if (!l)
        return -ENOMEM;
    l->kind = t->kind;
    l->rows = t->rows;
    l->cols = t->cols;
    if (t->kind == MS_LORA_REPLACE) {
        *out = l;
        return 0;
    }
    CPU_ASSERT(a && b && t->A && t->B && t->rank >= 1);
    CPU_ASSERT(!t->magnitude == !magnitude);
    l->rank = t->rank;
    l->scale = t->scale;
    l->transposed = t->transposed;
    l->dora = t->magnitude != NULL;
    uint64_t r = l->rank, n_l, n_r;
    if (!mul_u64(l->rows, r, &n_l) || !mul_u64(r, l->cols, &n_r))
        goto oom;
    l->L = alloc_floats(n_l, sizeof(float));
    l->R = alloc_floats(n_r, sizeof(float));
    if (!l->L || !l->R)
        goto oom;
    if (!l->transposed) {
        /* A [rank, cols] is R, B [rows, rank] is L, both as stored */
        widen(b, t->B->dtype, l->L, n_l);
        widen(a, t->A->dtype, l->R, n_r);
    } else {
        /* A [rank, rows]: L[i][k] = A[k][i]; B [cols, rank]: R[k][j] = B[j][k] */
        const unsigned char *pa = a, *pb = b;
        unsigned ea = dtype_bytes(t->A->dtype), eb = dtype_bytes(t->B->dtype);
        float *row = alloc_floats(l->rows > r ? l->rows : r, sizeof(float)); /* one row of A, or of B */
        if (!row)
            goto oom;
        for (uint64_t k = 0; k < r; k++) {
            widen(pa + k * l->rows * ea, t->A->dtype, row, l->rows);
            for (uint64_t i = 0; i < l->rows; i++)
                l->L[i * r + k] = row[i];
        }
        for (uint64_t j = 0; j < l->cols; j++) {
            widen(pb + j * r * eb, t->B->dtype, row, r);
            for (uint64_t k = 0; k < r; k++)
                l->R[k * l->cols + j] = row[k];
        }
        free(row);
    }
    if (l->dora) {
        uint64_t nf = l->transposed ? l->cols : l->rows;
        CPU_ASSERT(t->magnitude->numel == nf);
        if (!(l->magnitude = alloc_floats(nf, sizeof(float))))
            goto oom;
        widen(magnitude, t->magnitude->dtype, l->magnitude, nf);
        if (l->transposed) {
            l->col_block = calloc(l->cols ? l->cols : 1, sizeof *l->col_block);
            l->col_total = calloc(l->cols ? l->cols : 1, sizeof *l->col_total);
            l->col_factor = alloc_floats(l->cols, sizeof(float));
            if (!l->col_block || !l->col_total || !l->col_factor)
                goto oom;
        }
    }
    *out = l;
    return 0;
oom:
    cpu_lora_close(l);
    return -ENOMEM;
}

bool cpu_lora_needs_stats(const cpu_lora *l) { return l->dora && l->transposed; }

/* ============================================================ the kernel */

/* out[ii][jj] += scale * sum_k L[ii][k] * R[k][jj] for a full LORA_RB x
 * LORA_CB tile: L points at the tile's first row (stride rank), R and out at
 * its first column (strides cols). */
CPU_CLONES static void tile_add_full(const float *restrict L, uint64_t rank, const float *restrict R, uint64_t cols,
                                      float scale, float *restrict out)
{
    float acc[LORA_RB][LORA_CB];
    for (unsigned ii = 0; ii < LORA_RB; ii++) {
        const float l0 = L[ii * rank];
        for (unsigned jj = 0; jj < LORA_CB; jj++)
            acc[ii][jj] = l0 * R[jj];
    }
    for (uint64_t k = 1; k < rank; k++) {
        const float *Rk = R + k * cols;
        for (unsigned ii = 0; ii < LORA_RB; ii++) {
            const float lk = L[ii * rank + k];
            for (unsigned jj = 0; jj < LORA_CB; jj++)
                acc[ii][jj] = acc[ii][jj] + lk * Rk[jj];
        }
    }
    for (unsigned ii = 0; ii < LORA_RB; ii++)
        for (unsigned jj = 0; jj < LORA_CB; jj++)
            out[ii * cols + jj] = out[ii * cols + jj] + scale * acc[ii][jj];
}

/* The same operations for a partial tile (nr <= LORA_RB rows, nc <= LORA_CB columns). */
static void tile_add_edge(const float *L, uint64_t rank, const float *R, uint64_t cols, float scale, float *out,
                          unsigned nr, unsigned nc)
{
    for (unsigned ii = 0; ii < nr; ii++) {
        for (unsigned jj = 0; jj < nc; jj++) {
            float acc = L[ii * rank] * R[jj];
            for (uint64_t k = 1; k < rank; k++)
                acc = acc + L[ii * rank + k] * R[k * cols + jj];
            out[ii * cols + jj] = out[ii * cols + jj] + scale * acc;
        }
    }
}

/* out[0..n_rows) (rows row0...) += the scaled delta. */
static void add_delta(const cpu_lora *l, uint64_t row0, uint64_t n_rows, float *out)
{
    const uint64_t r = l->rank, cols = l->cols;
    for (uint64_t i = 0; i < n_rows; i += LORA_RB) {
        unsigned nr = n_rows - i < LORA_RB ? (unsigned)(n_rows - i) : LORA_RB;
        const float *L = l->L + (row0 + i) * r;
        for (uint64_t j = 0; j < cols; j += LORA_CB) {
            unsigned nc = cols - j < LORA_CB ? (unsigned)(cols - j) : LORA_CB;
            float *o = out + i * cols + j;
            if (nr == LORA_RB && nc == LORA_CB)
                tile_add_full(L, r, l->R + j, cols, l->scale, o);
            else
                tile_add_edge(L, r, l->R + j, cols, l->scale, o, nr, nc);
        }
    }
}

/* sum of v[j]^2 in fp64, in DESIGN.md's fixed block order */
static double row_sum_squares(const float *v, uint64_t n)
{
    double total = 0.0;
    for (uint64_t b0 = 0; b0 < n; b0 += SUM_BLOCK) {
        uint64_t b1 = n - b0 < SUM_BLOCK ? n : b0 + SUM_BLOCK;
        double s = 0.0;
        for (uint64_t j = b0; j < b1; j++)
            s = s + (double)v[j] * (double)v[j];
        total = total + s;
    }
    return total;
}

static float dora_factor(float magnitude, double sum_squares)
{
    return (float)((double)magnitude / sqrt(sum_squares));
}

/* Rows [row0, row0 + n) into out: widen the base, add the delta, apply DoRA. */
static void rows_compute(const cpu_lora *l, const unsigned char *base, st_dtype base_dtype, uint64_t row0, uint64_t n,
                         float *out)
{
    const uint64_t cols = l->cols;
    widen(base, base_dtype, out, n * cols);
    if (l->kind == MS_LORA_REPLACE)
        return;
    add_delta(l, row0, n, out);
    if (!l->dora)
        return;
    if (!l->transposed) {
        for (uint64_t i = 0; i < n; i++) {
            float *v = out + i * cols;
            float f = dora_factor(l->magnitude[row0 + i], row_sum_squares(v, cols));
            for (uint64_t j = 0; j < cols; j++)
                v[j] = f * v[j];
        }
    } else {
        for (uint64_t i = 0; i < n; i++) {
            float *v = out + i * cols;
            for (uint64_t j = 0; j < cols; j++)
                v[j] = l->col_factor[j] * v[j];
        }
    }
}

/* ============================================================ rows */

typedef struct rows_job {
    const cpu_lora *l;
    const unsigned char *base;
    st_dtype base_dtype;
    unsigned base_elem;
    uint64_t row0, n_rows, rows_per_task;
    float *out;
} rows_job;

static void rows_task(void *ctx, unsigned task, unsigned worker)
{
    (void)worker;
    const rows_job *j = ctx;
    uint64_t i0 = (uint64_t)task * j->rows_per_task;
    uint64_t n = j->n_rows - i0 < j->rows_per_task ? j->n_rows - i0 : j->rows_per_task;
    rows_compute(j->l, j->base + i0 * j->l->cols * j->base_elem, j->base_dtype, j->row0 + i0, n,
                 j->out + i0 * j->l->cols);
}

/* Tasks of whole multiples of `unit` items, about 4 per thread. */
static uint64_t items_per_task(uint64_t n, unsigned threads, uint64_t min_items, uint64_t unit)
{
    uint64_t per = (n + 4 * (uint64_t)threads - 1) / (4 * (uint64_t)threads);
    if (per < min_items)
        per = min_items;
    return (per + unit - 1) / unit * unit;
}

void cpu_lora_rows(const cpu_lora *l, const void *base_rows, st_dtype base_dtype, uint64_t row0, uint64_t n_rows,
                   float *out, cpu_pool *pool)
{
    CPU_ASSERT(row0 <= l->rows && n_rows <= l->rows - row0);
    CPU_ASSERT(!cpu_lora_needs_stats(l) || l->stats_rows == l->rows);
    if (n_rows == 0)
        return;
    unsigned threads = pool ? cpu_pool_size(pool) : 1;
    rows_job j = {l, base_rows, base_dtype, dtype_bytes(base_dtype), row0, n_rows, 0, out};
    j.rows_per_task = items_per_task(n_rows, threads, ROWS_PER_TASK_MIN, LORA_RB);
    uint64_t n_tasks = (n_rows + j.rows_per_task - 1) / j.rows_per_task;
    if (!pool || n_tasks == 1) {
        rows_compute(l, base_rows, base_dtype, row0, n_rows, out);
        return;
    }
    CPU_ASSERT(n_tasks <= UINT32_MAX);
    cpu_pool_run(pool, (unsigned)n_tasks, rows_task, &j);
}

/* ============================================================ statistics */

typedef struct stats_job {
    cpu_lora *l;
    const unsigned char *base;
    st_dtype base_dtype;
    unsigned base_elem;
    uint64_t row0, n_rows, cols_per_task;
} stats_job;

/* Columns [c0, c1) of every row of the chunk, rows in order: v is computed a
 * LORA_RB-row tile at a time (the same operations as cpu_lora_rows), then its
 * squares join each column's running block sum in row order. */
static void stats_cols(const stats_job *s, uint64_t c0, uint64_t c1)
{
    cpu_lora *l = s->l;
    const uint64_t cols = l->cols, r = l->rank;
    float v[LORA_RB * LORA_CB];
    for (uint64_t i = 0; i < s->n_rows; i += LORA_RB) {
        unsigned nr = s->n_rows - i < LORA_RB ? (unsigned)(s->n_rows - i) : LORA_RB;
        for (uint64_t j = c0; j < c1; j += LORA_CB) {
            unsigned nc = c1 - j < LORA_CB ? (unsigned)(c1 - j) : LORA_CB;
            /* the tile's base values, with the tile's own row stride (nc) */
            for (unsigned ii = 0; ii < nr; ii++)
                widen(s->base + ((i + ii) * cols + j) * s->base_elem, s->base_dtype, v + ii * nc, nc);
            const float *L = l->L + (s->row0 + i) * r;
            for (unsigned ii = 0; ii < nr; ii++) {
                float acc[LORA_CB];
                for (unsigned jj = 0; jj < nc; jj++)
                    acc[jj] = L[ii * r] * l->R[j + jj];
                for (uint64_t k = 1; k < r; k++)
                    for (unsigned jj = 0; jj < nc; jj++)
                        acc[jj] = acc[jj] + L[ii * r + k] * l->R[k * cols + j + jj];
                for (unsigned jj = 0; jj < nc; jj++)
                    v[ii * nc + jj] = v[ii * nc + jj] + l->scale * acc[jj];
            }
            for (unsigned ii = 0; ii < nr; ii++) {
                uint64_t row = s->row0 + i + ii;
                bool fold = row > 0 && row % SUM_BLOCK == 0;
                for (unsigned jj = 0; jj < nc; jj++) {
                    if (fold) {
                        l->col_total[j + jj] = l->col_total[j + jj] + l->col_block[j + jj];
                        l->col_block[j + jj] = 0.0;
                    }
                    double x = (double)v[ii * nc + jj];
                    l->col_block[j + jj] = l->col_block[j + jj] + x * x;
                }
            }
        }
    }
}

static void stats_task(void *ctx, unsigned task, unsigned worker)
{
    (void)worker;
    const stats_job *s = ctx;
    uint64_t c0 = (uint64_t)task * s->cols_per_task;
    uint64_t c1 = s->l->cols - c0 < s->cols_per_task ? s->l->cols : c0 + s->cols_per_task;
    stats_cols(s, c0, c1);
}

void cpu_lora_stats_rows(cpu_lora *l, const void *base_rows, st_dtype base_dtype, uint64_t row0, uint64_t n_rows,
                         cpu_pool *pool)
{
    CPU_ASSERT(cpu_lora_needs_stats(l));
    CPU_ASSERT(row0 == l->stats_rows && n_rows <= l->rows - row0);
    unsigned threads = pool ? cpu_pool_size(pool) : 1;
    stats_job s = {l, base_rows, base_dtype, dtype_bytes(base_dtype), row0, n_rows, 0};
    s.cols_per_task = items_per_task(l->cols, threads, COLS_PER_TASK_MIN, LORA_CB);
    uint64_t n_tasks = (l->cols + s.cols_per_task - 1) / s.cols_per_task;
    if (n_rows > 0) {
        if (!pool || n_tasks <= 1)
            stats_cols(&s, 0, l->cols);
        else
            cpu_pool_run(pool, (unsigned)n_tasks, stats_task, &s);
    }
    l->stats_rows += n_rows;
    if (l->stats_rows == l->rows) {
        for (uint64_t j = 0; j < l->cols; j++)
            l->col_factor[j] = dora_factor(l->magnitude[j], l->col_total[j] + l->col_block[j]);
    }
}
