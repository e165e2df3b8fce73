# LoRA adapters as merge inputs ("DIR+ADAPTER"), as the original Kaggle job
# used them: two adapters of one base, TIES and DARE, chunked == whole, and
# the adapter errors a user meets.
source "$(dirname "$0")/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset small --dtype bf16 --seed 1
"$MS_GEN" lora "$M/base" "$M/a1" --seed 2 --rank 16 --alpha 32 --targets all-linear
"$MS_GEN" lora "$M/base" "$M/a2" --seed 3 --rank 8 --alpha 8 --targets q_proj,k_proj,v_proj,o_proj --dora
"$MS_GEN" finetune "$M/base" "$M/ft" --seed 4

for mm in ties:30M dare_ties:28M; do
  m=${mm%%:*} mem=${mm#*:}
  cat > "$WORK/$m.yml" <<EOR
merge_method: $m
base_model: ./models/base
models:
  - model: ./models/base+./models/a1
    parameters: {weight: 0.5, density: 0.2}
  - model: ./models/base+./models/a2
    parameters: {weight: 0.5, density: 0.2}
  - model: ./models/ft
    parameters: {weight: 0.3, density: 0.5}
dtype: bfloat16
EOR
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/whole_$m" --quiet
  "$MS_BIN" verify "$WORK/whole_$m" --quiet
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/chunked_$m" --max-memory $mem --threads 1 --io pread --json --quiet > "$WORK/c.json"
  grep -qE '"tensors_chunked":[[:space:]]*0,' "$WORK/c.json" && fail "$m: nothing chunked"
  same_bytes "$WORK/whole_$m" "$WORK/chunked_$m"
  # O_DIRECT reads of BASE+ADAPTER inputs: the base rows land off the block
  # start, their fp32 materialisation follows them in the staging buffer
  evict_cache "$M"
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/direct_$m" --direct-io --quiet
  same_bytes "$WORK/whole_$m" "$WORK/direct_$m"
done
cmp -s "$WORK/whole_ties/model.safetensors" "$M/base/model.safetensors" && fail "the adapters changed nothing"

# passthrough of BASE+ADAPTER bakes the adapter in (DoRA included): every
# tensor the bytes of a one-model linear merge with weight 1, and not the base's
for a in a1 a2; do
  printf 'merge_method: passthrough\nmodels:\n  - model: ./models/base+./models/%s\n' $a > "$WORK/pt_$a.yml"
  printf 'merge_method: linear\nmodels:\n  - model: ./models/base+./models/%s\n    parameters: {weight: 1.0}\n' $a \
    > "$WORK/lin_$a.yml"
  "$MS_BIN" merge "$WORK/pt_$a.yml" -o "$WORK/pt_$a" --quiet
  "$MS_BIN" merge "$WORK/lin_$a.yml" -o "$WORK/lin_$a" --quiet
  same_bytes "$WORK/lin_$a" "$WORK/pt_$a"
  cmp -s "$WORK/pt_$a/model.safetensors" "$M/base/model.safetensors" && fail "passthrough ignored adapter $a"
done
# ... and in slices: the adapted layers of the slice that names the adapter
printf 'merge_method: passthrough\nslices:\n  - sources:\n      - model: ./models/base+./models/a1\n        layer_range: [0, 2]\n' \
  > "$WORK/pt_slice.yml"
"$MS_BIN" merge "$WORK/pt_slice.yml" -o "$WORK/pt_slice" --quiet
"$MS_BIN" inspect "$WORK/pt_slice" --hash | grep '^model\.layers\.0\.self_attn\.q_proj' > "$WORK/slice_q.h"
"$MS_BIN" inspect "$WORK/pt_a1" --hash | grep '^model\.layers\.0\.self_attn\.q_proj' | diff - "$WORK/slice_q.h" > /dev/null ||
  fail "passthrough slices: the adapted q_proj differs from the adapted model's"

# an adapter made for another base: exit 3 naming the adapter, module and shapes
"$MS_GEN" base "$M/other" --preset small --dtype bf16 --seed 9 --hidden 128
"$MS_GEN" lora "$M/other" "$M/a_other" --seed 5 --rank 4 --targets q_proj
printf 'merge_method: ties\nbase_model: ./models/base\nmodels:\n  - model: ./models/base+./models/a_other\n    parameters: {weight: 1, density: 0.5}\n' > "$WORK/wrong.yml"
expect_fail 3 "a_other.*q_proj.*\[" "$MS_BIN" merge "$WORK/wrong.yml" -o "$WORK/o1"

# PiSSA-initialised adapters change the base too: refused, exit 2
cp -r "$M/a1" "$M/pissa"
sed -i -E 's/"init_lora_weights":[[:space:]]*true/"init_lora_weights": "pissa"/' "$M/pissa/adapter_config.json"
grep -q pissa "$M/pissa/adapter_config.json" || fail "could not make a PiSSA adapter config"
printf 'merge_method: ties\nbase_model: ./models/base\nmodels:\n  - model: ./models/base+./models/pissa\n    parameters: {weight: 1, density: 0.5}\n' > "$WORK/pissa.yml"
expect_fail 2 "pissa" "$MS_BIN" merge "$WORK/pissa.yml" -o "$WORK/o2"

# an adapter directory named without its base
printf 'merge_method: ties\nbase_model: ./models/base\nmodels:\n  - model: ./models/a1\n    parameters: {weight: 1, density: 0.5}\n' > "$WORK/bare.yml"
expect_fail 2 "bare.yml:4: .*PEFT adapter; name it as BASE_DIR\+ADAPTER_DIR" "$MS_BIN" merge "$WORK/bare.yml" -o "$WORK/o3"
# DoRA over embeddings normalises each column over every row, so the tensor
# cannot be cut into row chunks: planning refuses such a budget before
# anything is read (--dry-run too), naming the tensor; the default budget
# merges it whole
"$MS_GEN" lora "$M/base" "$M/a3" --seed 6 --rank 4 --targets q_proj --dora --embeddings
printf 'merge_method: linear\nmodels:\n  - model: ./models/base+./models/a3\n    parameters: {weight: 1.0}\n' > "$WORK/dora_cols.yml"
want="model.embed_tokens.weight: a DoRA adapter over columns .*raise --max-memory"
expect_fail 2 "$want" "$MS_BIN" merge "$WORK/dora_cols.yml" -o "$WORK/o4" --max-memory 28M --dry-run
expect_fail 2 "$want" "$MS_BIN" merge "$WORK/dora_cols.yml" -o "$WORK/o4" --max-memory 28M
[ ! -e "$WORK/o4" ] || fail "a merge refused while planning left its output directory"
"$MS_BIN" merge "$WORK/dora_cols.yml" -o "$WORK/dora_cols" --quiet
cmp -s "$WORK/dora_cols/model.safetensors" "$M/base/model.safetensors" && fail "the DoRA embedding adapter changed nothing"
echo "merge_lora: ok"
