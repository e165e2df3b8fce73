# The CPU kernels compiled for another instruction set write the same bytes
# (DESIGN.md: the same output on any machine). $MS_BIN picks its AVX-512 or
# AVX2 clones of every kernel at load time; $MS_OTHER_BIN is a build with
# MERGESTREAM_CPU_CLONES=OFF, whose kernels are baseline x86-64 (SSE2). Every
# method, LoRA inputs (DoRA, embeddings), Hessian capture, the Hessian-aware
# merges and perplexity run through both, whole and in row chunks (the least
# --max-memory each merge accepts), and every
# output is compared byte for byte. .ci/run points MS_OTHER_BIN at the
# sanitizer build; without it the test skips (77).
source "$(dirname "$0")/lib.bash"
if [ -z "${MS_OTHER_BIN:-}" ]; then
  echo "SKIP: MS_OTHER_BIN names no second build (.ci/run sets it)"
  exit 77
fi

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset small --dtype bf16 --seed 31  # 512 KB embeddings: they chunk
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 32
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 33 --dtype f16
"$MS_GEN" finetune "$M/base" "$M/ft3" --seed 34 --dtype f32 --touched-fraction 0.3
"$MS_GEN" lora "$M/base" "$M/a1" --seed 35 --rank 8 --targets all-linear --embeddings
"$MS_GEN" lora "$M/base" "$M/a2" --seed 36 --rank 4 --targets q_proj,v_proj --dora
source "$(dirname "$0")/interp_recipes.bash"

task_vector_recipe() { # NAME METHOD MODEL_PARAMS
  write_recipe "$1" <<EOR
merge_method: $2
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.5 $3}
  - model: ./models/ft2
    parameters: {weight: [0.2, 0.7] $3}
  - model: ./models/base+./models/a1
    parameters: {weight: -0.3 $3}
  - model: ./models/base+./models/a2
    parameters: {weight: 0.4 $3}
random_seed: 7
EOR
}
task_vector_recipe ties ties ", density: 0.3"
task_vector_recipe dare_ties dare_ties ", density: 0.4"
task_vector_recipe breadcrumbs_ties breadcrumbs_ties ", density: 0.6, gamma: 0.05"
task_vector_recipe della della ", density: 0.5, epsilon: 0.1"
task_vector_recipe task_arithmetic task_arithmetic ""

# Hessians from both builds, then the Hessian-aware merges over them
write_calib "$WORK/calib.txt" 8 24 7
for m in ft1 ft2; do
  "$MS_BIN" hessian "$M/$m" --calib "$WORK/calib.txt" -o "$WORK/h_$m" --quiet
  "$MS_OTHER_BIN" hessian "$M/$m" --calib "$WORK/calib.txt" -o "$WORK/other_h_$m" --quiet
  same_bytes "$WORK/h_$m" "$WORK/other_h_$m"
done
a=$("$MS_BIN" perplexity "$M/ft1" --calib "$WORK/calib.txt" --quiet)
b=$("$MS_OTHER_BIN" perplexity "$M/ft1" --calib "$WORK/calib.txt" --quiet)
[ "$a" = "$b" ] || fail "perplexity: '$a' here, '$b' from the other build"
write_hessian_recipes

n=0
for m in ties dare_ties breadcrumbs_ties della task_arithmetic ties_sparsegpt regmean \
  slerp nuslerp nuslerp_rows nuslerp_cols multislerp karcher model_stock model_stock_fw nearswap sce ram \
  ramplus_tl arcee_fusion; do
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/out_$m" --threads 2 --quiet
  "$MS_OTHER_BIN" merge "$WORK/$m.yml" -o "$WORK/other_$m" --threads 2 --quiet --no-verify
  same_bytes "$WORK/out_$m" "$WORK/other_$m"
  # row chunks: the statistics passes of the other build over chunks, in the
  # least memory the merge accepts (its error says how much that is)
  least=$({ "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/x" --max-memory 1M --dry-run 2>&1 || true; } |
    sed -n 's/.*needs at least \([0-9]*\) MiB.*/\1/p')
  [ -n "$least" ] || fail "$m: no least --max-memory in the error"
  "$MS_OTHER_BIN" merge "$WORK/$m.yml" -o "$WORK/otherc_$m" --threads 2 --max-memory "${least}M" --no-verify \
    --json --quiet > "$WORK/c.json"
  grep -qE '"tensors_chunked":[[:space:]]*0,' "$WORK/c.json" && fail "$m: --max-memory ${least}M chunked nothing"
  same_bytes "$WORK/out_$m" "$WORK/otherc_$m"
  n=$((n + 1))
done
echo "isa_identical: $n recipes, Hessians and perplexity: the same bytes from both builds"
