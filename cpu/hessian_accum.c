#include "cpu/hessian_accum.h"

#include <cblas.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_kernel.h"

struct cpu_hessian {
    uint64_t dim;
    uint64_t flush_rows;
    float *h32;      /* dim x dim, upper triangle: the rows since the last flush */
    double *h64;     /* dim x dim, upper triangle: flushed blocks; NULL until the first flush */
    /* false: the matrix is zero whatever its memory holds. A reset only
     * clears these, so a layer's statistics cost no pass over the memory
     * before they start: h32 is zeroed when the first rows come, and the
     * first flush or sum into h64 assigns instead of adding. */
    bool h32_live, h64_live;
    uint64_t rows;   /* all rows added */
    uint64_t block;  /* rows in h32 */
    /* where h64 comes from (cpu_hessian_set_fp64_alloc); h64_alloced: it did */
    void *(*alloc)(void *ctx, uint64_t bytes);
    void (*alloc_free)(void *ctx, void *p);
    void *alloc_ctx;
    bool h64_alloced;
};

int cpu_gram_blas(void *ctx, const float *x, uint64_t n_rows, uint64_t dim, uint64_t ldx, float *c)
{
    (void)ctx;
    CPU_ASSERT(dim <= INT32_MAX && n_rows <= INT32_MAX && ldx <= INT32_MAX && ldx >= dim);
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, (blasint)dim, (blasint)n_rows, 1.0f, x, (blasint)ldx, 1.0f, c,
                (blasint)dim);
    return 0;
}

uint64_t cpu_hessian_host_bytes(uint64_t dim, bool with_fp64)
{
    return dim * dim * (with_fp64 ? 12u : 4u);
}

static void *hessian_alloc(uint64_t bytes) { return calloc(1, (size_t)bytes); }

int cpu_hessian_open(uint64_t dim, uint64_t flush_rows, cpu_hessian **out)
{
    *out = NULL;
    CPU_ASSERT(dim > 0);
    if (dim > (1u << 20) || dim * dim > SIZE_MAX / 8)
        return -EOVERFLOW;
    cpu_hessian *h = calloc(1, sizeof *h);
    if (!h)
        return -ENOMEM;
    h->dim = dim;
    h->flush_rows = flush_rows ? flush_rows : CPU_HESSIAN_FLUSH_ROWS;
    h->h32 = hessian_alloc(dim * dim * sizeof(float));
    if (!h->h32) {
        free(h);
        return -ENOMEM;
    }
    h->h32_live = true; /* calloc's zeros: the first rows need no clearing pass */
    *out = h;
    return 0;
}

void cpu_hessian_close(cpu_hessian *h)
{
    if (!h)
        return;
    free(h->h32);
    if (h->h64_alloced)
        h->alloc_free(h->alloc_ctx, h->h64);
    else
        free(h->h64);
    free(h);
}

void cpu_hessian_set_fp64_alloc(cpu_hessian *h, void *(*alloc)(void *ctx, uint64_t bytes),
                                void (*free_fn)(void *ctx, void *p), void *ctx)
{
    CPU_ASSERT(!h->h64 && alloc && free_fn);
    h->alloc = alloc;
    h->alloc_free = free_fn;
    h->alloc_ctx = ctx;
}

void cpu_hessian_reset(cpu_hessian *h)
{
    h->h32_live = h->h64_live = false;
    h->rows = h->block = 0;
}

/* Its contents do not matter: h64_live is false until the first flush or
 * sum assigns all of it that is read. */
static int hessian_alloc_fp64(cpu_hessian *h)
{
    if (h->h64)
        return 0;
    uint64_t bytes = h->dim * h->dim * sizeof(double);
    if (h->alloc && (h->h64 = h->alloc(h->alloc_ctx, bytes)) != NULL) {
        h->h64_alloced = true;
        return 0;
    }
    h->h64 = hessian_alloc(bytes);
    return h->h64 ? 0 : -ENOMEM;
}

int cpu_hessian_reserve(cpu_hessian *h, uint64_t more_rows)
{
    /* A flush happens before a row is added to a full block. */
    bool flushes = more_rows > 0 && (h->block == h->flush_rows || more_rows > h->flush_rows - h->block);
    return flushes ? hessian_alloc_fp64(h) : 0;
}

/* dst[j] += src[j] for j in [j0, d), into a zero matrix (live false) as
 * 0.0 + src[j]: the same value an add to a zeroed matrix gave. */
static void add_row_f32(double *dst, const float *src, uint64_t j0, uint64_t d, bool live)
{
    if (live)
        for (uint64_t j = j0; j < d; j++)
            dst[j] += (double)src[j];
    else
        for (uint64_t j = j0; j < d; j++)
            dst[j] = 0.0 + (double)src[j];
}

/* h64 += h32 (upper triangle), h32 = 0. */
static int hessian_flush(cpu_hessian *h)
{
    CPU_ASSERT(h->h32_live);
    int rc = hessian_alloc_fp64(h);
    if (rc < 0)
        return rc;
    uint64_t d = h->dim;
    for (uint64_t i = 0; i < d; i++) {
        float *src = h->h32 + i * d;
        add_row_f32(h->h64 + i * d, src, i, d, h->h64_live);
        memset(src + i, 0, (size_t)(d - i) * sizeof *src);
    }
    h->h64_live = true;
    h->block = 0;
    return 0;
}

int cpu_hessian_add(cpu_hessian *h, const float *x, uint64_t n_rows, uint64_t ldx, cpu_gram_fn gram, void *gram_ctx)
{
    CPU_ASSERT(ldx >= h->dim);
    while (n_rows > 0) {
        if (h->block == h->flush_rows) {
            int rc = hessian_flush(h);
            if (rc < 0)
                return rc;
        }
        uint64_t take = h->flush_rows - h->block;
        if (take > n_rows)
            take = n_rows;
        if (!h->h32_live) { /* the Gram function adds to what is there */
            memset(h->h32, 0, (size_t)(h->dim * h->dim) * sizeof *h->h32);
            h->h32_live = true;
        }
        int grc = gram(gram_ctx, x, take, h->dim, ldx, h->h32);
        if (grc < 0)
            return grc;
        h->block += take;
        h->rows += take;
        x += take * ldx;
        n_rows -= take;
    }
    return 0;
}

int cpu_hessian_add_sum(cpu_hessian *h, uint64_t rows, cpu_sum_rows_fn get, void *ctx)
{
    if (rows == 0)
        return 0;
    if (!h->h64_live) { /* nothing to add to: the sum lands in place, in one call */
        if (hessian_alloc_fp64(h) < 0)
            return -ENOMEM;
        h->h64_live = true; /* from here a failure leaves the matrix unusable */
        int rc = get(ctx, 0, h->dim, h->h64);
        if (rc < 0)
            return rc;
        h->rows += rows;
        return 0;
    }
    uint64_t d = h->dim, step = ((uint64_t)8 << 20) / (d * sizeof(double));
    step = step < 1 ? 1 : step > d ? d : step;
    double *buf = malloc((size_t)(step * d) * sizeof *buf);
    if (!buf || hessian_alloc_fp64(h) < 0) {
        free(buf);
        return -ENOMEM;
    }
    for (uint64_t r0 = 0; r0 < d; r0 += step) {
        uint64_t n = d - r0 < step ? d - r0 : step;
        int rc = get(ctx, r0, n, buf);
        if (rc < 0) {
            free(buf);
            return rc;
        }
        for (uint64_t i = r0; i < r0 + n; i++) {
            double *dst = h->h64 + i * d;
            const double *src = buf + (i - r0) * d;
            for (uint64_t j = i; j < d; j++)
                dst[j] += src[j];
        }
    }
    free(buf);
    h->rows += rows;
    return 0;
}

uint64_t cpu_hessian_rows(const cpu_hessian *h) { return h->rows; }
uint64_t cpu_hessian_dim(const cpu_hessian *h) { return h->dim; }

/* Element k (upper triangle) of the sum in fp64: the fp64 matrix plus the
 * fp32 block, a matrix that is not live counting as zero (h32 and h64 are
 * NULL then). The same expression as when both were kept zeroed. */
static inline double hessian_at(const double *h64, const float *h32, uint64_t k)
{
    double b = h32 ? (double)h32[k] : 0.0;
    return h64 ? h64[k] + b : b;
}

void cpu_hessian_rows_out(const cpu_hessian *h, double scale, uint64_t row0, uint64_t n_rows, float *out)
{
    uint64_t d = h->dim;
    CPU_ASSERT(row0 <= d && n_rows <= d - row0);
    const double *h64 = h->h64_live ? h->h64 : NULL;
    const float *h32 = h->h32_live ? h->h32 : NULL;
    /* On and above the diagonal: row i of the upper triangle, contiguous. */
    for (uint64_t r = 0; r < n_rows; r++) {
        uint64_t i = row0 + r;
        for (uint64_t j = i; j < d; j++)
            out[r * d + j] = (float)(scale * hessian_at(h64, h32, i * d + j));
    }
    /* Below: element (i, j), j < i, is the upper triangle's (j, i): a
     * transpose, done in TILE x TILE tiles through a local copy so that the
     * reads run along rows of the upper triangle and the writes along output
     * rows. Column by column instead, every store lands d * 4 bytes after the
     * last: with d a power of two all of them fall in one cache set, and the
     * stores thrashed (5x slower at d = 8192). */
    enum { TILE = 16 };
    double tile[TILE][TILE];
    uint64_t last = row0 + n_rows;
    for (uint64_t jb = 0; jb + 1 < last; jb += TILE) {
        uint64_t je = jb + TILE < last - 1 ? jb + TILE : last - 1; /* j < i < last */
        for (uint64_t ib = row0 > jb + 1 ? row0 : jb + 1; ib < last; ib += TILE) {
            uint64_t ie = ib + TILE < last ? ib + TILE : last;
            for (uint64_t j = jb; j < je; j++)
                for (uint64_t i = ib > j + 1 ? ib : j + 1; i < ie; i++)
                    tile[i - ib][j - jb] = scale * hessian_at(h64, h32, j * d + i);
            for (uint64_t i = ib; i < ie; i++) {
                uint64_t j_end = je < i ? je : i;
                for (uint64_t j = jb; j < j_end; j++)
                    out[(i - row0) * d + j] = (float)tile[i - ib][j - jb];
            }
        }
    }
}
