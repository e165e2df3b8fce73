#!/usr/bin/env bash
# The README's first Quick start command: installs the build dependencies,
# builds mergestream, generates a small Llama-shaped base model, two
# fine-tunes, two LoRA adapters and Hessians (examples/make_models.sh), merges
# the fine-tunes with TIES (examples/ties.yml) and verifies the output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B build "${gen[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
bash examples/make_models.sh examples/models build
build/pipeline/mergestream merge examples/ties.yml -o examples/out --force
build/pipeline/mergestream verify examples/out
build/pipeline/mergestream inspect examples/out | tail -n 4
