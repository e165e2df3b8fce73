# merge as a user runs it: every method on generated bf16 models, verify,
# reproducibility across reruns, threads, memory budgets and I/O engines,
# and the recipe and input errors a user meets.
source "$(dirname "$0")/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset tiny --dtype bf16 --seed 1
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 2
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 3 --dtype f16
"$MS_GEN" finetune "$M/base" "$M/ft3" --seed 4 --dtype f32

recipe() { # recipe FILE METHOD EXTRA_MODEL_PARAMS EXTRA_TOP
  cat > "$1" <<EOR
merge_method: $2
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.5 $3}
  - model: ./models/ft2
    parameters: {weight: [0.2, 0.7] $3}
  - model: ./models/ft3
    parameters: {weight: -0.3 $3}
$4
random_seed: 7
EOR
}

recipe "$WORK/ties.yml" ties ", density: 0.3" "dtype: bfloat16"
recipe "$WORK/dare_ties.yml" dare_ties ", density: 0.4" "out_dtype: float32"
recipe "$WORK/dare_linear.yml" dare_linear ", density: 0.5" "parameters: {lambda: 0.8}"
recipe "$WORK/task_arithmetic.yml" task_arithmetic "" "dtype: float16"
recipe "$WORK/breadcrumbs.yml" breadcrumbs ", density: 0.6, gamma: 0.05" ""
recipe "$WORK/breadcrumbs_ties.yml" breadcrumbs_ties ", density: 0.6, gamma: 0.05" ""
recipe "$WORK/della.yml" della ", density: 0.5, epsilon: 0.1" ""
recipe "$WORK/della_linear.yml" della_linear ", density: 0.5, epsilon: 0.1" ""
cat > "$WORK/linear.yml" <<EOR
merge_method: linear
models:
  - model: ./models/ft1
    parameters: {weight: 1.0}
  - model: ./models/ft2
    parameters: {weight: 3.0}
dtype: bfloat16
EOR

for m in ties dare_ties dare_linear task_arithmetic breadcrumbs breadcrumbs_ties della della_linear linear; do
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/out_$m" --quiet
  "$MS_BIN" verify "$WORK/out_$m" --quiet
  [ -f "$WORK/out_$m/config.json" ] && [ -f "$WORK/out_$m/tokenizer.json" ] || fail "$m: side files missing"
  grep -qE '"merge_method":[[:space:]]*"'$m'"' "$WORK/out_$m/mergestream.json" || fail "$m: manifest"
done
grep -qE '"torch_dtype":[[:space:]]*"float32"' "$WORK/out_dare_ties/config.json" || fail "config.json torch_dtype not updated"

# same bytes: a rerun, 1 vs 2 threads, a budget small enough to chunk, pread vs io_uring, sharded output
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/rerun" --quiet
same_bytes "$WORK/out_ties" "$WORK/rerun"
for m in ties dare_ties breadcrumbs della; do
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/t1_$m" --threads 1 --io pread --quiet
  same_bytes "$WORK/out_$m" "$WORK/t1_$m"
done
# chunked == whole-tensor bytes: "small" models (512 KB embeddings) through a
# 30M less the fixed allowance and the kernel scratch must be cut into chunks
S="$WORK/small"
"$MS_GEN" base "$S/models/base" --preset small --dtype bf16 --seed 11
"$MS_GEN" finetune "$S/models/base" "$S/models/ft1" --seed 12
"$MS_GEN" finetune "$S/models/base" "$S/models/ft2" --seed 13 --dtype f16
"$MS_GEN" finetune "$S/models/base" "$S/models/ft3" --seed 14 --dtype f32
for m in ties dare_ties breadcrumbs_ties della; do
  cp "$WORK/$m.yml" "$S/$m.yml"
  "$MS_BIN" merge "$S/$m.yml" -o "$S/whole_$m" --quiet
  "$MS_BIN" merge "$S/$m.yml" -o "$S/chunked_$m" --max-memory 30M --threads 2 --json --quiet > "$S/chunked.json"
  grep -qE '"tensors_chunked":[[:space:]]*0,' "$S/chunked.json" && fail "$m: --max-memory 30M chunked nothing"
  # --dry-run foresees the same chunking
  "$MS_BIN" merge "$S/$m.yml" --dry-run --max-memory 30M --threads 2 --json > "$S/dry.json"
  [ "$(grep -oE '"tensors_chunked":[[:space:]]*[0-9]+' "$S/dry.json" | grep -oE '[0-9]+$')" = \
    "$(grep -oE '"tensors_chunked":[[:space:]]*[0-9]+' "$S/chunked.json" | grep -oE '[0-9]+$')" ] ||
    fail "$m: --dry-run and the merge chunk different tensors"
  same_bytes "$S/whole_$m" "$S/chunked_$m"
  # two compute workers (what a GPU gets), whole and chunked: jobs interleave
  # in the write queue, the bytes and hashes may not change
  MERGESTREAM_COMPUTE_WORKERS=2 "$MS_BIN" merge "$S/$m.yml" -o "$S/w2_$m" --json --quiet > "$S/w2.json"
  grep -qE '"compute_workers":[[:space:]]*2,' "$S/w2.json" || fail "$m: MERGESTREAM_COMPUTE_WORKERS=2 ran one worker"
  same_bytes "$S/whole_$m" "$S/w2_$m"
  MERGESTREAM_COMPUTE_WORKERS=2 "$MS_BIN" merge "$S/$m.yml" -o "$S/w2c_$m" --max-memory 30M --threads 2 --quiet
  same_bytes "$S/whole_$m" "$S/w2c_$m"
  "$MS_BIN" verify "$S/w2c_$m" --quiet
done
# A tensor in row chunks reads every chunk again for each pass. When HIST_HI's
# capture finds ties' threshold, HIST_LO has nothing left to do and its chunks
# are not read: at 34M with two threads (each worker's scratch comes out of
# the pool) the embeddings (2^18 elements) are in chunks and there is room to
# capture.
"$MS_BIN" merge "$S/ties.yml" -o "$S/once_less" --device cpu --max-memory 34M --threads 2 --json --quiet > "$S/once.json"
"$MS_BIN" merge "$S/ties.yml" --dry-run --device cpu --max-memory 34M --threads 2 --json > "$S/once_dry.json"
[ "$(json_num "$S/once.json" tensors_chunked_read_once_less)" -ge 1 ] ||
  fail "ties at 34M: no tensor in row chunks skipped HIST_LO's reads"
# the captures' memory comes out of the pool, but never so much that another
# tensor is cut into chunks (it would read them once per pass): the two
# embeddings only, as without captures
[ "$(json_num "$S/once.json" tensors_chunked)" -eq 2 ] ||
  fail "ties at 34M: the captures cut more tensors than the embeddings into row chunks"
[ "$(json_num "$S/once.json" bytes_read)" -lt "$(json_num "$S/once_dry.json" bytes_to_read)" ] ||
  fail "ties at 34M: read as much as planned although HIST_LO was skipped"
[ "$(json_num "$S/once.json" bytes_read)" -eq "$(json_num "$S/once_dry.json" bytes_to_read_at_least)" ] ||
  fail "ties at 34M: read more than --dry-run's bytes_to_read_at_least (every tensor in chunks captures here)"
same_bytes "$S/whole_ties" "$S/once_less"
# --direct-io: every tensor read once, whole, comes with O_DIRECT (the
# blocks around it, into the pool), the embeddings in row chunks through the
# page cache; the same bytes with either engine. A file system refusing
# O_DIRECT (MERGESTREAM_DIRECT_REFUSE=1 pretends so) costs one line per file
# and nothing else; so does a file already in the page cache. Without the
# option nothing is read with O_DIRECT.
evict_cache "$S/models"
"$MS_BIN" merge "$S/ties.yml" -o "$S/direct" --max-memory 34M --threads 2 --direct-io --json > "$S/direct.json" 2> "$S/direct.err"
if grep -qE "cannot read it with O_DIRECT|already in the page cache" "$S/direct.err"; then
  echo "note: O_DIRECT refused here, or the page cache kept the inputs: the direct reads are not checked"
else
  [ "$(json_num "$S/direct.json" bytes_read_direct)" -gt 0 ] || fail "--direct-io read nothing with O_DIRECT"
  [ "$(json_num "$S/direct.json" bytes_read_direct)" -lt "$(json_num "$S/direct.json" bytes_read)" ] ||
    fail "--direct-io at 34M read the embeddings' row chunks with O_DIRECT too"
  grep -q "GB with O_DIRECT)" "$S/direct.err" || fail "the summary does not say how much was read with O_DIRECT"
fi
same_bytes "$S/whole_ties" "$S/direct"
evict_cache "$S/models"
"$MS_BIN" merge "$S/dare_ties.yml" -o "$S/direct_pread" --direct-io --io pread --quiet
same_bytes "$S/whole_dare_ties" "$S/direct_pread"
evict_cache "$S/models"
MERGESTREAM_DIRECT_REFUSE=1 "$MS_BIN" merge "$S/ties.yml" -o "$S/refused" --direct-io --json > "$S/refused.json" \
  2> "$S/refused.err"
grep -q "already in the page cache" "$S/refused.err" ||
  [ "$(grep -c "cannot read it with O_DIRECT" "$S/refused.err")" -eq 4 ] || fail "a refused O_DIRECT: not one line per input file"
[ "$(json_num "$S/refused.json" bytes_read_direct)" -eq 0 ] || fail "O_DIRECT refused, yet bytes read with it"
same_bytes "$S/whole_ties" "$S/refused"
cat "$S"/models/*/*.safetensors > /dev/null
"$MS_BIN" merge "$S/ties.yml" -o "$S/cached" --direct-io --json > "$S/cached.json" 2> "$S/cached.err"
grep -q -- "--direct-io: 4 input files are already in the page cache, read through it" "$S/cached.err" ||
  fail "--direct-io on cached inputs: no line saying they are read through the page cache"
[ "$(json_num "$S/cached.json" bytes_read_direct)" -eq 0 ] || fail "--direct-io read cached inputs from the disk"
[ "$(json_num "$S/once.json" bytes_read_direct)" -eq 0 ] || fail "read with O_DIRECT without --direct-io"
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/sharded" --out-shard-size 40KB --json > "$WORK/sharded.json"
[ -f "$WORK/sharded/model.safetensors.index.json" ] || fail "no index for a sharded output"
"$MS_BIN" verify "$WORK/sharded" --quiet
# the shards committed during the run were read back then, while cached,
# and the final verify took those hashes (pipeline/shard_check.h); the
# thread that reads them may not get to one on a loaded machine before the
# run ends, so up to three runs
n_shards=$(ls "$WORK"/sharded/model-*.safetensors | wc -l)
[ "$(json_num "$WORK/sharded.json" shards_verified)" -eq "$n_shards" ] || fail "the final verify did not see every shard"
[ "$n_shards" -ge 4 ] || fail "only $n_shards shards"
for try in 1 2 3; do
  [ "$(json_num "$WORK/sharded.json" shards_read_back_early)" -ge 1 ] && break
  [ "$try" -lt 3 ] || fail "none of $n_shards shards was read back during three runs"
  rm -rf "$WORK/sharded"
  "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/sharded" --out-shard-size 40KB --json > "$WORK/sharded.json"
done
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/sharded_nv" --out-shard-size 40KB --no-verify --json > "$WORK/nv.json"
grep -q '"verify_seconds":[[:space:]]*null' "$WORK/nv.json" || fail "--no-verify, yet a verify time"
same_bytes "$WORK/sharded" "$WORK/sharded_nv"
# the seed changes DARE's mask
"$MS_BIN" merge "$WORK/dare_ties.yml" -o "$WORK/seed8" --random-seed 8 --quiet
cmp -s "$WORK/out_dare_ties/model.safetensors" "$WORK/seed8/model.safetensors" && fail "--random-seed had no effect"
# a seed past 2^64 - 1 is an error, not silently the largest seed
expect_fail 2 "random-seed: expected an integer 0..2\^64-1, got '18446744073709551616'" \
  "$MS_BIN" merge "$WORK/dare_ties.yml" -o "$WORK/seedbig" --random-seed 18446744073709551616

# verify catches a changed tensor, naming the first one in file order
corrupt() { printf '\377\177' | dd of="$1/model.safetensors" bs=1 seek="$2" conv=notrunc status=none; }
cp -r "$WORK/out_ties" "$WORK/corrupt"
corrupt "$WORK/corrupt" $(( $(offset_of "$WORK/corrupt" model.layers.1.mlp.down_proj.weight) + 6 ))
expect_fail 3 "tensor 'model.layers.1.mlp.down_proj.weight' has XXH3" "$MS_BIN" verify "$WORK/corrupt"
corrupt "$WORK/corrupt" $(( $(offset_of "$WORK/corrupt" model.layers.0.self_attn.q_proj.weight) + 100 ))
expect_fail 3 "tensor 'model.layers.0.self_attn.q_proj.weight' has XXH3" "$MS_BIN" verify "$WORK/corrupt"

# output directory rules
expect_fail 2 "not empty.*--force" "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/out_ties"
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/out_ties" --force --quiet
# a file where DIR should be: exit 2 naming it
: > "$WORK/a_file"
expect_fail 2 "a_file: exists and is not a directory" "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/a_file" --force
# a model whose config.json is not a JSON object: exit 3 naming the file
cp -r "$M/ft1" "$WORK/models/ft_badcfg"
echo '[1, 2]' > "$WORK/models/ft_badcfg/config.json"
printf 'merge_method: passthrough\nmodels:\n  - model: ./models/ft_badcfg\n' > "$WORK/badcfg.yml"
expect_fail 3 "ft_badcfg/config.json: not a JSON object" "$MS_BIN" merge "$WORK/badcfg.yml" -o "$WORK/o_badcfg"
# an input's directory as the output: refused, even with --force, and the input untouched
cp -r "$M/ft1" "$WORK/ft1_before"
expect_fail 2 "holds an input \(model '.*ft1'\).*choose another -o" \
  "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/models/ft1/." --force
same_bytes "$WORK/ft1_before" "$M/ft1"
expect_fail 2 "holds an input \(model '.*base'\)" "$MS_BIN" merge "$WORK/ties.yml" -o "$M/base" --resume
# --force leaves nothing of the earlier merge: a tokenizer file the new
# tokenizer source lacks is gone
cp -r "$M/ft1" "$WORK/tok_src"
echo '{"<x>": 256}' > "$WORK/tok_src/added_tokens.json"
{ cat "$WORK/ties.yml"; echo "tokenizer_source: ./tok_src"; } > "$WORK/tok.yml"
"$MS_BIN" merge "$WORK/tok.yml" -o "$WORK/out_tok" --quiet
[ -f "$WORK/out_tok/added_tokens.json" ] || fail "tokenizer_source: added_tokens.json not copied"
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/out_tok" --force --quiet
[ -f "$WORK/out_tok/added_tokens.json" ] && fail "--force left the earlier merge's added_tokens.json"
"$MS_BIN" verify "$WORK/out_tok" --quiet
# missing parent directories of -o are created
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/deep/er/out" --quiet
"$MS_BIN" verify "$WORK/deep/er/out" --quiet

# --dry-run: the plan, nothing read or written (not even with -o); recipe
# errors still fail
"$MS_BIN" merge "$WORK/ties.yml" --dry-run --json > "$WORK/dry.json"
grep -qE '"dry_run":[[:space:]]*true' "$WORK/dry.json" || fail "--dry-run: no dry_run in the JSON"
[ "$(grep -c '"action":' "$WORK/dry.json")" -eq "$(grep -oE '"tensors":[[:space:]]*[0-9]+' "$WORK/dry.json" | grep -oE '[0-9]+$')" ] ||
  fail "--dry-run: one jobs entry per tensor"
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/dry_out" --dry-run 2> "$WORK/dry.err"
grep -q "dry run: ties over 3 models: .*nothing was read or written" "$WORK/dry.err" || { cat "$WORK/dry.err"; fail "--dry-run summary"; }
[ ! -e "$WORK/dry_out" ] || fail "--dry-run created the output directory"
# ... and refuses what the real run would: a non-empty -o without --force, an input's directory
expect_fail 2 "not empty.*--force" "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/out_ties" --dry-run
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/out_ties" --dry-run --force 2> /dev/null
expect_fail 2 "holds an input" "$MS_BIN" merge "$WORK/ties.yml" -o "$M/ft1" --dry-run --force

# recipe errors: exit 2 naming the key and line
printf 'merge_method: passthrough\nmodels:\n  - model: ~/no_such_model\n' > "$WORK/tilde.yml"
expect_fail 2 "tilde.yml:3: model path '~/no_such_model' does not exist: '~' is not expanded" \
  "$MS_BIN" merge "$WORK/tilde.yml" -o "$WORK/o1"
printf 'merge_method: ties\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\n    parameters: {weight: 1, densty: 0.2}\n' > "$WORK/typo.yml"
expect_fail 2 "typo.yml:5: .*densty" "$MS_BIN" merge "$WORK/typo.yml" -o "$WORK/o1"
printf 'merge_method: tiez\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\n    parameters: {weight: 1}\n' > "$WORK/method.yml"
expect_fail 2 "method.yml:1: .*tiez" "$MS_BIN" merge "$WORK/method.yml" -o "$WORK/o2"
expect_fail 2 "method.yml:1: .*tiez" "$MS_BIN" merge "$WORK/method.yml" --dry-run
printf 'merge_method: ties\nbase_model: ./models/base\nmodels:\n  - model: meta-llama/Llama-3.2-1B\n    parameters: {weight: 1}\n' > "$WORK/hub.yml"
expect_fail 2 "hub.yml:4: .*does not download" "$MS_BIN" merge "$WORK/hub.yml" -o "$WORK/o3"
[ ! -e "$WORK/o1" ] && [ ! -e "$WORK/o2" ] && [ ! -e "$WORK/o3" ] || fail "a failed merge left an output directory"

# input errors: exit 3 naming the file and the tensor
"$MS_GEN" base "$M/other" --preset tiny --dtype bf16 --seed 9 --hidden 32
printf 'merge_method: ties\nbase_model: ./models/base\nmodels:\n  - model: ./models/other\n    parameters: {weight: 1, density: 0.5}\n' > "$WORK/shape.yml"
expect_fail 3 "models/other: tensor 'model.embed_tokens.weight' has shape" "$MS_BIN" merge "$WORK/shape.yml" -o "$WORK/o4"
ls "$WORK/o4" 2>/dev/null | grep -q safetensors && fail "a failed merge left a shard"

# --device cuda where no GPU is usable: one line, exit 1 (skipped on a GPU machine)
if ! nvidia-smi -L >/dev/null 2>&1; then
  expect_fail 1 "--device cuda: no usable GPU" "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/o6" --device cuda
  expect_fail 1 "--device cuda: no usable GPU" "$MS_BIN" merge "$WORK/ties.yml" "$WORK/o6" --cuda # mergekit's flag
  [ ! -e "$WORK/o6" ] || fail "a failed --device cuda merge left its output directory"
fi

# progress on a terminal (script(1) gives the merge a pseudo-terminal): the
# merge's line per tensor ("[N/N] NAME cpu GB/s ETA"), then the final
# verify's ("hash"); --quiet prints neither
if command -v script >/dev/null; then
  script -qec "$MS_BIN merge $WORK/ties.yml -o $WORK/tty --max-memory 64M" /dev/null > "$WORK/tty.log" 2>&1 \
    || fail "merge on a terminal: $(tail -3 "$WORK/tty.log")"
  n=$("$MS_BIN" inspect "$WORK/tty" --json | grep -c '"dtype"')
  grep -qE "\[ *$n/$n\] .* (cpu|cuda) .*ETA" "$WORK/tty.log" || fail "no merge progress line for $n tensors"
  grep -qE "\[ *$n/$n\] .* hash .*ETA" "$WORK/tty.log" || fail "no verify progress line"
  script -qec "$MS_BIN merge $WORK/ties.yml -o $WORK/tty --force --quiet" /dev/null > "$WORK/tty_quiet.log" 2>&1
  grep -q "ETA" "$WORK/tty_quiet.log" && fail "--quiet printed progress"
fi

# usage errors
expect_fail 2 "-o DIR is required" "$MS_BIN" merge "$WORK/ties.yml"
# options: one line naming the option; mergekit-yaml's flags get a hint
expect_fail 2 "merge: unknown option '--frobnicate'" "$MS_BIN" merge "$WORK/ties.yml" "$WORK/o9" --frobnicate
expect_fail 2 "unknown option '--lazy-unpickle' \(mergekit-yaml's: not needed here" \
  "$MS_BIN" merge "$WORK/ties.yml" "$WORK/o9" --lazy-unpickle
expect_fail 2 "option '--max-memory' needs a value" "$MS_BIN" merge "$WORK/ties.yml" "$WORK/o9" --max-memory
expect_fail 2 "option '--quiet' takes no value" "$MS_BIN" merge "$WORK/ties.yml" "$WORK/o9" --quiet=yes
expect_fail 2 "inspect: unknown option '-z'" "$MS_BIN" inspect "$WORK/ties.yml" -z
# mergekit-yaml's order, RECIPE DIR: the same merge as -o DIR
"$MS_BIN" merge "$WORK/ties.yml" "$WORK/positional" --max-memory 64M --quiet
same_bytes "$WORK/rerun" "$WORK/positional"
expect_fail 2 "not both" "$MS_BIN" merge "$WORK/ties.yml" "$WORK/o7" -o "$WORK/o8"
expect_fail 2 "expected RECIPE and -o DIR" "$MS_BIN" merge "$WORK/ties.yml" "$WORK/o7" "$WORK/o8"
expect_fail 2 "max-memory: bad size" "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/o5" --max-memory 12Q
expect_fail 2 "bad size '1B' \\(mergekit's 1B, a billion bytes, is 1GB here\\)" \
  "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/o5" --out-shard-size 1B
expect_fail 2 "max-memory is too small: this merge needs at least" \
  "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/o5" --max-memory 1M
expect_fail 2 "no_such.yml: cannot open the recipe" "$MS_BIN" merge "$WORK/no_such.yml" -o "$WORK/o5"
expect_fail 2 "gpu-lanes: expected 1 or 2" "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/o5" --gpu-lanes 3
expect_fail 2 "option '--direct-io' takes no value" "$MS_BIN" merge "$WORK/ties.yml" "$WORK/o9" --direct-io=on
"$MS_BIN" merge --help | grep -q "usage: mergestream merge" || fail "merge --help"
for c in merge inspect verify hessian perplexity; do
  "$MS_BIN" help $c | grep -q "usage: mergestream $c" || fail "help $c: not $c's help"
done
expect_fail 2 "unknown command 'nope'" "$MS_BIN" help nope
echo "merge_cli: ok"
