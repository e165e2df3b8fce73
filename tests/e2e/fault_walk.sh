# SQLite-style fault walk: make the N-th read, write, fsync, rename or host
# allocation fail, for N = 1, 2, ... until a run succeeds. Every run either
# produces exactly the reference bytes or fails with one error line, a
# non-zero exit and nothing under a final name.
source "$(dirname "$0")/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset tiny --dtype bf16 --seed 1 --shard-size 60K
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 2
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 3
cat > "$WORK/r.yml" <<EOR
merge_method: dare_ties
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: ./models/ft2
    parameters: {weight: 0.5, density: 0.5}
EOR
# --threads 2: chunk sizes (and so the number of reads) depend on the thread count
run() { "$MS_BIN" merge "$WORK/r.yml" -o "$1" --out-shard-size 80KB --max-memory 26M --threads 2 --quiet "${@:2}"; }
run "$WORK/ref"

for site in read write fsync rename host_alloc; do
  for n in $(seq 1 400); do
    out="$WORK/f_${site}_$n"
    rc=0
    MERGESTREAM_FAULT="$site:$n" run "$out" 2>"$WORK/err.txt" || rc=$?
    if [ "$rc" -eq 0 ]; then
      same_bytes "$WORK/ref" "$out"
      rm -rf "$out"
      echo "$site: succeeded from N=$n on"
      break
    fi
    [ "$(grep -c '^mergestream: error: ' "$WORK/err.txt")" -eq 1 ] || { cat "$WORK/err.txt"; fail "$site:$n: not one error line"; }
    if [ -d "$out" ]; then
      left=$(find "$out" -name 'model*.safetensors' -o -name '*.index.json' -o -name mergestream.json -o -name '*.partial' | head -n 3)
      [ -z "$left" ] || fail "$site:$n left files behind: $left"
    fi
    rm -rf "$out"
    [ "$n" -lt 400 ] || fail "$site: still failing at N=400"
  done
done
echo "fault_walk: ok"
