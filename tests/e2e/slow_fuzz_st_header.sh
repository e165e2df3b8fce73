#!/bin/bash
# slow: runs the libFuzzer target fuzz_st_header for about 30 seconds on the
# seed corpus (tests/fuzz/corpus) with the header dictionary. Builds nothing:
# MS_FUZZ_BIN must point at a built fuzz_st_header (configure with clang and
# -DMERGESTREAM_FUZZ=ON); without it the test is skipped (exit 77).
# New corpus entries and crash artifacts go to a temporary directory; a crash
# is kept and its path printed. MS_FUZZ_SECONDS overrides the duration.
set -u

if [[ -z "${MS_FUZZ_BIN:-}" || ! -x "${MS_FUZZ_BIN}" ]]; then
    echo "slow_fuzz_st_header: MS_FUZZ_BIN is not set to a fuzz_st_header binary; skipped"
    exit 77
fi
src="${MS_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
seeds="$src/tests/fuzz/corpus"
dict="$src/tests/fuzz/st_header.dict"
if [[ ! -d "$seeds" ]]; then
    echo "slow_fuzz_st_header: no seed corpus at $seeds" >&2
    exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/fuzz_st_header.XXXXXX")" || exit 1
mkdir -p "$work/corpus" "$work/artifacts"

dict_opt=()
[[ -f "$dict" ]] && dict_opt=(-dict="$dict")
"$MS_FUZZ_BIN" -max_total_time="${MS_FUZZ_SECONDS:-30}" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 "${dict_opt[@]}" \
    -artifact_prefix="$work/artifacts/" "$work/corpus" "$seeds" >"$work/log" 2>&1
rc=$?

if [[ $rc -ne 0 ]] || compgen -G "$work/artifacts/*" >/dev/null; then
    tail -n 60 "$work/log"
    echo "slow_fuzz_st_header: fuzzer failed (exit $rc); artifacts and log kept in $work" >&2
    exit 1
fi
grep -E '^stat::number_of_executed_units|^Done' "$work/log"
rm -rf "$work"
exit 0
