# Kill test: twenty SIGKILLs at random moments of a multi-shard merge, each
# followed by `merge --resume`; every resumed output must equal an
# uninterrupted run's bytes, and a killed run must never leave a file under a
# final name that the uninterrupted run would not write.
source "$(dirname "$0")/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset sized:150M --dtype bf16 --seed 1
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 2
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 3
cat > "$WORK/r.yml" <<EOR
merge_method: dare_ties
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.6, density: 0.3}
  - model: ./models/ft2
    parameters: {weight: 0.4, density: 0.5}
random_seed: 3
EOR
loud=(--out-shard-size 12MB --max-memory 96M --threads 2)
opts=("${loud[@]}" --quiet)
start=$(date +%s%N)
"$MS_BIN" merge "$WORK/r.yml" -o "$WORK/ref" "${opts[@]}"
ref_ms=$(( ($(date +%s%N) - start) / 1000000 ))
ls "$WORK/ref" > "$WORK/ref.names"
echo "reference run: ${ref_ms} ms, $(ls "$WORK/ref" | grep -c safetensors) shards"

RANDOM=42
resumed_with_kept=0
for i in $(seq 1 20); do
  out="$WORK/k$i"
  "$MS_BIN" merge "$WORK/r.yml" -o "$out" "${opts[@]}" &
  pid=$!
  delay=$(( RANDOM % (ref_ms + 50) ))
  sleep "$(printf '0.%03d' "$delay")" 2>/dev/null || sleep 0.1
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # nothing under a final name that the full run would not write
  if [ -d "$out" ]; then
    for f in $(ls "$out"); do
      case "$f" in *.partial|mergestream.journal|*.tmp.*) continue ;; esac
      grep -qx "$f" "$WORK/ref.names" || fail "kill $i left '$f'"
    done
  fi
  if [ -f "$out/mergestream.json" ]; then
    same_bytes "$WORK/ref" "$out"   # the kill came after the end
  elif [ -f "$out/mergestream.journal" ]; then
    "$MS_BIN" merge "$WORK/r.yml" -o "$out" --resume "${loud[@]}" 2> "$WORK/resume.err" \
      || { cat "$WORK/resume.err"; fail "resume $i failed"; }
    grep -q "resuming: kept" "$WORK/resume.err" && resumed_with_kept=$((resumed_with_kept + 1))
    same_bytes "$WORK/ref" "$out"
    [ ! -e "$out/mergestream.journal" ] || fail "journal left after a completed resume"
  fi
  rm -rf "$out"
done
echo "resumed runs that kept shards: $resumed_with_kept"
[ "$resumed_with_kept" -gt 0 ] || fail "no kill landed after a finished shard: the test proves nothing"

# a journal from another merge is refused
"$MS_BIN" merge "$WORK/r.yml" -o "$WORK/other" "${opts[@]}" &
pid=$!; sleep 0.3; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null || true
if [ -f "$WORK/other/mergestream.journal" ]; then
  expect_fail 2 "belongs to another merge" "$MS_BIN" merge "$WORK/r.yml" -o "$WORK/other" --resume --random-seed 9 "${opts[@]}"
fi
expect_fail 2 "nothing to resume" "$MS_BIN" merge "$WORK/r.yml" -o "$WORK/ref" --resume "${opts[@]}"
echo "slow_kill_resume: ok"
