/* Test tool: are two F32 safetensors files equal within a tolerance?
 *
 *   st_close A B [--rel R] [--data-only]
 *
 * Every tensor of A must be in B with the same dtype (F32) and shape, and
 * every element within R (default 1e-4) times the largest |value| of A's
 * tensor. Without --data-only the two files' headers (names, shapes,
 * offsets, metadata) must be byte-identical too. Prints the worst
 * |diff| / tolerance and where it is; exits 0 when every element is within,
 * 1 when not, 2 on bad usage or unreadable files. It replaces shell loops
 * over `od` output that took seconds per comparison (tests/gpu). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/st_format.h"

/* The whole of f's header text (the N bytes after the length) into a
 * malloc'd buffer; NULL on failure. */
static char *read_header(const st_file *f)
{
    uint64_t n = f->data_start - 8;
    char *buf = malloc(n ? n : 1);
    if (buf && pread(f->fd, buf, n, 8) != (ssize_t)n) {
        free(buf);
        return NULL;
    }
    return buf;
}

static float *read_tensor(const st_file *f, const st_tensor *t)
{
    uint64_t bytes = st_tensor_nbytes(t);
    float *v = malloc(bytes ? bytes : 1);
    if (v && bytes && pread(f->fd, v, bytes, (off_t)st_file_tensor_offset(f, t)) != (ssize_t)bytes) {
        free(v);
        return NULL;
    }
    return v;
}

typedef struct worst {
    double ratio;     /* the largest |diff| / tolerance so far */
    const char *name; /* where it was */
    uint64_t index;
    float a, b;
    uint64_t n_out;   /* elements beyond the tolerance */
} worst;

/* Compares tensor ta of fa with tb of fb. Returns 0, or -1 (message printed)
 * when they cannot be compared. */
static int compare_tensor(const st_file *fa, const st_tensor *ta, const st_file *fb, const st_tensor *tb, double rel,
                          worst *w)
{
    if (ta->dtype != ST_F32 || tb->dtype != ST_F32) {
        fprintf(stderr, "st_close: %s: only F32 tensors are compared\n", ta->name);
        return -1;
    }
    if (ta->ndim != tb->ndim || memcmp(ta->shape, tb->shape, ta->ndim * sizeof ta->shape[0]) != 0) {
        fprintf(stderr, "st_close: %s: shapes differ\n", ta->name);
        return -1;
    }
    float *a = read_tensor(fa, ta), *b = read_tensor(fb, tb);
    if (!a || !b) {
        fprintf(stderr, "st_close: %s: cannot read the data\n", ta->name);
        free(a);
        free(b);
        return -1;
    }
    double max_abs = 0.0;
    for (uint64_t k = 0; k < ta->numel; k++)
        if (fabs((double)a[k]) > max_abs)
            max_abs = fabs((double)a[k]);
    double tol = rel * max_abs + 1e-30;
    for (uint64_t k = 0; k < ta->numel; k++) {
        double r = fabs((double)a[k] - (double)b[k]) / tol;
        if (!(r <= 1.0)) /* NaN counts as out */
            w->n_out++;
        if (r > w->ratio || (isnan(r) && !isnan(w->ratio))) {
            w->ratio = r;
            w->name = ta->name;
            w->index = k;
            w->a = a[k];
            w->b = b[k];
        }
    }
    free(a);
    free(b);
    return 0;
}

static int usage(void)
{
    fprintf(stderr, "usage: st_close A.safetensors B.safetensors [--rel R] [--data-only]\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *pa = NULL, *pb = NULL;
    double rel = 1e-4;
    int data_only = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--rel") == 0 && i + 1 < argc)
            rel = strtod(argv[++i], NULL);
        else if (strcmp(argv[i], "--data-only") == 0)
            data_only = 1;
        else if (!pa)
            pa = argv[i];
        else if (!pb)
            pb = argv[i];
        else
            return usage();
    }
    if (!pa || !pb || !(rel > 0.0))
        return usage();
    st_file *fa = NULL, *fb = NULL;
    ms_error err;
    if (st_file_open(pa, &fa, &err) != 0 || st_file_open(pb, &fb, &err) != 0) {
        fprintf(stderr, "st_close: %s\n", err.msg);
        st_file_close(fa);
        return 2;
    }
    int rc = 0;
    if (!data_only) {
        char *ha = read_header(fa), *hb = read_header(fb);
        if (!ha || !hb || fa->data_start != fb->data_start || memcmp(ha, hb, fa->data_start - 8) != 0) {
            printf("st_close: the headers differ\n");
            rc = 1;
        }
        free(ha);
        free(hb);
    }
    if (fb->header.n_tensors != fa->header.n_tensors) {
        printf("st_close: %s has %zu tensors, %s %zu\n", pa, fa->header.n_tensors, pb, fb->header.n_tensors);
        rc = 1;
    }
    if (fa->header.n_tensors == 0) {
        printf("st_close: no tensors in %s\n", pa);
        rc = 1;
    }
    worst w = {0};
    for (size_t i = 0; i < fa->header.n_tensors && rc != 2; i++) {
        const st_tensor *ta = &fa->header.tensors[i];
        long j = st_header_find(&fb->header, ta->name);
        if (j < 0) {
            printf("st_close: %s is not in %s\n", ta->name, pb);
            rc = 1;
            continue;
        }
        if (compare_tensor(fa, ta, fb, &fb->header.tensors[j], rel, &w) != 0)
            rc = 2;
    }
    if (rc != 2) {
        printf("worst |diff| / tolerance %.3f (%s, element %llu: %.9g vs %.9g), %llu elements out\n", w.ratio,
               w.name ? w.name : "-", (unsigned long long)w.index, w.a, w.b, (unsigned long long)w.n_out);
        if (w.n_out)
            rc = 1;
    }
    st_file_close(fa);
    st_file_close(fb);
    return rc;
}
