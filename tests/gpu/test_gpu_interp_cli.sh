# Every interpolation and model-soup method, all computed on the GPU
# (gpu/gpu_merge_interp.cu and gpu_merge_interp_keys.cu: slerp, nuslerp in
# its three modes, multislerp, karcher, model_stock with and without
# filter_wise, nearswap, sce with select_topk below 1 (KEY_HI, KEY_LO,
# SUMSQ), ram, ramplus_tl, arcee_fusion (per-row KL, quartile threshold))
# through the real binary: --device cuda gives the bytes of --device cpu,
# with tensors really placed on the GPU, for the whole tensors and under a
# --max-memory small enough that the large tensors are cut into row chunks
# (every statistics pass over several chunks, sce's tie positions and
# histograms carried between them). The recipes are
# tests/e2e/interp_recipes.bash's. Exit 77 where no GPU is usable.
source "$(dirname "$0")/../e2e/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset small --dtype bf16 --seed 51
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 52
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 53 --dtype f16
"$MS_GEN" finetune "$M/base" "$M/ft3" --seed 54 --dtype f32 --touched-fraction 0.3
skip_without_gpu "$M/ft1"

source "$(dirname "$0")/../e2e/interp_recipes.bash"

ALL="slerp nuslerp nuslerp_rows nuslerp_cols multislerp karcher model_stock model_stock_fw nearswap sce ram ramplus_tl
  arcee_fusion"
for m in $ALL; do
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/cpu_$m" --device cpu --quiet
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/gpu_$m" --device cuda --json --quiet > "$WORK/gpu.json"
  grep -qE '"tensors_gpu":[[:space:]]*[1-9]' "$WORK/gpu.json" || fail "$m: nothing ran on the GPU"
  same_bytes "$WORK/cpu_$m" "$WORK/gpu_$m"
  # chunked: the smallest budget the merge accepts cuts the large tensors
  # into row chunks on the GPU side
  done_m=
  for mb in $(seq 26 48); do
    rc=0
    "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/gpuc_$m" --device cuda --max-memory ${mb}M --threads 2 --json --quiet \
      > "$WORK/gpuc.json" 2> "$WORK/gpuc.err" || rc=$?
    if [ "$rc" -ne 0 ]; then
      grep -q "max-memory is too small" "$WORK/gpuc.err" || { cat "$WORK/gpuc.err" >&2; fail "$m: ${mb}M"; }
      rm -rf "$WORK/gpuc_$m"
      continue
    fi
    grep -qE '"tensors_chunked":[[:space:]]*0,' "$WORK/gpuc.json" && fail "$m: --max-memory ${mb}M chunked nothing"
    grep -qE '"tensors_gpu":[[:space:]]*[1-9]' "$WORK/gpuc.json" || fail "$m: chunked, nothing ran on the GPU"
    same_bytes "$WORK/cpu_$m" "$WORK/gpuc_$m"
    done_m=1
    break
  done
  [ -n "$done_m" ] || fail "$m: no budget from 26M to 48M was accepted"
  echo "$m: GPU bytes == CPU bytes (whole and chunked)"
done
echo "test_gpu_interp_cli: ok"
