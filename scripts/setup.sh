#!/usr/bin/env bash
# Prepares a Debian 12 machine to build and test megaengine: installs the Debian packages it needs
# (as root; skipped when all are installed already), then builds wolfSSL and ngtcp2 into
# build/deps/prefix (scripts/deps.sh, cached). Idempotent: a rerun on a ready machine is quick.
set -euo pipefail
export LC_ALL=C

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

PACKAGES=(
	build-essential meson ninja-build pkg-config
	libuv1-dev libsqlite3-dev sqlite3 libgit2-dev libsodium-dev libmsgpack-dev libsystemd-dev
	libinih-dev libjansson-dev
	libcmocka-dev python3-pytest python3-msgpack git jq
	# for scripts/deps.sh: source packages, wolfSSL's autotools, ngtcp2's CMake, and clang
	dpkg-dev cmake autoconf automake libtool clang
	# for scripts/fuzz.sh: clang's runtimes (libFuzzer, ASan, UBSan)
	libclang-rt-dev
	# for the booted-systemd test (tests/systemd): a Debian root, booted with systemd-nspawn
	debootstrap systemd-container iproute2
	# for tests/integration/test_faults.py: partitions and packet loss between network namespaces
	nftables
)

# The packages not installed (dpkg's "ii": wanted install, status installed).
missing=()
declare -A installed=()
while read -r name status; do
	[[ $status == ii ]] && installed[${name%%:*}]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${PACKAGES[@]}" 2>/dev/null || true)
for p in "${PACKAGES[@]}"; do
	[[ -n ${installed[$p]:-} ]] || missing+=("$p")
done

if ((${#missing[@]})); then
	[[ $EUID -eq 0 ]] || { echo "setup: run as root to install: ${missing[*]}" >&2; exit 1; }
	mkdir -p "$ME_ROOT_DIR/build"
	log="$ME_ROOT_DIR/build/setup-apt.log"
	echo "setup: installing ${missing[*]} (log: build/setup-apt.log)"
	export DEBIAN_FRONTEND=noninteractive
	apt_opts=(-q -y -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confold)
	# A package is missing, so the package lists may well be old (or absent): update them first.
	if ! { apt-get "${apt_opts[@]}" update && apt-get "${apt_opts[@]}" install \
		"${PACKAGES[@]}"; } >"$log" 2>&1; then
		echo "setup: apt-get failed; its output:" >&2
		tail -n 100 "$log" | sed 's/^/  | /' >&2
		exit 1
	fi
else
	echo "setup: packages installed"
fi

exec bash "$ME_ROOT_DIR/scripts/deps.sh"
