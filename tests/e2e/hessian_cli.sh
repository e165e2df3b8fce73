# hessian and perplexity as a user runs them: a generated tiny model, text
# calibration files, the output inspected; the spill file and batching give
# the statistics a run in RAM gives; BASE+ADAPTER gives what the merged model
# gives; bad inputs (mismatched or PiSSA adapters included) fail with one
# line and the documented exit code, leaving nothing behind.
source "$(dirname "$0")/lib.bash"

"$MS_GEN" base "$WORK/m" --preset tiny --dtype bf16 --seed 3 # vocab 256, hidden 64, 2 layers

# 9 samples of 3..30 random ids (deterministic), plus a blank line
RANDOM=42
tokens=0
for i in $(seq 1 9); do
  n=$((3 + RANDOM % 28)); line=""
  for j in $(seq 1 $n); do line="$line $((RANDOM % 256))"; done
  echo "$line"
  tokens=$((tokens + n))
  [ "$i" -eq 4 ] && echo ""
done > "$WORK/calib.txt"

# hessian: 9 tensors (4 per layer + lm_head), metadata with the counts
"$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/h" --batch-size 2 --quiet
[ -f "$WORK/h/hessians.safetensors" ] || fail "no hessians.safetensors"
"$MS_BIN" inspect "$WORK/h/hessians.safetensors" > "$WORK/inspect.txt"
grep -q "9 tensors" "$WORK/inspect.txt" || fail "expected 9 tensors"
grep -qE "^model.layers.1.mlp.down_proj +F32 +\[128, 128\]" "$WORK/inspect.txt" || fail "down_proj statistic"
grep -qE "^model.layers.0.self_attn.qkv_input +F32 +\[64, 64\]" "$WORK/inspect.txt" || fail "qkv statistic"
# the run's metadata (samples, tokens, model) read back without Python
grep -qx "metadata n_samples: 9" "$WORK/inspect.txt" || fail "inspect: no n_samples metadata"
grep -qx "metadata n_tokens: $tokens" "$WORK/inspect.txt" || fail "inspect: no n_tokens metadata"
"$MS_BIN" inspect "$WORK/h" --json | grep -qE '"n_samples":[[:space:]]*"9"' || fail "inspect --json: no metadata"
grep -qE "^lm_head +F32 +\[64, 64\]" "$WORK/inspect.txt" || fail "lm_head statistic"
# inspect also takes the output directory itself
"$MS_BIN" inspect "$WORK/h" | diff - "$WORK/inspect.txt" > /dev/null || fail "inspect DIR differs from inspect DIR/hessians.safetensors"
header=$(head -c 4096 "$WORK/h/hessians.safetensors" | tr -d '\0')
echo "$header" | grep -q "\"n_tokens\":\"$tokens\"" || fail "n_tokens is not $tokens"
echo "$header" | grep -q '"n_samples":"9"' || fail "n_samples is not 9"
echo "$header" | grep -q 'model.layers.0.self_attn.k_proj\\":\\"model.layers.0.self_attn.qkv_input' ||
  fail "hessian_map does not map k_proj"

# the same statistics whatever the memory budget (activations spilled to a
# file in DIR), in shards, with --json
"$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/h_spill" --batch-size 2 --max-memory 1K \
  --quiet 2>/dev/null
cmp -s "$WORK/h/hessians.safetensors" "$WORK/h_spill/hessians.safetensors" || fail "spilled run differs"
[ "$(ls -A "$WORK/h_spill" | wc -l)" -eq 1 ] || fail "the spill file was left behind"
"$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/h_shard" --out-shard-size 40K --json --quiet \
  > "$WORK/h.json"
grep -q '"n_tokens":	'"$tokens" "$WORK/h.json" || fail "--json n_tokens"
[ -f "$WORK/h_shard/hessians.safetensors.index.json" ] || fail "no index for a sharded output"
for f in "$WORK"/h_shard/hessians-*.safetensors; do "$MS_BIN" inspect "$f" >/dev/null || fail "bad shard $f"; done

# a second run into the same DIR needs --force
expect_fail 2 "already holds hessians.safetensors" \
  "$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/h"
"$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/h" --batch-size 2 --force --quiet
cmp -s "$WORK/h/hessians.safetensors" "$WORK/h_spill/hessians.safetensors" || fail "--force rerun differs"
# max_position_embeddings is checked against the real tokens, not the padded width
cp -r "$WORK/m" "$WORK/m_short"
sed -i 's/"max_position_embeddings":[^,]*/"max_position_embeddings": 32/' "$WORK/m_short/config.json"
seq 1 10 | tr '\n' ' ' > "$WORK/ten.txt"; echo >> "$WORK/ten.txt"
"$MS_BIN" perplexity "$WORK/m_short" --calib "$WORK/ten.txt" --seq-len 64 2> "$WORK/mp.err" > /dev/null
grep -q "max_position_embeddings" "$WORK/mp.err" && { cat "$WORK/mp.err"; fail "warned for padding past the model's positions"; }
seq 1 40 | tr '\n' ' ' > "$WORK/forty.txt"; echo >> "$WORK/forty.txt"
"$MS_BIN" perplexity "$WORK/m_short" --calib "$WORK/forty.txt" 2> "$WORK/mp.err" > /dev/null
grep -q "real tokens reach position 39, past max_position_embeddings (32)" "$WORK/mp.err" ||
  { cat "$WORK/mp.err"; fail "no warning for tokens past max_position_embeddings"; }
# a NaN in a weight: hessian names the first statistic it reaches, perplexity fails (exit 3)
cp -r "$WORK/m" "$WORK/m_nan"
printf '\xc0\x7f' | dd of="$WORK/m_nan/model.safetensors" bs=1 conv=notrunc status=none \
  seek="$(( $(offset_of "$WORK/m_nan" model.layers.0.mlp.down_proj.weight) + 20 ))"  # a bf16 NaN
"$MS_BIN" hessian "$WORK/m_nan" --calib "$WORK/calib.txt" -o "$WORK/h_nan" 2> "$WORK/nan.err"
grep -q "statistics hold NaN or Inf, the first 'model.layers.1" "$WORK/nan.err" || { cat "$WORK/nan.err"; fail "no NaN warning"; }
expect_fail 3 "m_nan: the mean NLL is nan" "$MS_BIN" perplexity "$WORK/m_nan" --calib "$WORK/calib.txt"
# --force keeps the earlier files until the new run has committed its own: a
# run that fails first (a bad calibration file, a missing model) loses nothing
cp "$WORK/h/hessians.safetensors" "$WORK/h_before.safetensors"
printf '1 2 x\n' > "$WORK/bad_calib.txt"
expect_fail 3 "bad_calib.txt" "$MS_BIN" hessian "$WORK/m" --calib "$WORK/bad_calib.txt" -o "$WORK/h" --force
expect_fail 3 "" "$MS_BIN" hessian "$WORK/no_such_model" --calib "$WORK/calib.txt" -o "$WORK/h" --force
cmp -s "$WORK/h/hessians.safetensors" "$WORK/h_before.safetensors" || fail "a failed --force run lost the Hessians"
# an interrupted run's .partial does not block the next run, which removes it;
# a --force run in another layout leaves none of the earlier shards or index
: > "$WORK/h_shard/hessians-00009-of-00009.safetensors.partial"
cp -r "$WORK/h_shard" "$WORK/h_relayout"
"$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/h_relayout" --batch-size 2 --force --quiet
[ "$(ls "$WORK/h_relayout" | grep -c hessians)" = 1 ] || fail "stale shards left: $(ls "$WORK/h_relayout")"
cmp -s "$WORK/h_relayout/hessians.safetensors" "$WORK/h_before.safetensors" || fail "relayout run differs"
mkdir "$WORK/h_partial"
: > "$WORK/h_partial/hessians.safetensors.partial"
"$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/h_partial" --quiet
[ "$(ls "$WORK/h_partial")" = hessians.safetensors ] || fail "after an interrupted run: $(ls "$WORK/h_partial")"

# perplexity: a number above 1, the same with --json; --seq-len and --max-samples
"$MS_BIN" perplexity "$WORK/m" --calib "$WORK/calib.txt" --quiet > "$WORK/ppl.txt"
grep -qE "^perplexity [0-9]+\.[0-9]+ " "$WORK/ppl.txt" || fail "perplexity output: $(cat "$WORK/ppl.txt")"
"$MS_BIN" perplexity "$WORK/m" --calib "$WORK/calib.txt" --json --quiet --max-samples 3 --seq-len 8 \
  > "$WORK/ppl.json"
grep -q '"n_samples":	3' "$WORK/ppl.json" || fail "--max-samples"
grep -q '"perplexity":' "$WORK/ppl.json" || fail "perplexity --json"

# MistralForCausalLM is the same network for this model
cp -r "$WORK/m" "$WORK/mistral"
sed -i 's/LlamaForCausalLM/MistralForCausalLM/; s/"model_type": *"llama"/"model_type": "mistral"/' \
  "$WORK/mistral/config.json"
"$MS_BIN" perplexity "$WORK/mistral" --calib "$WORK/calib.txt" --quiet > "$WORK/ppl_mistral.txt"
cmp -s "$WORK/ppl.txt" "$WORK/ppl_mistral.txt" || fail "Mistral and Llama disagree on the same weights"

# BASE+ADAPTER: a PEFT LoRA adapter applied on the fly gives the statistics
# and the perplexity of the merged model (linear, weight 1, F32 output: the
# base + delta the merge materialises), bit for bit. A plain LoRA on every
# projection; DoRA on projections and the embedding plus modules_to_save.
"$MS_GEN" lora "$WORK/m" "$WORK/ad" --seed 4 --rank 4 --alpha 8 --targets all-linear
"$MS_GEN" lora "$WORK/m" "$WORK/dora" --seed 5 --rank 3 --targets q_proj,down_proj --dora --embeddings \
  --modules-to-save lm_head,model.norm
tensor_data() { local n; n=$(od -An -t u8 -N8 "$1" | tr -d ' '); tail -c +$((n + 9)) "$1"; }
for a in ad dora; do
  printf 'merge_method: linear\nmodels:\n  - model: ./m+./%s\n    parameters: {weight: 1.0}\nout_dtype: float32\n' \
    "$a" > "$WORK/lin_$a.yml"
  "$MS_BIN" merge "$WORK/lin_$a.yml" -o "$WORK/merged_$a" --quiet
  "$MS_BIN" hessian "$WORK/m+$WORK/$a" --calib "$WORK/calib.txt" -o "$WORK/hl_$a" --batch-size 2 --quiet
  "$MS_BIN" hessian "$WORK/merged_$a" --calib "$WORK/calib.txt" -o "$WORK/hm_$a" --batch-size 2 --quiet
  cmp -s <(tensor_data "$WORK/hl_$a/hessians.safetensors") <(tensor_data "$WORK/hm_$a/hessians.safetensors") ||
    fail "$a: hessians of BASE+ADAPTER and of the merged model differ"
  cmp -s <(tensor_data "$WORK/hl_$a/hessians.safetensors") <(tensor_data "$WORK/h/hessians.safetensors") &&
    fail "$a: the adapter changed no statistic"
  "$MS_BIN" perplexity "$WORK/m+$WORK/$a" --calib "$WORK/calib.txt" --quiet > "$WORK/ppl_l_$a.txt"
  "$MS_BIN" perplexity "$WORK/merged_$a" --calib "$WORK/calib.txt" --quiet > "$WORK/ppl_m_$a.txt"
  cmp -s "$WORK/ppl_l_$a.txt" "$WORK/ppl_m_$a.txt" ||
    fail "$a: perplexity $(cat "$WORK/ppl_l_$a.txt") with the adapter, $(cat "$WORK/ppl_m_$a.txt") merged"
  cmp -s "$WORK/ppl_l_$a.txt" "$WORK/ppl.txt" && fail "$a: the adapter changed no perplexity"
done
head -c 4096 "$WORK/hl_ad/hessians.safetensors" | tr -d '\0' | grep -qF "\"model\":\"$WORK/m+$WORK/ad\"" ||
  fail "the metadata does not name BASE+ADAPTER"
# '+' inside both paths: split at the last '+' followed by an adapter directory
cp -r "$WORK/m" "$WORK/m+1"
cp -r "$WORK/ad" "$WORK/lora+v2"
"$MS_BIN" perplexity "$WORK/m+1+$WORK/lora+v2" --calib "$WORK/calib.txt" --quiet > "$WORK/ppl_plus.txt"
cmp -s "$WORK/ppl_plus.txt" "$WORK/ppl_l_ad.txt" || fail "'+' in the paths: $(cat "$WORK/ppl_plus.txt")"
# an adapter made for another base: exit 3, one line naming the adapter, the module and the shapes
"$MS_GEN" base "$WORK/other" --preset tiny --dtype bf16 --seed 9 --hidden 96
"$MS_GEN" lora "$WORK/other" "$WORK/a_other" --seed 5 --rank 4 --targets q_proj
expect_fail 3 "a_other: module 'model.layers.0.self_attn.q_proj'.*\[4, 96\].*\[64, 64\]" \
  "$MS_BIN" hessian "$WORK/m+$WORK/a_other" --calib "$WORK/calib.txt" -o "$WORK/bad"
# PiSSA-initialised adapters change the base too: unsupported, exit 2
cp -r "$WORK/ad" "$WORK/pissa"
sed -i -E 's/"init_lora_weights":[[:space:]]*true/"init_lora_weights": "pissa"/' "$WORK/pissa/adapter_config.json"
grep -q pissa "$WORK/pissa/adapter_config.json" || fail "could not make a PiSSA adapter config"
expect_fail 2 "pissa: .*pissa.* is not supported" \
  "$MS_BIN" hessian "$WORK/m+$WORK/pissa" --calib "$WORK/calib.txt" -o "$WORK/bad"
expect_fail 2 "pissa" "$MS_BIN" perplexity "$WORK/m+$WORK/pissa" --calib "$WORK/calib.txt"
# an adapter alone, a missing adapter, a directory that is no adapter
expect_fail 2 "is a PEFT adapter, not a model: name it as BASE_DIR\+ADAPTER_DIR" \
  "$MS_BIN" perplexity "$WORK/ad" --calib "$WORK/calib.txt"
expect_fail 3 "'$WORK/adapter' after the last '\+' does not exist" \
  "$MS_BIN" perplexity "$WORK/m+$WORK/adapter" --calib "$WORK/calib.txt"
expect_fail 3 "is not a PEFT adapter directory" "$MS_BIN" perplexity "$WORK/m+$WORK/other" --calib "$WORK/calib.txt"

# bad inputs: one line, exit 2 (usage, unsupported) or 3 (invalid data), nothing left behind
expect_fail 3 "calib-missing.txt: cannot open the calibration file" \
  "$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib-missing.txt" -o "$WORK/bad"
echo "1 2 3 256 4" > "$WORK/oov.txt"
expect_fail 3 "line 1, token 4: id 256 is not below the vocabulary size 256" \
  "$MS_BIN" hessian "$WORK/m" --calib "$WORK/oov.txt" -o "$WORK/bad"
echo "1 2 x3" > "$WORK/junk.txt"
expect_fail 3 "line 1, token 3: 'x3'" "$MS_BIN" perplexity "$WORK/m" --calib "$WORK/junk.txt"
expect_fail 2 "--seq-len: expected an integer" \
  "$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/bad" --seq-len 0
expect_fail 2 "--seq-len: expected an integer" \
  "$MS_BIN" perplexity "$WORK/m" --calib "$WORK/calib.txt" --seq-len 12abc
expect_fail 2 "--batch-size" "$MS_BIN" perplexity "$WORK/m" --calib "$WORK/calib.txt" --batch-size -1
# hessian's output options are not perplexity's: named as the option, not as its value
expect_fail 2 "perplexity: unknown option '--out-shard-size'" \
  "$MS_BIN" perplexity "$WORK/m" --calib "$WORK/calib.txt" --out-shard-size 5G
expect_fail 2 "--calib FILE is required" "$MS_BIN" hessian "$WORK/m" -o "$WORK/bad"
expect_fail 2 "-o DIR is required" "$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt"
expect_fail 2 "--calib given twice" "$MS_BIN" perplexity "$WORK/m" --calib "$WORK/calib.txt" --calib "$WORK/ten.txt"
expect_fail 2 "-o given twice" "$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/h1" -o "$WORK/h2"
# --device cuda where no GPU is usable: one line, exit 2 (skipped on a GPU machine)
if ! nvidia-smi -L >/dev/null 2>&1; then
  expect_fail 2 "--device cuda: no usable GPU" "$MS_BIN" perplexity "$WORK/m" --calib "$WORK/calib.txt" --device cuda
fi
# a bad GPU tuning variable: named, exit 2, before any GPU is looked for
# (a build without CUDA has no GPU to tune: "built without CUDA")
MERGESTREAM_GPU_GRAM_BLOCK=12x expect_fail 2 \
  "MERGESTREAM_GPU_GRAM_BLOCK='12x' is not a whole number|built without CUDA" \
  "$MS_BIN" perplexity "$WORK/m" --calib "$WORK/calib.txt" --device cuda
cp -r "$WORK/m" "$WORK/gpt2"
sed -i 's/LlamaForCausalLM/GPT2LMHeadModel/' "$WORK/gpt2/config.json"
expect_fail 2 "architecture 'GPT2LMHeadModel' is not supported" \
  "$MS_BIN" hessian "$WORK/gpt2" --calib "$WORK/calib.txt" -o "$WORK/bad"
cp -r "$WORK/m" "$WORK/qwen"
sed -i 's/LlamaForCausalLM/Qwen2ForCausalLM/' "$WORK/qwen/config.json"
expect_fail 3 "tensor 'model.layers.0.self_attn.q_proj.bias' is missing" \
  "$MS_BIN" perplexity "$WORK/qwen" --calib "$WORK/calib.txt"
expect_fail 3 "no config.json" "$MS_BIN" perplexity "$WORK/m/model.safetensors" --calib "$WORK/calib.txt"
expect_fail 3 "does-not-exist" "$MS_BIN" perplexity "$WORK/does-not-exist" --calib "$WORK/calib.txt"
# -o naming a file, an unknown --device: one line, exit 2, the file untouched
echo keep > "$WORK/afile"
expect_fail 2 "afile: exists and is not a directory" \
  "$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/afile"
[ "$(cat "$WORK/afile")" = keep ] || fail "hessian -o FILE changed the file"
expect_fail 2 "hessian: --device: expected auto, cpu or cuda, got 'bogus'" \
  "$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/bad" --device bogus
[ ! -e "$WORK/bad" ] || fail "a failed run left $WORK/bad behind"

# progress on a terminal (script(1) gives a pseudo-terminal): a live line
# with samples/s and an ETA; --quiet prints none
if command -v script >/dev/null; then
  script -qec "$MS_BIN hessian $WORK/m --calib $WORK/calib.txt -o $WORK/h_tty --batch-size 2" /dev/null \
    > "$WORK/tty.log" 2>&1 || fail "hessian on a terminal: $(tail -3 "$WORK/tty.log")"
  grep -q $'\r\e\[Khessian: .* samples/s .* ETA ' "$WORK/tty.log" || fail "no live progress line on a terminal"
  script -qec "$MS_BIN hessian $WORK/m --calib $WORK/calib.txt -o $WORK/h_tty --force --quiet" /dev/null \
    > "$WORK/tty_quiet.log" 2>&1 || fail "hessian --quiet on a terminal: $(tail -3 "$WORK/tty_quiet.log")"
  grep -qE "samples/s|ETA" "$WORK/tty_quiet.log" && fail "--quiet printed progress"
fi

# a failed write removes every file the run created
rc=0
MERGESTREAM_FAULT=write:2 "$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/faulty" --quiet \
  2>"$WORK/err.txt" || rc=$?
[ "$rc" -eq 1 ] || fail "an injected write fault gave exit $rc"
[ ! -e "$WORK/faulty" ] || [ -z "$(ls -A "$WORK/faulty")" ] || fail "a failed run left files: $(ls "$WORK/faulty")"

# every injected failure: exit 1 with nothing left, or the reference bytes
for site in read write fsync rename host_alloc; do
  for n in 1 2 3 5 8 13 21 34 55 89; do
    rm -rf "$WORK/fw"; rc=0
    MERGESTREAM_FAULT=$site:$n "$MS_BIN" hessian "$WORK/m" --calib "$WORK/calib.txt" -o "$WORK/fw" \
      --batch-size 2 --quiet 2>"$WORK/err.txt" || rc=$?
    if [ "$rc" -eq 0 ]; then
      cmp -s "$WORK/fw/hessians.safetensors" "$WORK/h/hessians.safetensors" || fail "$site:$n: different bytes"
    else
      [ "$rc" -eq 1 ] || fail "$site:$n: exit $rc: $(cat "$WORK/err.txt")"
      [ "$(grep -c '^mergestream: error: ' "$WORK/err.txt")" -eq 1 ] || fail "$site:$n: not one error line"
      [ ! -e "$WORK/fw" ] || [ -z "$(ls -A "$WORK/fw")" ] || fail "$site:$n: left $(ls "$WORK/fw")"
    fi
  done
done

# the same with an adapter: its factor reads and allocations fail cleanly too
for site in read host_alloc; do
  for n in 1 2 3 5 8 13 21 34 55 89; do
    rm -rf "$WORK/fw"; rc=0
    MERGESTREAM_FAULT=$site:$n "$MS_BIN" hessian "$WORK/m+$WORK/dora" --calib "$WORK/calib.txt" -o "$WORK/fw" \
      --batch-size 2 --quiet 2>"$WORK/err.txt" || rc=$?
    if [ "$rc" -eq 0 ]; then
      cmp -s "$WORK/fw/hessians.safetensors" "$WORK/hl_dora/hessians.safetensors" || fail "lora $site:$n: different bytes"
    else
      [ "$rc" -eq 1 ] || fail "lora $site:$n: exit $rc: $(cat "$WORK/err.txt")"
      [ "$(grep -c '^mergestream: error: ' "$WORK/err.txt")" -eq 1 ] || fail "lora $site:$n: not one error line"
      [ ! -e "$WORK/fw" ] || [ -z "$(ls -A "$WORK/fw")" ] || fail "lora $site:$n: left $(ls "$WORK/fw")"
    fi
  done
done

# config.json values the forward pass cannot honour: one line naming the file
# and the key (exit 3; an unsupported activation is a usage error, exit 2)
bad_config() { # CODE PATTERN SED
  rm -rf "$WORK/bad"; cp -r "$WORK/m" "$WORK/bad"; sed -i -E "$3" "$WORK/bad/config.json"
  cmp -s "$WORK/m/config.json" "$WORK/bad/config.json" && fail "config.json unchanged by '$3'"
  expect_fail "$1" "bad/config.json: $2" "$MS_BIN" perplexity "$WORK/bad" --calib "$WORK/calib.txt" --quiet
}
bad_config 3 '"rope_scaling" must be an object or null' 's/"rope_scaling":[[:space:]]*null/"rope_scaling": 5/'
bad_config 3 'rope_scaling: "rope_type" must be a string' 's/"rope_scaling":[[:space:]]*null/"rope_scaling": {"rope_type": 7}/'
bad_config 3 'rope_scaling: high_freq_factor must exceed low_freq_factor' \
  's/"rope_scaling":[[:space:]]*null/"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1, "original_max_position_embeddings": 8192}/'
bad_config 3 'num_key_value_heads \(2\) must divide num_attention_heads \(7\)' \
  's/"head_dim":[[:space:]]*[0-9]*,//; s/"num_attention_heads":[[:space:]]*[0-9]*/"num_attention_heads": 7/'
bad_config 2 "hidden_act 'gelu' is not supported" 's/"hidden_act":[[:space:]]*"silu"/"hidden_act": "gelu"/'

"$MS_BIN" hessian --help | grep -q "usage: mergestream hessian" || fail "hessian --help"
"$MS_BIN" hessian --help | grep -q "BASE_DIR+ADAPTER_DIR" || fail "hessian --help does not mention adapters"
"$MS_BIN" perplexity --help | grep -q "usage: mergestream perplexity" || fail "perplexity --help"
# the version, and no command at all: the usage on stderr, exit 2
"$MS_BIN" --version | grep -qE '^mergestream [0-9]+\.[0-9]+\.[0-9]+' || fail "--version"
rc=0; "$MS_BIN" > "$WORK/noargs.out" 2> "$WORK/noargs.err" || rc=$?
[ "$rc" -eq 2 ] && [ ! -s "$WORK/noargs.out" ] && grep -q "^usage: mergestream COMMAND" "$WORK/noargs.err" ||
  fail "mergestream without arguments: exit $rc, $(head -1 "$WORK/noargs.err")"
echo "hessian_cli: ok"
