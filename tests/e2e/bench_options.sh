# bench/bench_merge.sh's size options, as a user mistypes them: one line
# naming the option and the value, exit 2, before any model is generated
# or anything measured.
source "$(dirname "$0")/lib.bash"

bad_option() { # EXPECTED_LINE OPTION VALUE
  local rc=0
  MS_BUILD=/nonexistent bash "$MS_SRC/bench/bench_merge.sh" --dir "$WORK/bench" --size 1M "$2" "$3" \
    > "$WORK/out.txt" 2> "$WORK/err.txt" || rc=$?
  [ "$rc" -eq 2 ] || { cat "$WORK/err.txt" >&2; fail "$2 $3: exit $rc, not 2"; }
  [ "$(wc -l < "$WORK/err.txt")" -eq 1 ] || { cat "$WORK/err.txt" >&2; fail "$2 $3: not one line"; }
  grep -qF -- "$1" "$WORK/err.txt" || { cat "$WORK/err.txt" >&2; fail "$2 $3: not '$1'"; }
  [ ! -e "$WORK/bench/1M" ] || fail "$2 $3: models generated before the options were checked"
}
bad_option "bench_merge.sh: --disk-read: 'fast' is not a rate in bytes per second (500M, 2G)" --disk-read fast
bad_option "bench_merge.sh: --disk-read: '0.5.5G' is not a rate" --disk-read 0.5.5G
bad_option "bench_merge.sh: --ram: 'lots' is not a size (1G, 512M)" --ram lots
bad_option "unknown option --disk" --disk 500M
echo "bench_options: ok"
