# The Hessian-aware merges with a GPU, through the real binary: the Hessians'
# Cholesky factorisations on the GPU, ties_sparsegpt / dare_sparsegpt's
# saliency-keyed passes and regmean's solve there give the CPU's bytes.
# Until this has passed on a GPU all of it stays
# behind MERGESTREAM_GPU_UNVERIFIED=1: without it nothing of theirs runs on
# the GPU. Then the fallbacks: every gpu_alloc fault walked (a "GPU out of
# memory" line, the bytes unchanged) and a --gpu-memory-limit under one
# factorisation's needs. Exit 77 where no GPU is usable.
source "$(dirname "$0")/../e2e/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset small --dtype bf16 --seed 1 # hidden 256, intermediate 688
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 2
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 3
skip_without_gpu "$M/ft1"
write_calib "$WORK/calib.txt" 40 64 1000
for m in ft1 ft2; do
  "$MS_BIN" hessian "$M/$m" --calib "$WORK/calib.txt" -o "$WORK/h_$m" --device cpu --quiet
done
write_hessian_recipes

for m in ties_sparsegpt dare_sparsegpt regmean; do
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/cpu_$m" --device cpu --quiet
  # not verified on a GPU yet: off by default
  MERGESTREAM_GPU_UNVERIFIED=0 "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/off_$m" --device cuda --json --quiet > "$WORK/off.json"
  [ "$(json_num "$WORK/off.json" hessian_factorisations_gpu)" = 0 ] || fail "$m: factored on the GPU without MERGESTREAM_GPU_UNVERIFIED"
  [ "$(json_num "$WORK/off.json" tensors_gpu)" = 0 ] || fail "$m: passes on the GPU without MERGESTREAM_GPU_UNVERIFIED"
  same_bytes "$WORK/cpu_$m" "$WORK/off_$m"
  export MERGESTREAM_GPU_UNVERIFIED=1 # the rest of the loop
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/gpu_$m" --device cuda --json --quiet > "$WORK/gpu.json"
  f=$(json_num "$WORK/gpu.json" hessian_factorisations_gpu); t=$(json_num "$WORK/gpu.json" tensors_gpu)
  [ "$f" -gt 0 ] || fail "$m: no Hessian was factored on the GPU"
  [ "$t" -gt 0 ] || fail "$m: no pass ran on the GPU"
  same_bytes "$WORK/cpu_$m" "$WORK/gpu_$m"
  # a small staging pool (the sparsegpt tensors in row chunks), two CPU threads beside the GPU
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/gpuc_$m" --device cuda --max-memory 40M --threads 2 --quiet
  same_bytes "$WORK/cpu_$m" "$WORK/gpuc_$m"
  # a cap under one 688 x 688 factorisation (3.6 MiB): those on the CPU, the bytes unchanged
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/capped_$m" --device cuda --gpu-memory-limit 3M --json --quiet > "$WORK/capped.json"
  same_bytes "$WORK/cpu_$m" "$WORK/capped_$m"
  echo "$m: GPU bytes == CPU bytes ($f factorisations and $t tensors on the GPU; chunked; capped)"
done

# walk gpu_alloc faults through a merge whose factorisations and passes both ask
export MERGESTREAM_GPU_UNVERIFIED=1
walk_gpu_alloc "$WORK/ties_sparsegpt.yml" "$WORK/cpu_ties_sparsegpt" 80
echo "test_gpu_hessian_merge_cli: ok"
