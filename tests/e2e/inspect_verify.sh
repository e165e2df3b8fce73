# inspect and verify as a user runs them, on generated models and broken ones.
source "$(dirname "$0")/lib.bash"

"$MS_GEN" base "$WORK/base" --preset tiny --dtype bf16 --seed 1
"$MS_GEN" base "$WORK/sharded" --preset tiny --dtype f32 --seed 2 --shard-size 40K

# valid inputs: a directory, a sharded directory, a single file
"$MS_BIN" inspect "$WORK/base" > "$WORK/inspect.txt"
grep -q "model.layers.1.mlp.down_proj.weight" "$WORK/inspect.txt" || fail "inspect misses a tensor"
grep -q "model directory" "$WORK/inspect.txt" || fail "inspect summary line"
"$MS_BIN" inspect "$WORK/sharded" --json > "$WORK/inspect.json"
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

# usage errors: exit 2
expect_fail 2 "expected exactly one PATH" "$MS_BIN" inspect
expect_fail 2 "unknown command" "$MS_BIN" frobnicate
echo "inspect_verify: ok"
