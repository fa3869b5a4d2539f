#!/usr/bin/env bash
# Configures and builds megaengine: build/release (optimised) and, with --asan, build/asan
# (AddressSanitizer + UndefinedBehaviorSanitizer). Assumes scripts/setup.sh has run.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$ME_ROOT_DIR"

build_one() {
	local dir=$1; shift
	if [ ! -f "$dir/build.ninja" ]; then
		meson setup "$dir" "$@" >"$dir.setup.log" 2>&1 || { cat "$dir.setup.log"; exit 1; }
	fi
	ninja -C "$dir" >"$dir.build.log" 2>&1 || { cat "$dir.build.log"; exit 1; }
}

mkdir -p build
build_one build/release --buildtype=debugoptimized
if [ "${1:-}" = "--asan" ]; then
	build_one build/asan --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false
fi
