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
write_calib() {
  local i j line
  RANDOM=$4
  for i in $(seq 1 "$2"); do
    line=""; for j in $(seq 1 "$3"); do line="$line $((RANDOM % 256))"; done; echo "$line"
  done > "$1"
}
