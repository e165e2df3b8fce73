# Inputs a careful user meets: NaN/Inf in a fine-tune, a merge that changes
# nothing, added-token embeddings, sharded inputs, a full-disk-like failure.
source "$(dirname "$0")/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset tiny --dtype bf16 --seed 1 --shard-size 50K
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 2
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 3 --extra-vocab 8

# NaN and Inf: propagate, are counted in the summary and the manifest
"$MS_GEN" finetune "$M/base" "$M/nan" --seed 4
off=$("$MS_BIN" inspect "$M/nan" --json | tr -d ' \n\t' | grep -o '"name":"model.layers.0.mlp.up_proj.weight"[^}]*"offset":[0-9]*' | grep -o '[0-9]*$')
file=$(ls "$M"/nan/*.safetensors | head -1)
printf '\xc0\x7f\x80\x7f' | dd of="$file" bs=1 seek="$((off + 10))" conv=notrunc status=none  # a bf16 NaN and +Inf
cat > "$WORK/nan.yml" <<EOR
merge_method: task_arithmetic
base_model: ./models/base
models:
  - model: ./models/nan
    parameters: {weight: 1.0}
EOR
"$MS_BIN" merge "$WORK/nan.yml" -o "$WORK/out_nan" 2> "$WORK/nan.err"
grep -q "NaN/Inf values in 1 output tensors" "$WORK/nan.err" || { cat "$WORK/nan.err"; fail "NaN/Inf not reported"; }
grep -A4 '"model.layers.0.mlp.up_proj.weight"' "$WORK/out_nan/mergestream.json" | grep -qE '"nonfinite":[[:space:]]*2' \
  || fail "manifest does not count the 2 non-finite values"

# a merge that changes nothing warns
cat > "$WORK/zero.yml" <<EOR
merge_method: ties
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.0, density: 0.5}
EOR
"$MS_BIN" merge "$WORK/zero.yml" -o "$WORK/out_zero" 2> "$WORK/zero.err"
grep -q "the output equals the base model" "$WORK/zero.err" || { cat "$WORK/zero.err"; fail "no warning for a no-op merge"; }

# added tokens: ft2's embeddings have 8 more rows: warned, first rows merged
cat > "$WORK/vocab.yml" <<EOR
merge_method: dare_ties
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: ./models/ft2
    parameters: {weight: 0.5, density: 0.5}
EOR
"$MS_BIN" merge "$WORK/vocab.yml" -o "$WORK/out_vocab" 2> "$WORK/vocab.err"
grep -q "more rows than the base's .* (added tokens)" "$WORK/vocab.err" || { cat "$WORK/vocab.err"; fail "no added-token warning"; }
"$MS_BIN" inspect "$WORK/out_vocab" --json | tr -d ' \n\t' | grep -q '"name":"model.embed_tokens.weight","dtype":"BF16","shape":\[256,64\]' \
  || fail "merged embeddings do not keep the base's shape"

# a model with FEWER rows is an error naming both files
"$MS_GEN" finetune "$M/base" "$M/ft3" --seed 5
"$MS_GEN" base "$M/small_vocab" --preset tiny --dtype bf16 --seed 6 --vocab 200
printf 'merge_method: ties\nbase_model: ./models/base\nmodels:\n  - model: ./models/small_vocab\n    parameters: {weight: 1, density: 0.5}\n' > "$WORK/fewer.yml"
expect_fail 3 "small_vocab: tensor 'model.embed_tokens.weight' has shape \[200, 64\] but .*models/base has \[256, 64\]" \
  "$MS_BIN" merge "$WORK/fewer.yml" -o "$WORK/o_fewer"

# a write that fails mid-run (as a full disk would): one line, nothing left
MERGESTREAM_FAULT=write:3 expect_fail 1 "write" "$MS_BIN" merge "$WORK/vocab.yml" -o "$WORK/o_write"
[ ! -e "$WORK/o_write" ] || [ -z "$(ls -A "$WORK/o_write")" ] || fail "failed merge left $(ls "$WORK/o_write")"
echo "merge_edge_cases: ok"
