#!/usr/bin/env bash
# Gossip benchmark: N megaengined daemons on loopback (default 50), the epidemic broadcast tree.
# Measures the time until every node lists one announcement (target < 3 s), the messages it
# cost (target <= 2 (N - 1)) against flooding, and each daemon's idle RSS; prints a Markdown
# report with PASS/FAIL and exits 1 on a FAIL. Builds build/release first.
#
#   bench/gossip.sh [-n N] [--seed S] [--keep] [--no-build] [options of bench/gossip_bench.py]
#
# Only 127.0.0.1 is used. Every daemon started is stopped on exit, however the run ends.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
-h | --help)
	sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
	exec /usr/bin/python3 bench/gossip_bench.py --help
	;;
esac

build=1
args=()
for a in "$@"; do
	case "$a" in
	--no-build) build=0 ;;
	*) args+=("$a") ;;
	esac
done
set -- "${args[@]+"${args[@]}"}"
[ "$build" = 0 ] || bash scripts/build.sh

workdir=$(mktemp -d /tmp/me-bench-XXXXXX)
pypid=
keep=0
for a in "$@"; do [ "$a" = --keep ] && keep=1; done
cleanup() {
	trap - EXIT INT TERM
	if [ -n "$pypid" ] && kill -0 "$pypid" 2>/dev/null; then
		kill -TERM "$pypid" 2>/dev/null || true
		wait "$pypid" 2>/dev/null || true
	fi
	# Whatever the helper could not stop: only the daemons it started, by pid.
	if [ -f "$workdir/pids" ]; then
		while read -r pid; do
			if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
				grep -q megaengined "/proc/$pid/cmdline" 2>/dev/null; then
				kill -KILL "$pid" 2>/dev/null || true
			fi
		done <"$workdir/pids"
	fi
	[ "$keep" = 1 ] || rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

/usr/bin/python3 bench/gossip_bench.py --workdir "$workdir" "$@" &
pypid=$!
wait "$pypid"
