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

# --no-verify skips the final re-read only: the same bytes, and a later
# `mergestream verify` passes
"$MS_BIN" merge "$WORK/vocab.yml" -o "$WORK/out_noverify" --no-verify --quiet 2>/dev/null
same_bytes "$WORK/out_vocab" "$WORK/out_noverify"
"$MS_BIN" verify "$WORK/out_noverify" --quiet || fail "verify after --no-verify"
# --resume and --force together: a usage error, the output untouched
expect_fail 2 "merge: --resume and --force exclude each other" \
  "$MS_BIN" merge "$WORK/vocab.yml" -o "$WORK/out_vocab" --resume --force
"$MS_BIN" verify "$WORK/out_vocab" --quiet || fail "a refused --resume --force changed the output"

# a disk too small for the output (here a file size limit): the space is
# reserved before any work, so the run fails at once and leaves no directory
rc=0
(ulimit -f 100; trap '' XFSZ; exec "$MS_BIN" merge "$WORK/vocab.yml" -o "$WORK/o_small") 2> "$WORK/small.err" || rc=$?
[ "$rc" -eq 1 ] && grep -q "o_small/model.safetensors.partial: cannot reserve [0-9]* bytes" "$WORK/small.err" ||
  { cat "$WORK/small.err"; fail "a too-small disk: exit $rc"; }
[ ! -e "$WORK/o_small" ] || fail "a failed reservation left $(ls "$WORK/o_small")"

# --resume after an interrupted merge. The state a kill leaves is built
# without a kill: the journal of a complete run (a hard link made before the
# run truncates and then removes it) cut after some records, and those
# records' shards.
run7() { "$MS_BIN" merge "$WORK/vocab.yml" -o "$1" --out-shard-size 40K "${@:2}"; } # 7 shards
run7 "$WORK/ref7" --quiet 2>/dev/null
mkdir "$WORK/jr"; touch "$WORK/jr/mergestream.journal"; ln "$WORK/jr/mergestream.journal" "$WORK/journal"
run7 "$WORK/jr" --force --quiet 2>/dev/null
[ "$(grep -c '^shard ' "$WORK/journal")" -eq 7 ] || fail "could not capture the journal of a complete run"
interrupted() { # DIR LINES...: DIR with those journal lines (1 = header) and their records' shards
  local d=$1 l; shift; mkdir "$d"
  for l in "$@"; do sed -n "${l}p" "$WORK/journal"; done > "$d/mergestream.journal"
  for l in "$@"; do [ "$l" -gt 1 ] && cp "$WORK/ref7/$(sed -n "${l}p" "$WORK/journal" | cut -d' ' -f3)" "$d/"; done
  partial="$(sed -n 8p "$WORK/journal" | cut -d' ' -f3).partial"
  echo junk > "$d/$partial" # the last shard, half written when the kill came
}
resumed() { # DIR KEPT: --resume ends with the uninterrupted bytes, having kept KEPT shards
  run7 "$1" --resume 2> "$WORK/resume.err" || { cat "$WORK/resume.err"; fail "--resume of $1 failed"; }
  grep -q "resuming: kept $2 of 7 shards" "$WORK/resume.err" || { cat "$WORK/resume.err"; fail "$1: not $2 shards kept"; }
  same_bytes "$WORK/ref7" "$1"
  [ ! -e "$1/mergestream.journal" ] && [ ! -e "$1/$partial" ] ||
    fail "$1: left $(ls "$1")"
}
# a kept shard changed on disk since (two bytes of its last tensor): a
# warning naming it, and it is redone
interrupted "$WORK/res_changed" 1 2 3 4
changed=$(sed -n 3p "$WORK/journal" | cut -d' ' -f3)
printf '\125\252' | dd of="$WORK/res_changed/$changed" bs=1 seek="$(( $(stat -c %s "$WORK/res_changed/$changed") - 10 ))" \
  conv=notrunc status=none
resumed "$WORK/res_changed" 2
grep -q "res_changed/$changed: does not match the journal any more: redoing it" "$WORK/resume.err" ||
  { cat "$WORK/resume.err"; fail "no warning for the changed shard"; }
# garbage and a torn last record (a kill mid-append) are ignored, though
# the torn record's shard is there
interrupted "$WORK/res_torn" 1 2 3
{ echo "shard 9 garbage"; echo "not a record"; sed -n 5p "$WORK/journal"; sed -n 6p "$WORK/journal" | head -c 70; } \
  >> "$WORK/res_torn/mergestream.journal"
cp "$WORK/ref7/$(sed -n 5p "$WORK/journal" | cut -d' ' -f3)" "$WORK/ref7/$(sed -n 6p "$WORK/journal" | cut -d' ' -f3)" \
  "$WORK/res_torn/"
resumed "$WORK/res_torn" 3

# models without config.json: the layer count comes from the tensor names, so a
# weight gradient over the layers gives the bytes it gives with config.json
for m in base ft1; do cp -r "$M/$m" "$M/${m}_nc"; rm "$M/${m}_nc/config.json"; done
for nc in "" _nc; do
  printf 'merge_method: linear\nmodels:\n  - model: ./models/base%s\n    parameters: {weight: [0.1, 0.9]}\n  - model: ./models/ft1%s\n    parameters: {weight: 0.5}\n' \
    "$nc" "$nc" > "$WORK/grad$nc.yml"
  "$MS_BIN" merge "$WORK/grad$nc.yml" -o "$WORK/out_grad$nc" --quiet
done
same_bytes "$WORK/out_grad" "$WORK/out_grad_nc"

# linear weights that sum to 0 on some tensor (with normalize, the default):
# exit 2 naming the tensor before anything is written; normalize: false merges
printf 'merge_method: linear\nmodels:\n  - model: ./models/ft1\n    parameters: {weight: 1}\n  - model: ./models/base\n    parameters:\n      weight: [{filter: mlp, value: -1}, {value: 0.5}]\n' > "$WORK/wsum0.yml"
expect_fail 2 "wsum0.yml:3: the weights of merge_method 'linear' sum to 0 on tensor 'model.layers.0.mlp.*normalize: false" \
  "$MS_BIN" merge "$WORK/wsum0.yml" -o "$WORK/o_wsum0"
[ -e "$WORK/o_wsum0" ] && fail "the zero-sum recipe left an output directory"
echo "parameters: {normalize: false}" >> "$WORK/wsum0.yml"
"$MS_BIN" merge "$WORK/wsum0.yml" -o "$WORK/o_wsum0" --quiet 2> "$WORK/wsum0.err"
grep -q "NaN/Inf" "$WORK/wsum0.err" && fail "normalize: false still produced NaN/Inf"

# tokenizer_source with a larger vocabulary than the embeddings merged: said once
printf 'merge_method: ties\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\n    parameters: {weight: 0.5, density: 0.5}\ntokenizer_source: ./models/ft2\n' > "$WORK/tokv.yml"
"$MS_BIN" merge "$WORK/tokv.yml" -o "$WORK/o_tokv" --quiet 2> "$WORK/tokv.err"
grep -q "tokenizer_source .*/models/ft2 has vocab_size 264 but the merged embeddings have 256 rows" "$WORK/tokv.err" ||
  { cat "$WORK/tokv.err"; fail "no vocab mismatch warning"; }
# a directory with both model.safetensors and a sharded index: the single
# file is read, as transformers reads it, with one warning
cp -r "$M/base" "$WORK/both"
"$MS_BIN" merge <(printf 'merge_method: passthrough\nmodels:\n  - model: %s\n' "$M/ft1") -o "$WORK/ft1_copy" --quiet
cp "$WORK/ft1_copy/model.safetensors" "$WORK/both/model.safetensors"
"$MS_BIN" inspect "$WORK/both" --hash 2> "$WORK/both.err" | grep '^model' > "$WORK/both.h"
"$MS_BIN" inspect "$WORK/ft1_copy" --hash | grep '^model' | diff - "$WORK/both.h" > /dev/null ||
  fail "with both files present, the index was read"
grep -q "holds both model.safetensors and model.safetensors.index.json: reading model.safetensors" "$WORK/both.err" ||
  { cat "$WORK/both.err"; fail "no warning for both files"; }
# a model with a tensor the base lacks (here lm_head beside a tied base): one line, it is not written
"$MS_GEN" base "$M/tied" --preset tiny --dtype bf16 --seed 1 --tie-embeddings
printf 'merge_method: task_arithmetic\nbase_model: ./models/tied\nmodels:\n  - model: ./models/ft1\n    parameters: {weight: 0.5}\n' > "$WORK/extra.yml"
"$MS_BIN" merge "$WORK/extra.yml" -o "$WORK/o_extra" --quiet 2> "$WORK/extra.err"
grep -q "models\[0\] ('./models/ft1') has 1 tensor .*models/tied lacks (the first 'lm_head.weight'): it is not in the output" \
  "$WORK/extra.err" || { cat "$WORK/extra.err"; fail "no line for the tensor the base lacks"; }
echo "merge_edge_cases: ok"
