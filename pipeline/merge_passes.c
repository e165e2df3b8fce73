/* The pass plan and the host steps between passes (see merge_passes.h). */
#include "pipeline/merge_passes.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "io/ms_error.h"
#include "io/ms_fault.h"
#include "pipeline/merge_passes_hessian.h"
#include "pipeline/merge_passes_interp.h"

/* =============================================================== plan */

/* floor(x * numel) in fp64, clamped to [0, numel]. */
static uint64_t plan_count(double x, uint64_t numel)
{
    double v = floor(x * (double)numel);
    if (!(v > 0.0))
        return 0;
    if (v >= (double)numel)
        return numel;
    return (uint64_t)v;
}

/* A bound whose keep test needs no search. lower_none: sel_lower is false for
 * every key; else sel_lower is true for every key. */
static void plan_trivial_bound(ms_merge_bound *b, bool lower_none)
{
    b->search = false;
    b->key = lower_none ? 0u : MS_MERGE_KEY_ABOVE_ALL;
    b->take = 0;
}

static void plan_search_bound(ms_merge_bound *b, uint64_t rank)
{
    b->search = true;
    b->rank = rank;
}

static void plan_model(const ms_tensor_params *p, unsigned i, ms_merge_model *m)
{
    double d = p->density[i];
    uint64_t numel = p->numel;
    memset(m, 0, sizeof *m);
    m->sel = MS_MERGE_SEL_ALL;
    m->factor = 1.0f;
    if (p->method == MS_METHOD_LINEAR || p->sparsify == MS_SPARSIFY_NONE || numel == 0 || d >= 1.0)
        return;
    switch (p->sparsify) {
    case MS_SPARSIFY_RANDOM:
        m->random_threshold = ms_merge_prob_threshold(d);
        m->sel = m->random_threshold == 0 ? MS_MERGE_SEL_NONE : MS_MERGE_SEL_RANDOM;
        break;
    case MS_SPARSIFY_MAGNITUDE:
        m->k = plan_count(d, numel);
        if (m->k == 0) {
            m->sel = MS_MERGE_SEL_NONE;
        } else if (m->k == numel) {
            m->sel = MS_MERGE_SEL_ALL;
        } else {
            /* the k-th largest key sits at ascending position numel - k */
            m->sel = MS_MERGE_SEL_TOP;
            plan_search_bound(&m->bound[0], numel - m->k);
        }
        break;
    case MS_SPARSIFY_MAGNITUDE_OUTLIERS: {
        uint64_t target = plan_count(d, numel);
        uint64_t top = plan_count(p->gamma[i], numel);
        uint64_t bottom;
        if (target + top > numel) { /* mergekit: top += bottom (negative), bottom = 0 */
            top = numel - target;
            bottom = 0;
        } else {
            bottom = numel - target - top;
        }
        m->k = target;
        uint64_t lo = bottom, hi = numel - top; /* keep ascending ranks [lo, hi) */
        if (target == 0) {
            m->sel = MS_MERGE_SEL_NONE;
        } else if (lo == 0 && hi == numel) {
            m->sel = MS_MERGE_SEL_ALL;
        } else {
            m->sel = MS_MERGE_SEL_BAND;
            if (lo == 0)
                plan_trivial_bound(&m->bound[0], true);
            else
                plan_search_bound(&m->bound[0], lo);
            if (hi == numel)
                plan_trivial_bound(&m->bound[1], false);
            else
                plan_search_bound(&m->bound[1], hi);
        }
        break;
    }
    case MS_SPARSIFY_DELLA_MAGPRUNE:
        m->sel = d <= 0.0 ? MS_MERGE_SEL_NONE : MS_MERGE_SEL_DELLA;
        break;
    case MS_SPARSIFY_NONE:
        break;
    }
    /* keeping nothing leaves sum|tau| = 0: the factor would be skipped anyway */
    m->rescale = p->rescale && m->sel != MS_MERGE_SEL_ALL && m->sel != MS_MERGE_SEL_NONE;
}

static bool model_searches(const ms_merge_model *m)
{
    return m->bound[0].search || m->bound[1].search;
}

/* Fills everything but the histogram pointers. */
static void plan_state(const ms_tensor_params *p, ms_merge_state *st)
{
    memset(st, 0, sizeof *st);
    MS_ASSERT(p->n_models >= 1 && p->n_models <= MS_MAX_MODELS);
    st->n_models = p->n_models;
    bool search = false, rescale = false;
    for (unsigned i = 1; i <= p->n_models; i++) {
        plan_model(p, i, &st->model[i]);
        search |= model_searches(&st->model[i]);
        rescale |= st->model[i].rescale;
    }
    /* 32-bit indices: no capture past 2^32 elements, whatever the caller asks */
    uint64_t capture = p->numel <= (uint64_t)UINT32_MAX + 1 ? p->capture_entries : 0;
    for (unsigned i = 1; i <= p->n_models; i++)
        for (unsigned b = 0; b < 2; b++)
            st->model[i].bound[b].capture.cap = st->model[i].bound[b].search ? capture : 0;
    if (search) {
        st->pass[st->n_passes++] = MS_MERGE_PASS_HIST_HI;
        st->pass[st->n_passes++] = MS_MERGE_PASS_HIST_LO;
    }
    if (rescale)
        st->pass[st->n_passes++] = MS_MERGE_PASS_L1;
    st->pass[st->n_passes++] = MS_MERGE_PASS_APPLY;
    if (ms_merge_interp_method(p->method)) /* their own plans (the models above select ALL) */
        ms_merge_interp_plan(p, st);
    if (ms_merge_hessian_method(p->method)) /* regmean's plan, dare_sparsegpt's factors */
        ms_merge_hessian_plan(p, st);
}

/* Histogram and capture words the plan needs (the captures come last). */
static uint64_t plan_hist_words(const ms_merge_state *st, uint64_t *capture_words)
{
    uint64_t words = 0, capture = 0;
    for (unsigned i = 1; i <= st->n_models; i++) {
        const ms_merge_model *m = &st->model[i];
        if (!model_searches(m))
            continue;
        words += MS_MERGE_HI_BINS;
        for (unsigned b = 0; b < 2; b++) {
            if (m->bound[b].search)
                words += MS_MERGE_LO_BINS;
            capture += m->bound[b].capture.cap;
        }
    }
    *capture_words = capture;
    return words + capture;
}

unsigned ms_merge_searched_bounds(const ms_tensor_params *p)
{
    ms_merge_state st;
    plan_state(p, &st);
    unsigned n = 0;
    for (unsigned i = 1; i <= p->n_models; i++)
        n += st.model[i].bound[0].search + st.model[i].bound[1].search;
    return n;
}

unsigned ms_merge_pass_count(const ms_tensor_params *p)
{
    ms_merge_state st;
    plan_state(p, &st);
    return st.n_passes;
}

uint64_t ms_merge_state_bytes(const ms_tensor_params *p)
{
    ms_merge_state st;
    plan_state(p, &st);
    uint64_t interp = ms_merge_interp_method(p->method) ? ms_merge_interp_state_bytes(p) : 0;
    uint64_t hessian = ms_hessian_state_bytes(p); /* 0 unless a Hessian method */
    if (hessian > UINT64_MAX / 2)
        return UINT64_MAX;
    uint64_t capture_words;
    return sizeof st + plan_hist_words(&st, &capture_words) * sizeof(uint64_t) + interp + hessian;
}

int ms_merge_state_open(const ms_tensor_params *p, ms_merge_state **out)
{
    *out = NULL;
    if (ms_fault_hit(MS_FAULT_HOST_ALLOC))
        return -ENOMEM;
    ms_merge_state *st = malloc(sizeof *st);
    if (!st)
        return -ENOMEM;
    plan_state(p, st);
    uint64_t capture_words;
    uint64_t words = plan_hist_words(st, &capture_words);
    if (words > 0) {
        if (ms_fault_hit(MS_FAULT_HOST_ALLOC))
            goto fail;
        st->hist_mem = calloc(words - capture_words, sizeof(uint64_t));
        if (!st->hist_mem)
            goto fail;
        uint64_t *h = st->hist_mem;
        for (unsigned i = 1; i <= st->n_models; i++) {
            ms_merge_model *m = &st->model[i];
            if (!model_searches(m))
                continue;
            m->hist_hi = h;
            h += MS_MERGE_HI_BINS;
            for (unsigned b = 0; b < 2; b++) {
                if (m->bound[b].search) {
                    m->bound[b].hist_lo = h;
                    h += MS_MERGE_LO_BINS;
                }
            }
        }
    }
    if (capture_words > 0) {
        /* not zeroed: only the entries appended are read */
        if (ms_fault_hit(MS_FAULT_HOST_ALLOC) || !(st->capture_mem = malloc(capture_words * sizeof(uint64_t))))
            goto fail;
        uint64_t *e = st->capture_mem;
        for (unsigned i = 1; i <= st->n_models; i++)
            for (unsigned b = 0; b < 2; b++) {
                ms_merge_capture *c = &st->model[i].bound[b].capture;
                if (c->cap == 0)
                    continue;
                c->key = (uint32_t *)e; /* two uint32 arrays of cap */
                c->index = c->key + c->cap;
                e += c->cap;
            }
    }
    if (ms_merge_interp_method(p->method) && ms_merge_interp_state_open(p, st) != 0)
        goto fail;
    *out = st;
    return 0;
fail:
    ms_merge_state_close(st);
    return -ENOMEM;
}

void ms_merge_state_close(ms_merge_state *st)
{
    if (!st)
        return;
    free(st->hist_mem);
    free(st->capture_mem);
    ms_merge_interp_state_close(st->interp);
    ms_hessian_state_close(st->hessian);
    free(st);
}

/* ============================================================ finish */

/* After HIST_HI: the bin holding ascending position b->rank. */
static void finish_hist_hi(ms_merge_model *m, ms_merge_bound *b, uint64_t numel)
{
    uint64_t below = 0, total = 0;
    for (uint32_t k = 0; k < MS_MERGE_HI_BINS; k++)
        total += m->hist_hi[k];
    MS_ASSERT(total == numel); /* the pass saw every element once */
    for (uint32_t k = 0; k < MS_MERGE_HI_BINS; k++) {
        if (b->rank < below + m->hist_hi[k]) {
            b->bin = k;
            b->n_below_bin = below;
            return;
        }
        below += m->hist_hi[k];
    }
    MS_ASSERT(!"rank beyond the histogram");
}

/* After HIST_LO: the exact key at b->rank, and how the equal keys split. */
static void finish_hist_lo(const ms_merge_model *m, ms_merge_bound *b, uint64_t numel)
{
    uint64_t below = b->n_below_bin, total = 0;
    for (uint32_t k = 0; k < MS_MERGE_LO_BINS; k++)
        total += b->hist_lo[k];
    MS_ASSERT(total == m->hist_hi[b->bin]);
    for (uint32_t k = 0; k < MS_MERGE_LO_BINS; k++) {
        if (b->rank < below + b->hist_lo[k]) {
            b->key = (b->bin << 16) | k;
            b->n_less = below;
            b->n_eq = b->hist_lo[k];
            if (m->sel == MS_MERGE_SEL_TOP) {
                uint64_t n_greater = numel - b->n_less - b->n_eq;
                b->take = m->k - n_greater; /* in [1, n_eq] */
            } else {
                b->take = b->rank - b->n_less; /* in [0, n_eq) */
            }
            MS_ASSERT(b->take <= b->n_eq);
            b->split = b->take > 0 && b->take < b->n_eq;
            return;
        }
        below += b->hist_lo[k];
    }
    MS_ASSERT(!"rank beyond the histogram");
}

/* Stable LSD radix sort of a[0..n) ascending, 8 bits a pass, through tmp[0..n). */
static void sort_indices(uint32_t *a, uint32_t *tmp, uint64_t n)
{
    for (unsigned shift = 0; shift < 32; shift += 8) {
        uint64_t start[256] = {0};
        for (uint64_t j = 0; j < n; j++)
            start[(a[j] >> shift) & 0xff]++;
        uint64_t run = 0;
        for (unsigned d = 0; d < 256; d++) {
            uint64_t c = start[d];
            start[d] = run;
            run += c;
        }
        for (uint64_t j = 0; j < n; j++)
            tmp[start[(a[j] >> shift) & 0xff]++] = a[j];
        uint32_t *t = a;
        a = tmp;
        tmp = t;
    }
    /* four passes: the sorted keys are back in the caller's a */
}

/* After HIST_HI: resolves b from its capture when the capture can (see
 * ms_merge_capture): the exact low-bits histogram of b's bin from the
 * captured keys, then HIST_LO's finish; for a split bound, the sorted flat
 * indices of the keys equal to t. */
static void capture_resolve(ms_merge_model *m, ms_merge_bound *b, uint64_t numel)
{
    ms_merge_capture *c = &b->capture;
    if (!c->armed || c->n > c->cap || c->covered != numel || b->bin < c->bin_lo || b->bin > c->bin_hi)
        return;
    for (uint64_t j = 0; j < c->n; j++) /* hist_lo is still all zero: HIST_LO has not run */
        if (c->key[j] >> 16 == b->bin)
            b->hist_lo[c->key[j] & 0xffffu]++;
    finish_hist_lo(m, b, numel); /* checks the bin's count against hist_hi's */
    b->search = false;
    if (!b->split)
        return;
    uint64_t n_eq = 0;
    for (uint64_t j = 0; j < c->n; j++)
        if (c->key[j] == b->key)
            c->index[n_eq++] = c->index[j];
    MS_ASSERT(n_eq == b->n_eq);
    sort_indices(c->index, c->key, n_eq); /* the keys are spent */
    c->n = n_eq;
    c->eq_index = true;
}

uint64_t ms_merge_eq_pos_before(const ms_merge_bound *b, uint64_t e)
{
    MS_ASSERT(b->capture.eq_index);
    const uint32_t *idx = b->capture.index;
    uint64_t lo = 0, hi = b->capture.n; /* first position whose index is >= e */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (idx[mid] < e)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

bool ms_merge_pass_idle(const ms_merge_state *st, unsigned pass)
{
    MS_ASSERT(pass < st->n_passes);
    if (st->pass[pass] != MS_MERGE_PASS_HIST_LO || st->interp)
        return false;
    for (unsigned i = 1; i <= st->n_models; i++)
        if (model_searches(&st->model[i]))
            return false;
    return true;
}

bool ms_merge_capturing(const ms_merge_state *st)
{
    for (unsigned i = 1; i <= st->n_models; i++)
        if (st->model[i].bound[0].capture.armed || st->model[i].bound[1].capture.armed)
            return true;
    return false;
}

bool ms_merge_pass_may_idle(const ms_tensor_params *p, unsigned pass)
{
    if (p->capture_entries == 0)
        return false;
    ms_merge_state st;
    plan_state(p, &st);
    return pass < st.n_passes && st.pass[pass] == MS_MERGE_PASS_HIST_LO && !ms_merge_interp_method(p->method);
}

void ms_merge_pass_skip_chunk(ms_merge_state *st, const ms_chunk *c)
{
    MS_ASSERT(c->elem0 == st->next_elem);
    st->next_elem += c->n_elems;
}

static void reset_eq_seen(ms_merge_state *st)
{
    for (unsigned i = 1; i <= st->n_models; i++)
        for (unsigned b = 0; b < 2; b++)
            st->model[i].bound[b].eq_seen = 0;
}

void ms_merge_pass_finish(ms_merge_state *st, const ms_tensor_params *p, unsigned pass)
{
    MS_ASSERT(pass < st->n_passes);
    if (pass + 1 == st->n_passes)
        return;
    MS_ASSERT(st->next_elem == p->numel); /* every chunk, once, in order */
    st->next_elem = 0;
    if (st->interp) {
        ms_merge_interp_finish(st, p, pass);
        return;
    }
    switch (st->pass[pass]) {
    case MS_MERGE_PASS_HIST_HI:
        for (unsigned i = 1; i <= st->n_models; i++) {
            for (unsigned b = 0; b < 2; b++) {
                ms_merge_bound *bd = &st->model[i].bound[b];
                if (!bd->search)
                    continue;
                finish_hist_hi(&st->model[i], bd, p->numel);
                capture_resolve(&st->model[i], bd, p->numel);
                st->any_split |= bd->split;
            }
        }
        break;
    case MS_MERGE_PASS_HIST_LO:
        st->any_split = false;
        for (unsigned i = 1; i <= st->n_models; i++) {
            for (unsigned b = 0; b < 2; b++) {
                ms_merge_bound *bd = &st->model[i].bound[b];
                if (bd->search)
                    finish_hist_lo(&st->model[i], bd, p->numel);
                st->any_split |= bd->split;
            }
        }
        break;
    case MS_MERGE_PASS_L1:
        for (unsigned i = 1; i <= st->n_models; i++) {
            ms_merge_model *m = &st->model[i];
            if (!m->rescale)
                continue;
            /* the last block, if the tensor ends inside it */
            m->l1_delta += m->blk_delta;
            m->l1_tau += m->blk_tau;
            m->blk_delta = m->blk_tau = 0.0;
            m->factor = ms_merge_rescale_factor(m->l1_delta, m->l1_tau);
        }
        break;
    case MS_MERGE_PASS_APPLY:
        MS_ASSERT(!"APPLY is the last pass");
        break;
    default:
        MS_ASSERT(!"an interpolation pass without its state");
        break;
    }
    reset_eq_seen(st);
}

/* ============================================================= philox */

void ms_merge_philox_key(const char *tensor_name, uint64_t seed, uint32_t key[2])
{
    XXH64_hash_t h = XXH3_64bits_withSeed(tensor_name, strlen(tensor_name), (XXH64_hash_t)seed);
    key[0] = (uint32_t)h;
    key[1] = (uint32_t)(h >> 32);
}
