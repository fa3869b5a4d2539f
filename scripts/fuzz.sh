#!/usr/bin/env bash
# Fuzzes every libFuzzer target of tests/fuzz (or those named) for SECONDS each (default 20; 10
# when CI=true), one after the other, under ASan and UBSan, and prints a table
#     target | execs | new corpus | crashes
# Builds build/fuzz first (clang, -Dfuzz=true). Each target starts from its seeds
# (tests/fuzz/corpus/NAME, read-only here) and its working corpus build/fuzz/corpus/NAME, which
# keeps what earlier runs found ("new corpus" counts the inputs this run added). A crash, a
# leak, a broken invariant, a timeout or running out of memory stops that target and saves the
# input as tests/fuzz/crashes/NAME-<kind>-<sha1>; the exit status is then 1.
# See docs/security.md ("Fuzzing") for reproducing a crash and for longer runs.
#
#     scripts/fuzz.sh [--count FILE] [SECONDS] [TARGET...]
#
# --count FILE writes "P F" (targets without and with a crash; a failed build counts as one
# failure) for scripts/test.sh.
set -uo pipefail
. "$(dirname "$0")/env.sh"
cd "$ME_ROOT_DIR"

count_file=
if [ "${1:-}" = "--count" ]; then
	count_file=$2
	shift 2
fi
secs=20
[ "${CI:-}" = "true" ] && secs=10
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
	secs=$1
	shift
fi
if [ "$secs" -eq 0 ] || [[ ${1:-} == -* ]]; then
	echo "usage: scripts/fuzz.sh [--count FILE] [SECONDS] [TARGET...]" >&2
	exit 2
fi
count() { [ -z "$count_file" ] || echo "$1 $2" >"$count_file"; }

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
	for f in tests/fuzz/fuzz-*.c; do
		n=${f#tests/fuzz/fuzz-}
		targets+=("${n%.c}")
	done
fi

dir=build/fuzz
mkdir -p build
if [ ! -f "$dir/build.ninja" ]; then
	if ! CC=clang meson setup "$dir" --buildtype=debugoptimized -Dfuzz=true \
		-Db_sanitize=address,undefined -Db_lundef=false >"$dir.setup.log" 2>&1; then
		cat "$dir.setup.log"
		count 0 1
		exit 1
	fi
fi
if ! ninja -C "$dir" >"$dir.build.log" 2>&1; then
	cat "$dir.build.log"
	count 0 1
	exit 1
fi

# UBSan reports are fatal (libFuzzer then saves the input); leaks are reported.
export ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
mkdir -p tests/fuzz/crashes

nfiles() { find "$1" -maxdepth 1 -type f -name "${2:-*}" 2>/dev/null | wc -l; }

ok=0
bad=0
rows=()
for t in "${targets[@]}"; do
	bin=$dir/tests/fuzz/fuzz-$t
	seeds=tests/fuzz/corpus/$t
	work=$dir/corpus/$t
	log=$dir/fuzz-$t.log
	if [ ! -x "$bin" ] || [ ! -d "$seeds" ]; then
		echo "fuzz: no target '$t' (or no tests/fuzz/corpus/$t)" >&2
		rows+=("$t|-|-|error")
		bad=$((bad + 1))
		continue
	fi
	mkdir -p "$work"
	before=$(nfiles "$work")
	crashes_before=$(nfiles tests/fuzz/crashes "$t-*")
	echo "== fuzz-$t: $secs s (log: $log)"
	"$bin" -max_total_time="$secs" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
		-artifact_prefix="tests/fuzz/crashes/$t-" "$work" "$seeds" >"$log" 2>&1
	rc=$?
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
	new=$(($(nfiles "$work") - before))
	crashes=$(($(nfiles tests/fuzz/crashes "$t-*") - crashes_before))
	if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
		crashes=1 # stopped without saving an input: see the log
	fi
	if [ "$crashes" -gt 0 ]; then
		bad=$((bad + 1))
		grep -E '^(==[0-9]+==ERROR|SUMMARY|.*invariant broken|artifact_prefix|Test unit written)' \
			"$log" | head -n 8 | sed 's/^/  | /'
	else
		ok=$((ok + 1))
	fi
	rows+=("$t|${execs:-?}|$new|$crashes")
done

printf '\n%-14s | %10s | %10s | %7s\n' target execs "new corpus" crashes
printf '%s\n' "---------------|------------|------------|--------"
for r in "${rows[@]}"; do
	IFS='|' read -r t e n c <<<"$r"
	printf '%-14s | %10s | %10s | %7s\n' "$t" "$e" "$n" "$c"
done
echo "$ok target(s) passed, $bad failed ($secs s each)"
count "$ok" "$bad"
[ "$bad" -eq 0 ]
