# Shared helpers for the e2e scripts (sourced, not run). ctest sets MS_BIN
# (the mergestream binary), MS_GEN (gen_model) and MS_SRC (the source tree).
set -euo pipefail
: "${MS_BIN:?run through ctest}" "${MS_GEN:?run through ctest}" "${MS_SRC:?run through ctest}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ms-e2e.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

# expect_fail CODE PATTERN CMD...: CMD must exit with CODE and print exactly
# one stderr line "mergestream: error: ..." matching PATTERN (grep -E).
expect_fail() {
  local code=$1 pattern=$2; shift 2
  local rc=0
  "$@" >"$WORK/out.txt" 2>"$WORK/err.txt" || rc=$?
  [ "$rc" -eq "$code" ] || { cat "$WORK/err.txt" >&2; fail "expected exit $code, got $rc: $*"; }
  local errs
  errs=$(grep -c '^mergestream: error: ' "$WORK/err.txt" || true)
  [ "$errs" -eq 1 ] || { cat "$WORK/err.txt" >&2; fail "expected one error line, got $errs: $*"; }
  grep -qE -- "$pattern" "$WORK/err.txt" || { cat "$WORK/err.txt" >&2; fail "error does not match /$pattern/: $*"; }
}

# evict_cache DIR...: drops the page cache of every *.safetensors file under
# the DIRs (after a sync; a file system that keeps them, as tmpfs does, keeps
# them), so that `merge --direct-io` reads them with O_DIRECT: it reads a
# file the page cache holds through the cache.
evict_cache() {
  sync
  find "$@" -name '*.safetensors' -exec dd if={} iflag=nocache count=0 status=none \;
}

# same_bytes DIR1 DIR2: every *.safetensors file of DIR1 is identical in DIR2.
same_bytes() {
  local f n=0
  for f in "$1"/*.safetensors; do
    cmp -s "$f" "$2/$(basename "$f")" || fail "$(basename "$f") differs between $1 and $2"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || fail "no safetensors files in $1"
}

# write_calib FILE SAMPLES LENGTH SEED: a calibration text file of SAMPLES
# lines of LENGTH random token ids below 256 (the tiny and small presets'
# vocabularies start at 256), the same for the same SEED.
# skip_without_gpu MODEL_DIR: exit 77 (skipped) unless a linear merge of
# MODEL_DIR (a model under $WORK) runs with --device cuda.
skip_without_gpu() {
  printf 'merge_method: linear\nmodels:\n  - model: %s\n    parameters: {weight: 1}\n' "$1" > "$WORK/probe.yml"
  if ! "$MS_BIN" merge "$WORK/probe.yml" -o "$WORK/probe" --device cuda --quiet 2> "$WORK/probe.err"; then
    echo "SKIP: $(cat "$WORK/probe.err")"
    exit 77
  fi
}

# json_num FILE KEY: the number KEY has in the JSON of FILE (--json output).
json_num() { grep -oE "\"$2\":[[:space:]]*[-0-9.e+]+" "$1" | grep -oE '[-0-9.e+]+$'; }

# write_hessian_recipes: $WORK/{ties_sparsegpt,dare_sparsegpt,regmean}.yml
# over ./models/{base,ft1,ft2} with the Hessians of ./h_ft1 and ./h_ft2
# (density 0.3, random seed 3; regmean's alpha 0.2).
write_hessian_recipes() {
  local m
  for m in ties_sparsegpt dare_sparsegpt; do
    cat > "$WORK/$m.yml" <<EOR
merge_method: $m
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.6, density: 0.3, hessian: ./h_ft1}
  - model: ./models/ft2
    parameters: {weight: 0.4, density: 0.3, hessian: ./h_ft2}
random_seed: 3
EOR
  done
  cat > "$WORK/regmean.yml" <<EOR
merge_method: regmean
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {hessian: ./h_ft1}
  - model: ./models/ft2
    parameters: {hessian: ./h_ft2}
parameters: {alpha: 0.2}
EOR
}

# walk_gpu_alloc RECIPE WANT_DIR MAX_N: merges RECIPE on the GPU with the
# Nth device allocation failing (MERGESTREAM_FAULT=gpu_alloc:N), N = 1, 2, ...
# until a run falls back no more (at most MAX_N runs): each run must finish,
# say "GPU out of memory ...: using CPU" and give WANT_DIR's bytes.
walk_gpu_alloc() {
  local n rc
  for n in $(seq 1 "$3"); do
    rc=0
    MERGESTREAM_FAULT="gpu_alloc:$n" "$MS_BIN" merge "$1" -o "$WORK/f$n" --device cuda --json \
      > "$WORK/f.json" 2> "$WORK/f.err" || rc=$?
    [ "$rc" -eq 0 ] || { cat "$WORK/f.err"; fail "gpu_alloc:$n failed the merge"; }
    same_bytes "$2" "$WORK/f$n"
    rm -rf "$WORK/f$n"
    if grep -qE '"gpu_fallbacks":[[:space:]]*0' "$WORK/f.json"; then echo "gpu_alloc walk: no fallback from N=$n on"; return; fi
    grep -qE "GPU out of memory (on|factoring) .*: using CPU" "$WORK/f.err" || { cat "$WORK/f.err"; fail "gpu_alloc:$n: no fallback line"; }
  done
}

write_calib() {
  local i j line
  RANDOM=$4
  for i in $(seq 1 "$2"); do
    line=""; for j in $(seq 1 "$3"); do line="$line $((RANDOM % 256))"; done; echo "$line"
  done > "$1"
}

# offset_of DIR TENSOR: the tensor's data offset in its shard (a one-shard model)
offset_of() {
  "$MS_BIN" inspect "$1" --json | awk -v n="$2" '$0 ~ "\"name\":[[:space:]]*\"" n "\"" { f = 1 }
    f && /"offset"/ { gsub(/[^0-9]/, ""); print; exit }'
}
