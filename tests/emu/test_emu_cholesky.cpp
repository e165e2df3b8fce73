/* gpu/gpu_hessian_chol_kernels.cuh's kernels and launch sequence, run on the
 * CPU (gpu_emu.hpp), against the CPU's ms_hessian_cholesky: the same bits
 * for sizes around the 8 lanes and the 32-column blocks, the same failure
 * for a pivot that is not positive (in the first block, a later block and
 * the last row) or NaN, and the diagonal gather. tests/gpu/test_gpu_cholesky
 * runs the same kernels on a GPU; this runs them on every CI machine.
 * MS_TEST_SEED=N replays a run. */
#include "gpu_emu.hpp"
#include "../unit/test_rng.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gpu/gpu_hessian_chol_kernels.cuh"

/* pipeline/merge_passes_hessian.h (a C header, not included from C++) */
extern "C" int ms_hessian_cholesky(double *a, uint64_t n);

/* A random symmetric positive definite matrix with entries over 6 decades
 * (scaled rows and columns), its strict upper triangle filled with values
 * that must never be read. */
static std::vector<double> random_spd(uint64_t n)
{
    std::vector<double> a(n * n), scale(n);
    for (double &s : scale)
        s = std::pow(10.0, 6.0 * rng_unit() - 3.0);
    for (uint64_t i = 0; i < n; i++) {
        for (uint64_t j = 0; j < i; j++)
            a[i * n + j] = (2.0 * rng_unit() - 1.0) * scale[i] * scale[j];
        a[i * n + i] = ((double)n + rng_unit()) * scale[i] * scale[i];
        for (uint64_t j = i + 1; j < n; j++)
            a[i * n + j] = -1234.5 - (double)(i + j);
    }
    return a;
}

/* The kernels' factorisation of a in place; 0 or -1 (the flag). diag:
 * L's diagonal as k_ch_diagonal gathers it, when not NULL. */
static int emu_cholesky(std::vector<double> &a, uint64_t n, std::vector<double> *diag)
{
    std::vector<double> lanes(n * CH_BLOCK * 8, NAN);
    int flag = 0;
    ch_launch(a.data(), n, lanes.data(), &flag, diag != nullptr, nullptr);
    if (diag)
        diag->assign(lanes.begin(), lanes.begin() + (std::ptrdiff_t)n);
    return flag ? -1 : 0;
}

static int failures;

static void check(bool ok, const char *what, uint64_t n)
{
    if (!ok) {
        std::fprintf(stderr, "FAIL: n = %llu: %s\n", (unsigned long long)n, what);
        failures++;
    }
}

/* The CPU's factor and the kernels' agree bit for bit in the lower triangle
 * and leave the upper one as it was. */
static void compare_factor(uint64_t n)
{
    std::vector<double> cpu = random_spd(n), gpu = cpu, diag;
    int rc_cpu = ms_hessian_cholesky(cpu.data(), n), rc_gpu = emu_cholesky(gpu, n, &diag);
    check(rc_cpu == 0 && rc_gpu == 0, "a positive definite matrix did not factor", n);
    check(std::memcmp(cpu.data(), gpu.data(), n * n * sizeof(double)) == 0, "factor bits differ from the CPU's", n);
    bool diag_ok = true;
    for (uint64_t j = 0; j < n; j++)
        diag_ok = diag_ok && std::memcmp(&diag[j], &cpu[j * n + j], sizeof(double)) == 0;
    check(diag_ok, "the gathered diagonal is not L's", n);
}

/* Pivot `row` spoiled (negative, or NaN): both fail. */
static void compare_failure(uint64_t n, uint64_t row, double value)
{
    std::vector<double> cpu = random_spd(n), gpu;
    cpu[row * n + row] = value;
    gpu = cpu;
    int rc_cpu = ms_hessian_cholesky(cpu.data(), n), rc_gpu = emu_cholesky(gpu, n, nullptr);
    check(rc_cpu != 0, "the CPU factored a matrix with a bad pivot", n);
    check(rc_gpu == -1, "the kernels factored a matrix with a bad pivot", n);
}

int main(void)
{
    g_rng = test_seed("test_emu_cholesky");
    const uint64_t sizes[] = {1, 2, 7, 8, 9, 31, 32, 33, 40, 63, 64, 65, 97, 100, 129};
    for (uint64_t n : sizes)
        compare_factor(n);
    for (uint64_t n : {5ull, 40ull, 100ull}) {
        compare_failure(n, 0, -1.0);
        compare_failure(n, n / 2, -1.0);
        compare_failure(n, n - 1, 0.0);
        compare_failure(n, n - 1, NAN);
    }
    std::printf("test_emu_cholesky: %d failures\n", failures);
    return failures ? 1 : 0;
}
