/* gpu/gpu_merge_regmean_kernels.cuh's accumulation and solves, run on the
 * CPU (gpu_emu.hpp), against the CPU kernels' fp64 y
 * (cpu_merge_hessian_solve_for_tests): every bit, for sizes around the
 * 32-column blocks and the 64 x 64 tiles, one to three models, rows in one
 * tile and in several. tests/gpu/test_gpu_merge runs the same kernels on a
 * GPU; this runs them on every CI machine. MS_TEST_SEED=N replays a run. */
#include "gpu_emu.hpp"
#include "../unit/test_rng.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gpu/gpu_merge_regmean_kernels.cuh"

extern "C" {
#include "cpu/cpu_merge_hessian.h"
}

static int failures;

/* nm models' G_i [n][n], a lower triangular L with a dominant diagonal and
 * tau [nm][rows][n]: the CPU's y and the kernels' Z, bit for bit. */
static void compare(uint64_t n, uint64_t rows, unsigned nm)
{
    std::vector<std::vector<float>> g(nm + 1);
    std::vector<double> chol(n * n, 0.0);
    std::vector<float> tau((uint64_t)nm * rows * n);
    ms_hessian_state hs;
    std::memset(&hs, 0, sizeof hs);
    hs.dim = n;
    hs.regmean_solve = true;
    for (unsigned i = 1; i <= nm; i++) {
        g[i].resize(n * n);
        for (float &v : g[i])
            v = (float)(2.0 * rng_unit() - 1.0);
        hs.g[i] = g[i].data();
        hs.g_set[i] = true;
    }
    for (uint64_t j = 0; j < n; j++) {
        for (uint64_t k = 0; k < j; k++)
            chol[j * n + k] = 2.0 * rng_unit() - 1.0;
        chol[j * n + j] = 1.0 + (double)n * rng_unit();
    }
    hs.chol = chol.data();
    for (float &v : tau)
        v = (float)(std::pow(10.0, 4.0 * rng_unit() - 2.0) * (rng_unit() < 0.5 ? -1.0 : 1.0));

    /* the CPU: CPU_MERGE_HESSIAN_LANES rows at a time, tau [nm][nr][n] per group */
    std::vector<double> want(rows * n);
    for (uint64_t r0 = 0; r0 < rows; r0 += CPU_MERGE_HESSIAN_LANES) {
        unsigned nr = (unsigned)(rows - r0 < CPU_MERGE_HESSIAN_LANES ? rows - r0 : CPU_MERGE_HESSIAN_LANES);
        std::vector<float> group((uint64_t)nm * nr * n);
        for (unsigned i = 0; i < nm; i++)
            std::memcpy(&group[(uint64_t)i * nr * n], &tau[((uint64_t)i * rows + r0) * n], nr * n * sizeof(float));
        if (cpu_merge_hessian_solve_for_tests(&hs, nm, group.data(), nr, &want[r0 * n]) != 0) {
            std::fprintf(stderr, "FAIL: the CPU solve ran out of memory\n");
            failures++;
            return;
        }
    }

    /* the kernels, in rg_enqueue's order */
    std::vector<double> B(rows * n, 0.0), S(rows * n, 0.0), Z(rows * n, NAN);
    std::vector<float> g_all;
    for (unsigned i = 1; i <= nm; i++)
        g_all.insert(g_all.end(), g[i].begin(), g[i].end());
    for (unsigned i = 0; i < nm; i++)
        rg_launch_accum(&tau[(uint64_t)i * rows * n], &g_all[(uint64_t)i * n * n], B.data(), rows, n, nullptr);
    rg_launch_solve(chol.data(), n, rows, B.data(), S.data(), Z.data(), nullptr);

    uint64_t e = 0;
    while (e < rows * n && std::memcmp(&want[e], &Z[e], sizeof(double)) == 0)
        e++;
    if (e < rows * n) {
        std::fprintf(stderr, "FAIL: n %llu, %llu rows, %u models: y[%llu][%llu] is %a, the CPU's %a\n",
                     (unsigned long long)n, (unsigned long long)rows, nm, (unsigned long long)(e / n),
                     (unsigned long long)(e % n), Z[e], want[e]);
        failures++;
    }
}

int main(void)
{
    g_rng = test_seed("test_emu_regmean");
    struct {
        uint64_t n, rows;
        unsigned nm;
    } cases[] = {{1, 1, 1}, {7, 3, 2}, {32, 65, 1}, {33, 3, 3}, {64, 130, 2}, {65, 65, 3}, {100, 3, 2}, {100, 130, 1}};
    for (const auto &c : cases)
        compare(c.n, c.rows, c.nm);
    std::printf("test_emu_regmean: %d failures\n", failures);
    return failures ? 1 : 0;
}
