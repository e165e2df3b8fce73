# Every recipe in examples/ runs as its README says: the models from
# examples/make_models.sh (base, fine-tunes, LoRA adapters, Hessians), each
# recipe merged and verified, and what each one promises checked.
source "$(dirname "$0")/lib.bash"

EX="$WORK/examples"
mkdir -p "$EX"
cp "$MS_SRC"/examples/*.yml "$MS_SRC"/examples/calib.txt "$MS_SRC"/examples/make_models.sh "$EX/"
bin_dir=$(dirname "$(dirname "$MS_BIN")") # the build folder: pipeline/mergestream, bench/gen_model
[ "$MS_GEN" -ef "$bin_dir/bench/gen_model" ] || fail "MS_BIN and MS_GEN are not from one build"
bash "$EX/make_models.sh" "$EX/models" "$bin_dir"
n=0
for r in "$EX"/*.yml; do
  name=$(basename "$r" .yml)
  "$MS_BIN" merge "$r" -o "$EX/out_$name" --quiet 2> "$WORK/$name.err" || { cat "$WORK/$name.err" >&2; fail "examples/$name.yml"; }
  grep -q "warning" "$WORK/$name.err" && { cat "$WORK/$name.err" >&2; fail "examples/$name.yml warns"; }
  "$MS_BIN" verify "$EX/out_$name" --quiet
  n=$((n + 1))
done
[ "$n" -ge 11 ] || fail "only $n example recipes"
grep -qE '"num_hidden_layers":[[:space:]]*7' "$EX/out_passthrough/config.json" || fail "passthrough.yml: not 7 layers"
cmp -s "$EX/out_ties/model.safetensors" "$EX/out_ties_sparsegpt/model.safetensors" &&
  fail "ties_sparsegpt.yml gave ties.yml's bytes: the Hessians were not used"
cmp -s "$EX/out_lora_ties/model.safetensors" "$EX/models/base/model.safetensors" && fail "lora_ties.yml changed nothing"
echo "examples: $n recipes merged and verified"
