# inspect and verify as a user runs them, on generated models and broken ones.
source "$(dirname "$0")/lib.bash"

"$MS_GEN" base "$WORK/base" --preset tiny --dtype bf16 --seed 1
"$MS_GEN" base "$WORK/sharded" --preset tiny --dtype f32 --seed 2 --shard-size 40K

# valid inputs: a directory, a sharded directory, a single file
"$MS_BIN" inspect "$WORK/base" > "$WORK/inspect.txt"
grep -q "model.layers.1.mlp.down_proj.weight" "$WORK/inspect.txt" || fail "inspect misses a tensor"
grep -q "model directory" "$WORK/inspect.txt" || fail "inspect summary line"
"$MS_BIN" inspect "$WORK/sharded" --json > "$WORK/inspect.json"
# the index file itself names the same model
"$MS_BIN" inspect "$WORK/sharded/model.safetensors.index.json" --json > "$WORK/inspect_index.json"
diff <(grep -v '"kind"\|"path"' "$WORK/inspect.json") <(grep -v '"kind"\|"path"' "$WORK/inspect_index.json") > /dev/null ||
  fail "inspect of the index file lists other tensors than inspect of its directory"
grep -q '"model-00001-of-' "$WORK/inspect.json" || fail "inspect --json lists no shards"
"$MS_BIN" inspect "$WORK/base/model.safetensors" --hash | grep -qE ' [0-9a-f]{16}$' || fail "inspect --hash"
"$MS_BIN" inspect --help | grep -q "usage: mergestream inspect" || fail "inspect --help"
"$MS_BIN" verify "$WORK/sharded" 2>&1 | grep -q "OK" || fail "verify of a valid sharded model"

# bad inputs: one line naming the file, exit 3
expect_fail 3 "no weights found" "$MS_BIN" inspect "$WORK"
expect_fail 3 "cannot open" "$MS_BIN" inspect "$WORK/does-not-exist"
touch "$WORK/pytorch_model.bin"
expect_fail 3 "pickle" "$MS_BIN" inspect "$WORK/pytorch_model.bin"

cp -r "$WORK/sharded" "$WORK/missing_shard"
rm "$WORK/missing_shard/model-00002-of-"*.safetensors
expect_fail 3 "missing_shard/model.safetensors.index.json: shard 'model-00002-of-.*' is missing" \
  "$MS_BIN" inspect "$WORK/missing_shard"

cp "$WORK/base/model.safetensors" "$WORK/truncated.safetensors"
truncate -s -1 "$WORK/truncated.safetensors"
expect_fail 3 "truncated.safetensors" "$MS_BIN" inspect "$WORK/truncated.safetensors"

# a header claiming 2^64-1 bytes
printf '\xff\xff\xff\xff\xff\xff\xff\xff{}' > "$WORK/huge.safetensors"
expect_fail 3 "huge.safetensors" "$MS_BIN" inspect "$WORK/huge.safetensors"

# a sharded index that lies: a shard outside the directory, a tensor listed
# in the wrong shard, a stored tensor the index leaves out: exit 3 naming it
index_case() { # NAME SED: a copy of the sharded model with its index edited
  cp -r "$WORK/sharded" "$WORK/$1"
  sed -i -E "$2" "$WORK/$1/model.safetensors.index.json"
  cmp -s "$WORK/sharded/model.safetensors.index.json" "$WORK/$1/model.safetensors.index.json" && fail "$1: index unchanged"
  return 0
}
cp "$WORK/sharded/model-00012-of-00012.safetensors" "$WORK/x.safetensors"
index_case trav 's|("lm_head.weight":[[:space:]]*)"[^"]*"|\1"../x.safetensors"|'
expect_fail 3 "trav/model.safetensors.index.json: shard name '../x.safetensors' must be a relative path inside the model directory" \
  "$MS_BIN" inspect "$WORK/trav"
index_case wrong 's|("lm_head.weight":[[:space:]]*)"[^"]*"|\1"model-00011-of-00012.safetensors"|'
expect_fail 3 "wrong/model.safetensors.index.json: tensor 'lm_head.weight' is listed in shard 'model-00011-of-00012.safetensors' but not stored there" \
  "$MS_BIN" inspect "$WORK/wrong"
index_case unlisted '/"model.layers.0.self_attn.k_proj.weight":/d'
expect_fail 3 "tensor 'model.layers.0.self_attn.k_proj.weight' is stored in '.*unlisted/model-00002-of-00012.safetensors' but not listed in the index" \
  "$MS_BIN" inspect "$WORK/unlisted"

# verify of a merge output changed after the merge (bit rot, a bad copy, an
# edited manifest): exit 3 naming the shard, the tensor or the manifest
"$MS_GEN" finetune "$WORK/base" "$WORK/ft" --seed 3
printf 'merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n  - model: ./ft\n    parameters: {weight: 0.5}\n' > "$WORK/r.yml"
"$MS_BIN" merge "$WORK/r.yml" -o "$WORK/out" --out-shard-size 60K --quiet
# the shard and the data offset of model.layers.0.mlp.gate_proj.weight
read -r S O < <("$MS_BIN" inspect "$WORK/out" --json | awk '/"name":[[:space:]]*"model.layers.0.mlp.gate_proj.weight"/ { f = 1 }
  f && /"shard"/ { gsub(/.*:[[:space:]]*"|",?$/, ""); s = $0 } f && /"offset"/ { gsub(/[^0-9]/, ""); print s, $0; exit }')
[ -f "$WORK/out/$S" ] && [ -f "$WORK/out/model-00002-of-00004.safetensors" ] || fail "expected 4 output shards, gate_proj in '$S'"
manifest_case() { # NAME SED: a copy of the output with its manifest edited
  cp -r "$WORK/out" "$WORK/$1"
  sed -i "$2" "$WORK/$1/mergestream.json"
  cmp -s "$WORK/out/mergestream.json" "$WORK/$1/mergestream.json" && fail "$1: manifest unchanged"
  return 0
}
manifest_case shard_hash "/\"file\":[[:space:]]*\"$S\"/,/xxh3/ s/\"xxh3\":\([[:space:]]*\)\"[0-9a-f]*\"/\"xxh3\":\1\"0123456789abcdef\"/"
expect_fail 3 "shard_hash/$S: shard XXH3 [0-9a-f]{16} does not match the manifest's 0123456789abcdef" \
  "$MS_BIN" verify "$WORK/shard_hash"
cp -r "$WORK/out" "$WORK/flipped"
printf '\125\252' | dd of="$WORK/flipped/$S" bs=1 seek="$((O + 6))" conv=notrunc status=none
expect_fail 3 "flipped/$S: tensor 'model.layers.0.mlp.gate_proj.weight' has XXH3 [0-9a-f]{16}, the manifest says" \
  "$MS_BIN" verify "$WORK/flipped"
manifest_case extra_shard 's/"shards":\([[:space:]]*\)\[{/"shards":\1[{"file": "model-00005-of-00004.safetensors", "tensors": 1, "xxh3": "0000000000000000"}, {/'
expect_fail 3 "extra_shard/mergestream.json: lists 5 shards but the output holds 4" "$MS_BIN" verify "$WORK/extra_shard"
manifest_case fewer '/"model.layers.1.mlp.up_proj.weight":/,/}/d'
expect_fail 3 "fewer/mergestream.json: lists 20 tensors but the output holds 21" "$MS_BIN" verify "$WORK/fewer"
manifest_case renamed 's/"model.layers.1.mlp.up_proj.weight":/"model.layers.1.mlp.up_proj.weight2":/'
expect_fail 3 "renamed/model-0000[0-9]-of-00004.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' is not in .*renamed/mergestream.json" \
  "$MS_BIN" verify "$WORK/renamed"
# a shard's tensor count, and a tensor placed in another shard
manifest_case count "/\"file\":[[:space:]]*\"$S\"/,/xxh3/ s/\"tensors\":\([[:space:]]*\)[0-9]*/\"tensors\":\1999/"
expect_fail 3 "count/$S: holds [0-9]+ tensors in [0-9]+ bytes; .*count/mergestream.json says 999 tensors" \
  "$MS_BIN" verify "$WORK/count"
other=model-00004-of-00004.safetensors
[ "$S" != "$other" ] || other=model-00001-of-00004.safetensors
manifest_case moved "/\"model.layers.0.mlp.gate_proj.weight\":/,/}/ s/\"shard\":\([[:space:]]*\)\"[^\"]*\"/\"shard\":\1\"$other\"/"
expect_fail 3 "moved/$S: tensor 'model.layers.0.mlp.gate_proj.weight' is in this shard, .*mergestream.json puts it in $other" \
  "$MS_BIN" verify "$WORK/moved"
"$MS_BIN" verify "$WORK/out" --quiet || fail "verify of the untouched output"

# what a finished output must not hold (exit 3, one line naming the file):
# an index whose metadata.total_size is not the tensors' bytes (DESIGN.md,
# Output), a model*.safetensors file that is none of its shards (a loader
# globbing for shards would read it), an interrupted merge's journal or
# partial shard
"$MS_BIN" inspect "$WORK/out" --json > "$WORK/out_inspect.json"
total=$(json_num "$WORK/out_inspect.json" total_bytes)
index_sed() { # NAME SED: a copy of the output with its index edited
  cp -r "$WORK/out" "$WORK/$1"
  sed -i -E "$2" "$WORK/$1/model.safetensors.index.json"
  cmp -s "$WORK/out/model.safetensors.index.json" "$WORK/$1/model.safetensors.index.json" && fail "$1: index unchanged"
  return 0
}
index_sed total "s/(\"total_size\":[[:space:]]*)$total\b/\1$((total + 2))/"
expect_fail 3 "total/model.safetensors.index.json: metadata.total_size is $((total + 2)), expected $total " \
  "$MS_BIN" verify "$WORK/total"
index_sed no_total '/"total_size":/d'
expect_fail 3 "no_total/model.safetensors.index.json: metadata.total_size is missing, expected $total " \
  "$MS_BIN" verify "$WORK/no_total"
cp -r "$WORK/out" "$WORK/stray"
cp "$WORK/out/model-00004-of-00004.safetensors" "$WORK/stray/model-00007-of-00006.safetensors"
expect_fail 3 "stray/model-00007-of-00006.safetensors: not a shard of this output \(model.safetensors.index.json does not list it\)" \
  "$MS_BIN" verify "$WORK/stray"
# beside a single model.safetensors, without a manifest (structure only)
cp -r "$WORK/base" "$WORK/stray1"
cp "$WORK/base/model.safetensors" "$WORK/stray1/model-00001-of-00002.safetensors"
expect_fail 3 "stray1/model-00001-of-00002.safetensors: not a shard of this output \(model.safetensors holds all of it\)" \
  "$MS_BIN" verify "$WORK/stray1"
cp -r "$WORK/out" "$WORK/journal_left"
echo "mergestream-journal 1 0123456789abcdef" > "$WORK/journal_left/mergestream.journal"
expect_fail 3 "journal_left/mergestream.journal: the merge looks interrupted .*mergestream merge RECIPE -o .*/journal_left --resume. would finish it" \
  "$MS_BIN" verify "$WORK/journal_left"
cp -r "$WORK/out" "$WORK/partial_left"
cp "$WORK/out/model-00002-of-00004.safetensors" "$WORK/partial_left/model-00002-of-00004.safetensors.partial"
expect_fail 3 "partial_left/model-00002-of-00004.safetensors.partial: an unfinished shard: the merge looks interrupted.* -o .*/partial_left --force" \
  "$MS_BIN" verify "$WORK/partial_left"
# a merge killed mid-run: finished shards, a partial one and the journal,
# no index or manifest yet (it said "no weights found")
mkdir "$WORK/killed"
cp "$WORK/out/model-00001-of-00004.safetensors" "$WORK/killed/"
cp "$WORK/out/model-00002-of-00004.safetensors" "$WORK/killed/model-00002-of-00004.safetensors.partial"
cp "$WORK/journal_left/mergestream.journal" "$WORK/killed/"
expect_fail 3 "killed/mergestream.journal: the merge looks interrupted .*--resume. would finish it" \
  "$MS_BIN" verify "$WORK/killed"

# verify --json: one object on stdout, passed or not
"$MS_BIN" verify "$WORK/out" --json --quiet > "$WORK/v.json" 2> "$WORK/v.err"
[ ! -s "$WORK/v.err" ] || fail "verify --json --quiet wrote to stderr: $(cat "$WORK/v.err")"
grep -qE '"command":[[:space:]]*"verify"' "$WORK/v.json" && grep -qE '"ok":[[:space:]]*true' "$WORK/v.json" &&
  grep -qE '"error":[[:space:]]*null' "$WORK/v.json" && grep -qE '"manifest":[[:space:]]*true' "$WORK/v.json" ||
  fail "verify --json of a valid output: $(cat "$WORK/v.json")"
[ "$(json_num "$WORK/v.json" tensors)" -eq 21 ] && [ "$(json_num "$WORK/v.json" shards)" -eq 4 ] &&
  json_num "$WORK/v.json" seconds > /dev/null || fail "verify --json counts: $(cat "$WORK/v.json")"
expect_fail 3 "flipped/$S: tensor 'model.layers.0.mlp.gate_proj.weight' has XXH3" "$MS_BIN" verify "$WORK/flipped" --json
grep -qE '"ok":[[:space:]]*false' "$WORK/out.txt" &&
  grep -qE "\"error\":[[:space:]]*\".*flipped/$S: tensor 'model.layers.0.mlp.gate_proj.weight' has XXH3" "$WORK/out.txt" ||
  fail "verify --json of a changed output: $(cat "$WORK/out.txt")"
expect_fail 3 "journal_left/mergestream.journal" "$MS_BIN" verify "$WORK/journal_left" --json
grep -qE '"ok":[[:space:]]*false' "$WORK/out.txt" && grep -qE '"error":[[:space:]]*".*journal_left/mergestream.journal' "$WORK/out.txt" ||
  fail "verify --json of an interrupted merge: $(cat "$WORK/out.txt")"
"$MS_BIN" verify --help | grep -q -- "--json" || fail "verify --help does not name --json"

# usage errors: exit 2
expect_fail 2 "expected exactly one PATH" "$MS_BIN" inspect
expect_fail 2 "unknown command" "$MS_BIN" frobnicate
echo "inspect_verify: ok"
