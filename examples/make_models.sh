#!/usr/bin/env bash
# Generates the models every example recipe names, under DIR (default
# examples/models), with the binaries of BUILD (default build): a small
# Llama-shaped bf16 base (4 layers, hidden 256, vocab 1024), two full
# fine-tunes, two LoRA adapters of the base, and each fine-tune's Hessians
# from examples/calib.txt. Deterministic; what exists already is kept.
#   examples/make_models.sh [DIR] [BUILD]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/models} build=${2:-$here/../build}
gen=$build/bench/gen_model ms=$build/pipeline/mergestream
[ -f "$dir/base/config.json" ] || "$gen" base "$dir/base" --preset small --dtype bf16 --seed 1
[ -f "$dir/ft1/config.json" ] || "$gen" finetune "$dir/base" "$dir/ft1" --seed 2
[ -f "$dir/ft2/config.json" ] || "$gen" finetune "$dir/base" "$dir/ft2" --seed 3
[ -f "$dir/lora_a/adapter_config.json" ] ||
  "$gen" lora "$dir/base" "$dir/lora_a" --seed 4 --rank 16 --targets all-linear
[ -f "$dir/lora_b/adapter_config.json" ] ||
  "$gen" lora "$dir/base" "$dir/lora_b" --seed 5 --rank 8 --targets q_proj,k_proj,v_proj,o_proj --dora
for m in ft1 ft2; do
  [ -f "$dir/hessians_$m/hessians.safetensors" ] ||
    "$ms" hessian "$dir/$m" --calib "$here/calib.txt" -o "$dir/hessians_$m" --quiet
done
