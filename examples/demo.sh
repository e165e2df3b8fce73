#!/usr/bin/env bash
# The README's first Quick start command: installs the build dependencies,
# builds mergestream, generates a small Llama-shaped base model and two
# fine-tunes, merges them with TIES (examples/ties.yml) and verifies the output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B build "${gen[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
models=examples/models
[ -f "$models/base/config.json" ] || build/bench/gen_model base "$models/base" --preset small --dtype bf16 --seed 1
[ -f "$models/ft1/config.json" ] || build/bench/gen_model finetune "$models/base" "$models/ft1" --seed 2
[ -f "$models/ft2/config.json" ] || build/bench/gen_model finetune "$models/base" "$models/ft2" --seed 3
build/pipeline/mergestream merge examples/ties.yml -o examples/out --force
build/pipeline/mergestream verify examples/out
build/pipeline/mergestream inspect examples/out | tail -n 4
