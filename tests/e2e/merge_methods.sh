# The interpolation and model-soup methods through the real binary, as a
# mergekit user runs them: each method's usual recipe on generated models
# (mixed dtypes), verify, the manifest, t = 0 / t = 1 exactness, the same
# bytes for 1 and 2 threads, io_uring and pread, and a memory budget that cuts
# tensors into row chunks (statistics passes over chunks == whole tensor),
# and the recipe errors: exit 2, one line naming the key and its line.
source "$(dirname "$0")/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset tiny --dtype bf16 --seed 31
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 32
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 33 --dtype f16
"$MS_GEN" finetune "$M/base" "$M/ft3" --seed 34 --dtype f32 --touched-fraction 0.3

source "$(dirname "$0")/interp_recipes.bash"

ALL="slerp nuslerp nuslerp_rows nuslerp_cols multislerp karcher model_stock model_stock_fw nearswap sce ram ramplus_tl arcee_fusion"
for m in $ALL; do
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/out_$m" --quiet
  "$MS_BIN" verify "$WORK/out_$m" --quiet
  method=$(sed -n 's/^merge_method: //p' "$WORK/$m.yml")
  grep -qE '"merge_method":[[:space:]]*"'"$method"'"' "$WORK/out_$m/mergestream.json" || fail "$m: manifest"
done
grep -qE '"torch_dtype":[[:space:]]*"float16"' "$WORK/out_karcher/config.json" || fail "karcher: torch_dtype"
# different methods, different bytes
cmp -s "$WORK/out_model_stock/model.safetensors" "$WORK/out_sce/model.safetensors" && fail "model_stock == sce"

# slerp t = 0 is the base and t = 1 the model, byte for byte (a one-model
# linear merge with weight 1 writes the model's own values)
for t in 0 1; do
  src=$([ "$t" = 0 ] && echo base || echo ft1)
  printf 'merge_method: slerp\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\nparameters: {t: %s}\n' "$t" > "$WORK/slerp_t$t.yml"
  printf 'merge_method: linear\nmodels:\n  - model: ./models/%s\n    parameters: {weight: 1}\n' "$src" > "$WORK/copy_t$t.yml"
  "$MS_BIN" merge "$WORK/slerp_t$t.yml" -o "$WORK/o_slerp_t$t" --quiet 2>/dev/null
  "$MS_BIN" merge "$WORK/copy_t$t.yml" -o "$WORK/o_copy_t$t" --quiet 2>/dev/null
  same_bytes "$WORK/o_copy_t$t" "$WORK/o_slerp_t$t"
done

# a published nuslerp recipe as written (the base listed with a weight,
# leftover normalize / int8_mask): mergekit ignores the leftovers, so do we,
# with one warning each, and the result is the plain recipe's
write_recipe nuslerp_published <<'EOR'
models:
  - model: ./models/ft1
    parameters:
      weight: 0.4
  - model: ./models/ft2
    parameters:
      weight: 0.6
  - model: ./models/base
    parameters:
      weight: 1.0
merge_method: nuslerp
base_model: ./models/base
parameters:
  normalize: true
  int8_mask: true
EOR
"$MS_BIN" merge "$WORK/nuslerp_published.yml" -o "$WORK/out_nuslerp_published" --quiet 2> "$WORK/warn.txt"
grep -q "nuslerp_published.yml:14: parameter 'normalize' in parameters is not used by merge_method 'nuslerp': ignored" \
  "$WORK/warn.txt" || { cat "$WORK/warn.txt" >&2; fail "no warning for an ignored parameter"; }
same_bytes "$WORK/out_nuslerp" "$WORK/out_nuslerp_published"

# same bytes: 1 thread and pread; O_DIRECT reads (--direct-io)
for m in slerp model_stock sce arcee_fusion nuslerp_cols karcher; do
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/t1_$m" --threads 1 --io pread --quiet
  same_bytes "$WORK/out_$m" "$WORK/t1_$m"
  evict_cache "$WORK/models"
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/direct_$m" --direct-io --quiet
  same_bytes "$WORK/out_$m" "$WORK/direct_$m"
done

# chunked == whole-tensor bytes: "small" models (512 KB embeddings) through
# the smallest budget the merge accepts (the kernel scratch and statistics
# differ by method and sit outside the staging pool): the large tensors are
# cut into row chunks, so every statistics pass runs over several chunks
S="$WORK/small"
"$MS_GEN" base "$S/models/base" --preset small --dtype bf16 --seed 41
"$MS_GEN" finetune "$S/models/base" "$S/models/ft1" --seed 42
"$MS_GEN" finetune "$S/models/base" "$S/models/ft2" --seed 43 --dtype f16
"$MS_GEN" finetune "$S/models/base" "$S/models/ft3" --seed 44 --dtype f32 --touched-fraction 0.3
for m in $ALL; do
  cp "$WORK/$m.yml" "$S/$m.yml"
  "$MS_BIN" merge "$S/$m.yml" -o "$S/whole_$m" --quiet
  done_m=
  for mb in $(seq 26 44); do
    rc=0
    "$MS_BIN" merge "$S/$m.yml" -o "$S/chunked_$m" --max-memory ${mb}M --threads 2 --json --quiet \
      > "$S/chunked.json" 2> "$S/chunked.err" || rc=$?
    if [ "$rc" -ne 0 ]; then
      grep -q "max-memory is too small" "$S/chunked.err" || { cat "$S/chunked.err" >&2; fail "$m: ${mb}M"; }
      rm -rf "$S/chunked_$m"
      continue
    fi
    grep -qE '"tensors_chunked":[[:space:]]*0,' "$S/chunked.json" && fail "$m: --max-memory ${mb}M chunked nothing"
    same_bytes "$S/whole_$m" "$S/chunked_$m"
    done_m=1
    break
  done
  [ -n "$done_m" ] || fail "$m: no budget from 26M to 44M was accepted"
done

# recipe errors: exit 2, one line naming the key and its line
err_recipe() { # NAME TEXT
  printf '%b' "$2" > "$WORK/$1.yml"
}
err_recipe e_count 'merge_method: slerp\nbase_model: ./models/base\nparameters: {t: 0.5}\nmodels:\n  - model: ./models/ft1\n  - model: ./models/ft2\n'
expect_fail 2 "e_count.yml:4: merge_method 'slerp' merges exactly two models, one of them the base_model" \
  "$MS_BIN" merge "$WORK/e_count.yml" -o "$WORK/e1"
err_recipe e_not 'merge_method: slerp\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\n'
expect_fail 2 "e_not.yml:1: merge_method 'slerp' needs parameter 't'" "$MS_BIN" merge "$WORK/e_not.yml" -o "$WORK/e2"
err_recipe e_t 'merge_method: slerp\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\nparameters:\n  t: [0, 1.2]\n'
expect_fail 2 "e_t.yml:6: 't' 1.2 in parameters is out of range" "$MS_BIN" merge "$WORK/e_t.yml" -o "$WORK/e3"
err_recipe e_near 'merge_method: nearswap\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\nparameters:\n  t: 0\n'
expect_fail 2 "e_near.yml:6: 't' 0 .*\\(0, FLT_MAX\\]" "$MS_BIN" merge "$WORK/e_near.yml" -o "$WORK/e4"
err_recipe e_eps 'merge_method: ram\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\n    parameters:\n      epsilon: 1.5\n'
expect_fail 2 "e_eps.yml:6: 'epsilon' 1.5" "$MS_BIN" merge "$WORK/e_eps.yml" -o "$WORK/e5"
err_recipe e_stock 'merge_method: model_stock\nbase_model: ./models/base\nmodels:\n  - model: ./models/base\n  - model: ./models/ft1\n'
expect_fail 2 "e_stock.yml:3: merge_method 'model_stock' needs at least 2 models" \
  "$MS_BIN" merge "$WORK/e_stock.yml" -o "$WORK/e6"
err_recipe e_nus 'merge_method: nuslerp\nmodels:\n  - model: ./models/ft1\n    parameters: {weight: 1}\n'
expect_fail 2 "e_nus.yml:2: merge_method 'nuslerp' merges exactly 2 models" "$MS_BIN" merge "$WORK/e_nus.yml" -o "$WORK/e7"
err_recipe e_iter 'merge_method: karcher\nmodels:\n  - model: ./models/ft1\n  - model: ./models/ft2\nparameters: {max_iter: 2.5}\n'
expect_fail 2 "e_iter.yml:5: 'max_iter' .*integer" "$MS_BIN" merge "$WORK/e_iter.yml" -o "$WORK/e8"
err_recipe e_w 'merge_method: model_stock\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\n    parameters: {wieght: 1}\n  - model: ./models/ft2\n'
expect_fail 2 "e_w.yml:5: unknown key 'wieght'" \
  "$MS_BIN" merge "$WORK/e_w.yml" -o "$WORK/e9"
err_recipe e_filt 'merge_method: slerp\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\nparameters:\n  t:\n    - filter: mlp\n      value: 0.5\n'
expect_fail 2 "e_filt.yml:6: no t on tensor" "$MS_BIN" merge "$WORK/e_filt.yml" -o "$WORK/e10"
for i in 1 2 3 4 5 6 7 8 9 10; do
  ls "$WORK/e$i" 2>/dev/null | grep -q safetensors && fail "a failed merge left a shard in e$i"
done
echo "merge_methods: ok"
