/* The per-element arithmetic of the Hessian-aware merge methods, written
 * once for both backends (the rules of merge_math.h apply: fp32, no FMA
 * contraction, NaN canonical). Semantics: pipeline/merge_passes_hessian.h. */
#ifndef MS_MERGE_MATH_HESSIAN_H
#define MS_MERGE_MATH_HESSIAN_H

#include <stdint.h>

#include "pipeline/merge_math.h"

/* OBS saliency's guard against a zero coefficient (DESIGN.md). */
#define MS_HESSIAN_U_EPS 1e-10f

/* The selection key of a delta with the saliency coefficient u of its
 * column: score = delta^2 / (u + 1e-10)^2 in fp32, as the magnitude key of
 * the score (the score is >= 0, +Inf or NaN: key order is score order, a NaN
 * score - a NaN delta, or 0 / 0 - ranks above +Inf). */
MS_HD static inline uint32_t ms_hessian_saliency_key(float delta, float u)
{
    float g = u + MS_HESSIAN_U_EPS;
    float score = (delta * delta) / (g * g);
    return ms_merge_key(ms_merge_canon(score));
}

#endif
