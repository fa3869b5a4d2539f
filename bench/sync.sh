#!/usr/bin/env bash
# Replication benchmark: two, then four megaengined daemons on loopback against `git daemon` +
# `git clone --mirror` / `git fetch`, side by side in the same run: full replication time, bytes
# and time of a one-commit update, commit-to-3-peers latency, peak RSS. Prints a Markdown table
# with PASS/FAIL against issue 8's targets. Builds build/release first.
#
#   bench/sync.sh [REPO] [--keep] [--no-build] [options of bench/sync_bench.py]
#
# REPO defaults to a generated repository of about 10,000 commits, cached under build/bench/.
# Only 127.0.0.1 is used. The run directory is build/bench/run-*, removed afterwards (--keep
# keeps it); every daemon started is stopped on exit, however the run ends.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
-h | --help)
	sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
	exec /usr/bin/python3 bench/sync_bench.py --help
	;;
esac

build=1
keep=0
args=()
for a in "$@"; do
	case "$a" in
	--no-build) build=0 ;;
	--keep)
		keep=1
		args+=("$a")
		;;
	*) args+=("$a") ;;
	esac
done
set -- "${args[@]+"${args[@]}"}"
[ "$build" = 0 ] || bash scripts/build.sh

mkdir -p build/bench
workdir=$(mktemp -d "$PWD/build/bench/run-XXXXXX")
pypid=
cleanup() {
	trap - EXIT INT TERM
	if [ -n "$pypid" ] && kill -0 "$pypid" 2>/dev/null; then
		kill -TERM "$pypid" 2>/dev/null || true
		wait "$pypid" 2>/dev/null || true
	fi
	# Whatever the helper could not stop: only the processes it started, by pid. They may be
	# stopping on their own (Ctrl-C reaches the whole process group): give them 10 s.
	if [ -f "$workdir/pids" ]; then
		local left tries=0
		while :; do
			left=()
			while read -r pid; do
				if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
					grep -qaE 'megaengined|git' "/proc/$pid/cmdline" 2>/dev/null; then
					left+=("$pid")
				fi
			done <"$workdir/pids"
			[ "${#left[@]}" -gt 0 ] || break
			if [ "$tries" -ge 100 ]; then
				kill -KILL "${left[@]}" 2>/dev/null || true
				sleep 0.2
				break
			fi
			tries=$((tries + 1))
			sleep 0.1
		done
	fi
	if [ "$keep" = 1 ]; then
		echo "kept $workdir" >&2
	else
		rm -rf "$workdir"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

/usr/bin/python3 bench/sync_bench.py --workdir "$workdir" "$@" &
pypid=$!
wait "$pypid"
