#!/usr/bin/env bash
# Builds mergestream and runs the whole test suite (unit, e2e, gpu, slow).
#   tests/run.sh              release build in build/, every test
#   tests/run.sh --sanitize   ASan+UBSan build in build-asan/, every test
#   tests/run.sh --tsan       ThreadSanitizer build in build-tsan/, every test
#   tests/run.sh --fuzz       clang build with the libFuzzer targets in build-fuzz/
# GPU tests exit 77 (skipped) where no GPU is present. Extra arguments after
# the options go to ctest (e.g. -L unit).
set -euo pipefail
cd "$(dirname "$0")/.."
build=build
cmake_args=()
if [ "${1:-}" = "--sanitize" ]; then
  shift
  build=build-asan
  # CUDA stays out of the sanitizer build: ASan and the CUDA runtime do not mix.
  # Baseline x86-64 kernels only (no AVX-512/AVX2 clones): the suite then runs
  # the code paths of an older CPU, and .ci/run compares their output bytes
  # with the release build's (tests/e2e/isa_identical.sh).
  cmake_args+=(-DMERGESTREAM_SANITIZE=address,undefined -DMERGESTREAM_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug
    -DMERGESTREAM_CPU_CLONES=OFF)
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
elif [ "${1:-}" = "--tsan" ]; then
  shift
  build=build-tsan
  # the three stages, the cpu pool and the staging pool under ThreadSanitizer;
  # optimised (TSan slows a Debug build too much for the e2e merges), CUDA
  # out, no kernel clones (their ifunc resolvers run before TSan's runtime
  # is up and crash)
  cmake_args+=(-DMERGESTREAM_SANITIZE=thread -DMERGESTREAM_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
    -DMERGESTREAM_CPU_CLONES=OFF)
  export TSAN_OPTIONS="halt_on_error=1 suppressions=$PWD/tests/tsan.supp"
elif [ "${1:-}" = "--fuzz" ]; then
  shift
  build=build-fuzz
  cmake_args+=(-DCMAKE_C_COMPILER=clang -DMERGESTREAM_FUZZ=ON -DMERGESTREAM_CUDA=OFF)
fi
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B "$build" "${gen[@]}" "${cmake_args[@]}" >/dev/null
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" "$@"
