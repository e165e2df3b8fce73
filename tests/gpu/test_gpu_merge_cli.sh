# The GPU through the real binary: every method gives the CPU's bytes with
# --device cuda, under a --gpu-memory-limit that sends the large tensors to
# the CPU, and with every gpu_alloc fault walked (each fallback logged, the
# bytes unchanged). Exit 77 where no GPU is usable.
source "$(dirname "$0")/../e2e/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset small --dtype bf16 --seed 1
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 2 --dtype f16
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 3
skip_without_gpu "$M/ft1"

recipe() { # FILE METHOD PARAMS
  cat > "$1" <<EOR
merge_method: $2
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.6 $3}
  - model: ./models/ft2
    parameters: {weight: [0.2, 0.5] $3}
random_seed: 11
EOR
}
recipe "$WORK/ties.yml" ties ", density: 0.3"
recipe "$WORK/dare_ties.yml" dare_ties ", density: 0.4"
recipe "$WORK/dare_linear.yml" dare_linear ", density: 0.5"
recipe "$WORK/task_arithmetic.yml" task_arithmetic ""
recipe "$WORK/breadcrumbs.yml" breadcrumbs ", density: 0.7, gamma: 0.05"
recipe "$WORK/breadcrumbs_ties.yml" breadcrumbs_ties ", density: 0.6, gamma: 0.1"
recipe "$WORK/della.yml" della ", density: 0.5, epsilon: 0.1"
recipe "$WORK/della_linear.yml" della_linear ", density: 0.4, epsilon: 0.2"

for m in ties dare_ties dare_linear task_arithmetic breadcrumbs breadcrumbs_ties della della_linear; do
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/cpu_$m" --device cpu --quiet
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/gpu_$m" --device cuda --json --quiet > "$WORK/gpu.json"
  grep -qE '"tensors_gpu":[[:space:]]*[1-9]' "$WORK/gpu.json" || fail "$m: nothing ran on the GPU"
  grep -qE '"compute_workers":[[:space:]]*2,' "$WORK/gpu.json" || fail "$m: a GPU merge ran one worker"
  same_bytes "$WORK/cpu_$m" "$WORK/gpu_$m"
  # chunked on both sides of the PCIe bus
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/gpuc_$m" --device cuda --max-memory 34M --threads 2 --quiet
  same_bytes "$WORK/cpu_$m" "$WORK/gpuc_$m"
  # one GPU lane: no overlap between tensors, the same bytes
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/gpu1_$m" --device cuda --gpu-lanes 1 --json --quiet > "$WORK/gpu1.json"
  grep -qE '"compute_workers":[[:space:]]*1,' "$WORK/gpu1.json" || fail "$m: --gpu-lanes 1 ran two workers"
  same_bytes "$WORK/cpu_$m" "$WORK/gpu1_$m"
  echo "$m: GPU bytes == CPU bytes (2 lanes, chunked, 1 lane)"
done

# LoRA inputs: materialised on the CPU, merged on the GPU, same bytes
"$MS_GEN" lora "$M/base" "$M/a1" --seed 4 --rank 8 --targets all-linear
"$MS_GEN" lora "$M/base" "$M/a2" --seed 5 --rank 4 --targets q_proj,v_proj --dora
printf 'merge_method: ties\nbase_model: ./models/base\nmodels:\n  - model: ./models/base+./models/a1\n    parameters: {weight: 0.5, density: 0.2}\n  - model: ./models/base+./models/a2\n    parameters: {weight: 0.5, density: 0.2}\n' > "$WORK/lora.yml"
"$MS_BIN" merge "$WORK/lora.yml" -o "$WORK/cpu_lora" --device cpu --quiet
"$MS_BIN" merge "$WORK/lora.yml" -o "$WORK/gpu_lora" --device cuda --json --quiet > "$WORK/gpu.json"
grep -qE '"tensors_gpu":[[:space:]]*[1-9]' "$WORK/gpu.json" || fail "lora: nothing ran on the GPU"
same_bytes "$WORK/cpu_lora" "$WORK/gpu_lora"
echo "lora: GPU bytes == CPU bytes"

# the staging pool left pageable (MERGESTREAM_GPU_PIN=0): said once, the same bytes
MERGESTREAM_GPU_PIN=0 "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/pageable" --device cuda --json > "$WORK/pageable.json" 2> "$WORK/pageable.err"
grep -q "staging pool left pageable" "$WORK/pageable.err" || fail "MERGESTREAM_GPU_PIN=0: no log line"
grep -qE '"tensors_gpu":[[:space:]]*[1-9]' "$WORK/pageable.json" || fail "pageable pool: nothing ran on the GPU"
same_bytes "$WORK/cpu_ties" "$WORK/pageable"

# a GPU memory cap small enough that the big tensors stay on the CPU
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/capped" --device cuda --gpu-memory-limit 2M --json --quiet > "$WORK/capped.json"
grep -qE '"tensors_cpu":[[:space:]]*[1-9]' "$WORK/capped.json" || fail "--gpu-memory-limit 2M kept everything on the GPU"
same_bytes "$WORK/cpu_ties" "$WORK/capped"

# walk gpu_alloc faults: each run falls back (one warning line) and keeps the bytes
walk_gpu_alloc "$WORK/dare_ties.yml" "$WORK/cpu_dare_ties" 60
echo "test_gpu_merge_cli: ok"
