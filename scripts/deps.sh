#!/usr/bin/env bash
# Builds the two libraries that Debian 12 doesn't ship in a usable form into build/deps/prefix:
#   - wolfSSL 5.5.4 (bookworm's source package, with its security patches), static, with QUIC;
#   - ngtcp2 1.11.0 (bookworm-backports' source), static, with its wolfSSL crypto backend.
# The sources come from Debian's archive as source packages (deb-src entries are derived from the
# machine's own apt sources) and are cached in build/deps/src. The result is cached too: a stamp
# in the prefix records a hash of this script (versions and flags included); while it matches,
# a rerun is an instant no-op. Logs: build/deps/*.log, shown when a step fails.
# Use the result with `. scripts/env.sh` (sets PKG_CONFIG_PATH).
set -euo pipefail
export LC_ALL=C

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
SELF="$ME_ROOT_DIR/scripts/deps.sh"

DEBIAN_CODENAME=bookworm
WOLFSSL_UPSTREAM=5.5.4
WOLFSSL_SUITES="^$DEBIAN_CODENAME(-security|-updates)?\$" # the release, with its fixes
NGTCP2_UPSTREAM=1.11.0
NGTCP2_SUITES="^$DEBIAN_CODENAME-backports\$"

PREFIX="$ME_DEPS_PREFIX"
DEPS_DIR="$ME_ROOT_DIR/build/deps"
SRC_DIR="$DEPS_DIR/src"
WORK_DIR="$DEPS_DIR/work"
STAMP="$PREFIX/.megaengine-deps-stamp"
SRC_LIST=/etc/apt/sources.list.d/megaengine-src.sources

WOLFSSL_FLAGS=(
	--enable-quic --enable-session-ticket --enable-earlydata --enable-psk --enable-harden
	--enable-altcertchains --enable-certgen --enable-ed25519 --enable-curve25519 --enable-sha3
	--enable-static --disable-shared
	# Not in ngtcp2's list, harmless: objects usable in shared objects too (ngtcp2 is built PIC
	# as well), and skip building wolfSSL's example programs and its test/benchmark programs.
	--with-pic --disable-examples --disable-crypttests
	# (--enable-quic turns on opensslextra, which ngtcp2's wolfSSL backend needs for the
	# wolfSSL_EVP_* API, by itself in 5.5.4.)
)
NGTCP2_FLAGS=(
	-DENABLE_WOLFSSL=ON -DENABLE_OPENSSL=OFF -DENABLE_GNUTLS=OFF -DENABLE_BORINGSSL=OFF
	-DENABLE_PICOTLS=OFF -DENABLE_SHARED_LIB=OFF -DENABLE_STATIC_LIB=ON
	-DCMAKE_POSITION_INDEPENDENT_CODE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	# ngtcp2's CMake has no ENABLE_LIB_ONLY (only its autotools build has --enable-lib-only):
	# the examples are built when libev and nghttp3 are found, so never look for them; and no
	# tests.
	-DBUILD_TESTING=OFF -DCMAKE_DISABLE_FIND_PACKAGE_Libev=ON
	-DCMAKE_DISABLE_FIND_PACKAGE_Libnghttp3=ON -DCMAKE_DISABLE_FIND_PACKAGE_Libbrotlienc=ON
	-DCMAKE_DISABLE_FIND_PACKAGE_Libbrotlidec=ON
)

OUTPUTS=(
	"$PREFIX/lib/libwolfssl.a" "$PREFIX/lib/libngtcp2.a" "$PREFIX/lib/libngtcp2_crypto_wolfssl.a"
	"$PREFIX/lib/pkgconfig/wolfssl.pc" "$PREFIX/lib/pkgconfig/libngtcp2.pc"
	"$PREFIX/lib/pkgconfig/libngtcp2_crypto_wolfssl.pc"
	"$PREFIX/include/wolfssl/options.h" "$PREFIX/include/ngtcp2/ngtcp2_crypto_wolfssl.h"
)

build_key() {
	{
		cat "$SELF"
		printf '%s\n' "$WOLFSSL_UPSTREAM" "$NGTCP2_UPSTREAM" "$PREFIX" "${WOLFSSL_FLAGS[@]}" \
			"${NGTCP2_FLAGS[@]}"
	} | sha256sum | cut -d' ' -f1
}

up_to_date() {
	local f
	[[ -f $STAMP && "$(head -n1 "$STAMP")" == "$KEY" ]] || return 1
	for f in "${OUTPUTS[@]}"; do [[ -f $f ]] || return 1; done
}

KEY="$(build_key)"
if up_to_date; then
	echo "deps: up to date (build/deps/prefix)"
	exit 0
fi

mkdir -p "$DEPS_DIR" "$SRC_DIR"
exec 9>"$DEPS_DIR/.lock"
flock 9 # another run may be building; wait for it, then look again
if up_to_date; then
	echo "deps: up to date (build/deps/prefix)"
	exit 0
fi

START=$SECONDS
LOG=""

fail() {
	echo "deps: error: $*" >&2
	if [[ -n $LOG && -s $LOG ]]; then
		echo "deps: last lines of ${LOG#"$ME_ROOT_DIR"/}:" >&2
		tail -n 60 "$LOG" | sed 's/^/  | /' >&2
	fi
	exit 1
}

# run STEP CMD...: runs CMD with its output appended to build/deps/STEP.log (LOG must be set).
run() {
	local step="$1"
	shift
	echo "+ $*" >>"$LOG"
	"$@" >>"$LOG" 2>&1 || fail "$step failed (full log: ${LOG#"$ME_ROOT_DIR"/})"
}

# --- apt sources ---------------------------------------------------------------------------------

# Prints a deb822 sources file with deb-src stanzas for the Debian suites in the machine's apt
# sources that lack one, and $DEBIAN_CODENAME-backports (deb and deb-src) from the URIs, components
# and key of the stanza that has $DEBIAN_CODENAME itself. Reads deb822 (*.sources) and one-line
# (sources.list, *.list) files. Fields other than Types/URIs/Suites/Enabled are copied verbatim.
# Only stanzas with the "main" component are taken, so that third-party repositories that happen
# to use the codename as their suite are left out.
# shellcheck disable=SC2016
SOURCES_AWK='
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function join(a, b) { return a == "" ? b : a " " b }
function is_debian_suite(s) {
	return s == CODENAME || s == CODENAME "-updates" || s == CODENAME "-security" ||
		s == CODENAME "/updates" || s == CODENAME "-backports"
}
function end_stanza(   en, nt, nu, ns, T, U, S) {
	if (nf == 0) return
	en = tolower(trim(F["enabled"]))
	if (en != "no" && en != "false") {
		nt = split(F["types"], T, /[ \t\n]+/); nu = split(F["uris"], U, /[ \t\n]+/)
		ns = split(F["suites"], S, /[ \t\n]+/)
		add_entry(T, nt, U, nu, S, ns)
	}
	delete F; delete ORD; nf = 0
}
function add_entry(T, nt, U, nu, S, ns,   i, j, k, hasdeb, C, nc, main, o) {
	hasdeb = 0
	for (i = 1; i <= nt; i++) if (T[i] != "") {
		if (T[i] == "deb") hasdeb = 1
		for (j = 1; j <= nu; j++) if (U[j] != "") for (k = 1; k <= ns; k++) if (S[k] != "")
			HAVE[T[i] SUBSEP U[j] SUBSEP S[k]] = 1
	}
	if (!hasdeb) return
	main = 0; nc = split(F["components"], C, /[ \t\n]+/)
	for (i = 1; i <= nc; i++) if (C[i] == "main") main = 1
	if (!main) return
	ne++; EU[ne] = ""; ES[ne] = ""
	for (j = 1; j <= nu; j++) if (U[j] != "") EU[ne] = join(EU[ne], U[j])
	for (k = 1; k <= ns; k++) if (is_debian_suite(S[k])) ES[ne] = join(ES[ne], S[k])
	o = ""
	for (i = 1; i <= nf; i++) {
		if (ORD[i] == "types" || ORD[i] == "uris" || ORD[i] == "suites" || ORD[i] == "enabled") continue
		o = o NAME[ORD[i]] ":" (F[ORD[i]] ~ /^\n/ ? "" : " ") F[ORD[i]] "\n"
	}
	EO[ne] = o
}
# Prints a stanza of the given types for entry e, leaving out what some source already has.
function emit(types, e, suites,   T, nt, U, nu, S, ns, i, j, k, ot, os, need) {
	nt = split(types, T, " "); nu = split(EU[e], U, " "); ns = split(suites, S, " ")
	ot = ""
	for (i = 1; i <= nt; i++) {
		need = 0
		for (j = 1; j <= nu; j++) for (k = 1; k <= ns; k++) if (!((T[i] SUBSEP U[j] SUBSEP S[k]) in HAVE)) need = 1
		if (need) ot = join(ot, T[i])
	}
	os = ""
	for (k = 1; k <= ns; k++) {
		need = 0
		for (i = 1; i <= nt; i++) for (j = 1; j <= nu; j++) if (!((T[i] SUBSEP U[j] SUBSEP S[k]) in HAVE)) need = 1
		if (need) os = join(os, S[k])
	}
	if (ot == "" || os == "") return
	printf "\nTypes: %s\nURIs: %s\nSuites: %s\n%s", ot, EU[e], os, EO[e]
	stanzas++
}
FNR == 1 { end_stanza(); deb822 = (FILENAME ~ /\.sources$/); last = "" }
deb822 && /^[ \t]*#/ { next }
deb822 && /^[ \t]*$/ { end_stanza(); last = ""; next }
deb822 && /^[ \t]/ { if (last != "") F[last] = F[last] "\n" $0; next }
deb822 && /^[A-Za-z0-9-]+:/ {
	n = index($0, ":"); key = substr($0, 1, n - 1); lk = tolower(key)
	if (!(lk in F)) ORD[++nf] = lk
	NAME[lk] = key; F[lk] = trim(substr($0, n + 1)); last = lk; next
}
deb822 { next }
# One-line format: type [options] uri suite [component...]
/^[ \t]*(deb|deb-src)[ \t]/ {
	line = $0; sub(/#.*/, "", line); opts = ""
	if (match(line, /\[[^]]*\]/)) {
		opts = substr(line, RSTART + 1, RLENGTH - 2)
		line = substr(line, 1, RSTART - 1) " " substr(line, RSTART + RLENGTH)
	}
	n = split(line, W, /[ \t]+/); w = 0
	for (i = 1; i <= n; i++) if (W[i] != "") X[++w] = W[i]
	if (w < 3) next
	delete F; delete ORD; nf = 0
	comps = ""; for (i = 4; i <= w; i++) comps = join(comps, X[i])
	if (comps != "") { ORD[++nf] = "components"; NAME["components"] = "Components"; F["components"] = comps }
	no = split(opts, O, /[ \t]+/)
	for (i = 1; i <= no; i++) {
		if (O[i] !~ /=/) continue
		k = substr(O[i], 1, index(O[i], "=") - 1); v = substr(O[i], index(O[i], "=") + 1)
		if (k == "signed-by") { lk = "signed-by"; key = "Signed-By"; gsub(/,/, " ", v) }
		else if (k == "trusted") { lk = "trusted"; key = "Trusted" }
		else if (k == "check-valid-until") { lk = "check-valid-until"; key = "Check-Valid-Until" }
		else continue
		ORD[++nf] = lk; NAME[lk] = key; F[lk] = v
	}
	T1[1] = X[1]; U1[1] = X[2]; S1[1] = X[3]
	add_entry(T1, 1, U1, 1, S1, 1)
	delete F; delete ORD; nf = 0
}
END {
	end_stanza()
	print "# Written by scripts/deps.sh (megaengine) from the other apt sources of this machine: the"
	print "# source packages of the same archives, and " CODENAME "-backports (pinned low by apt by default)."
	for (e = 1; e <= ne; e++) {
		s = ""; n = split(ES[e], S, " ")
		for (k = 1; k <= n; k++) if (S[k] != CODENAME "-backports") s = join(s, S[k])
		if (s != "") emit("deb-src", e, s)
	}
	for (e = 1; e <= ne; e++) {
		n = split(ES[e], S, " "); has = 0
		for (k = 1; k <= n; k++) if (S[k] == CODENAME) has = 1
		if (has) { emit("deb deb-src", e, CODENAME "-backports"); break }
	}
	if (!stanzas) print "# (nothing to add: the other sources have it all)"
}'

APT_UPDATED=0

apt_update() {
	run apt-update env DEBIAN_FRONTEND=noninteractive apt-get update
	APT_UPDATED=1
}

# Writes $SRC_LIST (when its content changes) and runs apt-get update when it did.
ensure_apt_sources() {
	local codename new inputs=() f
	# shellcheck disable=SC1091
	codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
	[[ $codename == "$DEBIAN_CODENAME" ]] ||
		fail "this is meant for Debian $DEBIAN_CODENAME, and this machine is '${codename:-unknown}'"
	for f in /etc/apt/sources.list.d/*.sources; do
		[[ -f $f && $f != "$SRC_LIST" ]] && inputs+=("$f")
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[[ -f $f ]] && inputs+=("$f")
	done
	((${#inputs[@]})) || fail "no apt sources found in /etc/apt"
	new="$(awk -v CODENAME="$DEBIAN_CODENAME" "$SOURCES_AWK" "${inputs[@]}")"
	grep -q '^Types:' <<<"$new" || {
		# The machine's own sources have every deb-src and backports entry already.
		if [[ -e $SRC_LIST ]]; then
			[[ $EUID -eq 0 ]] || fail "run as root to update $SRC_LIST"
			rm -f "$SRC_LIST"
			apt_update
		fi
		return 0
	}
	if [[ -f $SRC_LIST && "$(cat "$SRC_LIST")" == "$new" ]]; then
		return 0
	fi
	[[ $EUID -eq 0 ]] || fail "run as root (or scripts/setup.sh) to write $SRC_LIST"
	echo "deps: writing $SRC_LIST (deb-src entries, $DEBIAN_CODENAME-backports)"
	printf '%s\n' "$new" >"$SRC_LIST.tmp"
	chmod 644 "$SRC_LIST.tmp"
	mv -f "$SRC_LIST.tmp" "$SRC_LIST"
	# If the update fails, drop the file so that the next run writes it and updates again.
	if ! (apt_update); then
		rm -f "$SRC_LIST"
		exit 1
	fi
	APT_UPDATED=1
}

# --- sources -------------------------------------------------------------------------------------

# resolve_version PKG UPSTREAM SUITE_REGEX: prints the newest Debian version of source package
# PKG whose upstream part is UPSTREAM, in a suite matching SUITE_REGEX.
resolve_version() {
	local pkg="$1" upstream="$2" suites="$3" best="" v
	while read -r v; do
		if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$best"; then best="$v"; fi
	done < <(apt-cache madison "$pkg" 2>/dev/null | awk -F'|' -v up="$upstream" -v re="$suites" '
		{ gsub(/^[ \t]+|[ \t]+$/, "", $2); n = split($3, w, " ") }
		w[n] != "Sources" { next }
		{ suite = w[n - 1]; sub(/\/.*/, "", suite) }
		suite !~ re { next }
		{ v = $2; sub(/^[0-9]+:/, "", v); sub(/-[^-]*$/, "", v); sub(/[+~]dfsg.*$/, "", v) }
		v == up { print $2 }')
	printf '%s' "$best"
}

# fetch_source PKG UPSTREAM SUITE_REGEX: makes sure build/deps/src has the source package's files,
# checked against the archive's (signed) index; sets SRC_DSC (empty when the .dsc can't be had)
# and SRC_ORIG (the upstream tarball).
fetch_source() {
	local pkg="$1" upstream="$2" suites="$3" manifest="$SRC_DIR/$1-$2.manifest" ver files
	LOG="$DEPS_DIR/fetch-$pkg.log"
	if ! [[ -s $manifest ]] || ! (cd "$SRC_DIR" && sha256sum --quiet -c <(sed 1d "$manifest")) \
		>/dev/null 2>&1; then
		: >"$LOG"
		[[ $APT_UPDATED == 1 ]] || ensure_apt_sources
		ver="$(resolve_version "$pkg" "$upstream" "$suites")"
		if [[ -z $ver && $APT_UPDATED == 0 ]]; then
			apt_update # the package lists may be missing or old
			ver="$(resolve_version "$pkg" "$upstream" "$suites")"
		fi
		[[ -n $ver ]] || fail "no source package $pkg $upstream in suites $suites (apt-cache madison $pkg)"
		echo "deps: fetching $pkg $ver"
		# The file list with SHA-256 sums, from the archive's index for that version.
		files="$(apt-cache showsrc --only-source "$pkg" | awk -v ver="$ver" '
			BEGIN { RS = "" }
			{
				n = split($0, L, "\n"); v = ""
				for (i = 1; i <= n; i++) if (L[i] ~ /^Version:/) { v = L[i]; sub(/^Version:[ \t]*/, "", v) }
				if (v != ver) next
				s = 0
				for (i = 1; i <= n; i++) {
					if (L[i] ~ /^Checksums-Sha256:/) { s = 1; continue }
					if (L[i] !~ /^ /) s = 0
					if (s) { split(L[i], w, " "); print w[1] "  " w[3] }
				}
			}' | sort -u -k2)"
		[[ -n $files ]] || fail "apt-cache showsrc lists no files for $pkg $ver"
		# The archive may lack some of a version's files (seen: a backport's .dsc and Debian
		# tarball answered 404 while its upstream tarball, shared with another version, was
		# there); carry on with what could be had, and check that below.
		(cd "$SRC_DIR" && apt-get -o APT::Sandbox::User=root source --download-only "$pkg=$ver") \
			>>"$LOG" 2>&1 || echo "deps: warning: could not fetch all of $pkg $ver (see ${LOG#"$ME_ROOT_DIR"/})"
		{
			echo "$ver"
			while read -r sum name; do
				if [[ -f $SRC_DIR/$name ]] && [[ "$(sha256sum <"$SRC_DIR/$name" | cut -d' ' -f1)" == "$sum" ]]; then
					echo "$sum  $name"
				else
					rm -f "$SRC_DIR/$name"
				fi
			done <<<"$files"
		} >"$manifest.tmp"
		mv -f "$manifest.tmp" "$manifest"
	fi
	ver="$(head -n1 "$manifest")"
	SRC_VERSION="$ver"
	SRC_DSC="$(awk 'NR > 1 && $2 ~ /\.dsc$/ { print $2 }' "$manifest")"
	SRC_ORIG="$(awk 'NR > 1 && $2 ~ /\.orig\.tar\.[a-z0-9]+$/ { print $2 }' "$manifest")"
	if [[ -n $SRC_DSC ]]; then
		# dpkg-source needs every file the .dsc names.
		local need
		while read -r need; do
			grep -qF "  $need" "$manifest" || SRC_DSC=""
		done < <(awk '/^Files:/ { f = 1; next } /^[^ ]/ { f = 0 } f { print $3 }' "$SRC_DIR/$SRC_DSC")
	fi
	[[ -n $SRC_DSC || -n $SRC_ORIG ]] ||
		{ rm -f "$manifest"; fail "could not download the sources of $pkg $ver (see ${LOG#"$ME_ROOT_DIR"/})"; }
}

# unpack PKG DIR: unpacks the fetched source into DIR: the Debian source package (upstream plus
# Debian's patches) when its .dsc was had, else the upstream tarball.
unpack() {
	local pkg="$1" dir="$2"
	rm -rf "$dir"
	mkdir -p "$(dirname "$dir")"
	if [[ -n $SRC_DSC ]]; then
		run "unpacking $pkg" dpkg-source --no-check -x "$SRC_DIR/$SRC_DSC" "$dir"
	else
		echo "deps: note: Debian's .dsc for $pkg $SRC_VERSION isn't in the archive; building its upstream tarball ($SRC_ORIG, checksum checked) without Debian's patches"
		mkdir -p "$dir"
		run "unpacking $pkg" tar -xf "$SRC_DIR/$SRC_ORIG" -C "$dir" --strip-components=1
	fi
}

# --- build ---------------------------------------------------------------------------------------

fetch_source wolfssl "$WOLFSSL_UPSTREAM" "$WOLFSSL_SUITES"
WOLFSSL_DSC="$SRC_DSC" WOLFSSL_ORIG="$SRC_ORIG" WOLFSSL_VERSION="$SRC_VERSION"
fetch_source ngtcp2 "$NGTCP2_UPSTREAM" "$NGTCP2_SUITES"
NGTCP2_DSC="$SRC_DSC" NGTCP2_ORIG="$SRC_ORIG" NGTCP2_VERSION="$SRC_VERSION"

if dpkg-query -W -f='${db:Status-Abbrev}' libwolfssl-dev 2>/dev/null | grep -q '^ii'; then
	echo "deps: warning: Debian's libwolfssl-dev is installed; it's not used here, but take care" \
		"that nothing else picks up /usr/include/wolfssl (apt-get remove libwolfssl-dev)" >&2
fi

rm -rf "$PREFIX" "$WORK_DIR"
mkdir -p "$PREFIX/lib/pkgconfig" "$WORK_DIR"
JOBS="$(nproc)"

echo "deps: building wolfssl $WOLFSSL_VERSION (log: build/deps/wolfssl.log)"
LOG="$DEPS_DIR/wolfssl.log"
: >"$LOG"
SRC_DSC="$WOLFSSL_DSC" SRC_ORIG="$WOLFSSL_ORIG" SRC_VERSION="$WOLFSSL_VERSION"
unpack wolfssl "$WORK_DIR/wolfssl"
cd "$WORK_DIR/wolfssl"
# The orig tarball is a git export without configure. autogen.sh also makes the empty stand-ins
# for optional sources (FIPS, async, ...) that the Makefiles list.
if [[ ! -x configure ]]; then run "wolfssl autogen" ./autogen.sh; fi
run "wolfssl configure" ./configure --prefix="$PREFIX" --libdir="$PREFIX/lib" "${WOLFSSL_FLAGS[@]}"
run "wolfssl build" make -j"$JOBS"
run "wolfssl install" make install

echo "deps: building ngtcp2 $NGTCP2_VERSION (log: build/deps/ngtcp2.log)"
LOG="$DEPS_DIR/ngtcp2.log"
: >"$LOG"
SRC_DSC="$NGTCP2_DSC" SRC_ORIG="$NGTCP2_ORIG" SRC_VERSION="$NGTCP2_VERSION"
unpack ngtcp2 "$WORK_DIR/ngtcp2"
# Our wolfSSL, by explicit paths: ngtcp2's Findwolfssl would otherwise fall back to the system's.
run "ngtcp2 configure" env PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig" \
	cmake -S "$WORK_DIR/ngtcp2" -B "$WORK_DIR/ngtcp2-build" -G Ninja \
	-DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_INSTALL_LIBDIR=lib \
	-DWOLFSSL_INCLUDE_DIR="$PREFIX/include" -DWOLFSSL_LIBRARY="$PREFIX/lib/libwolfssl.a" \
	"${NGTCP2_FLAGS[@]}"
grep -q "^WOLFSSL_LIBRARY:FILEPATH=$PREFIX/lib/libwolfssl.a\$" "$WORK_DIR/ngtcp2-build/CMakeCache.txt" ||
	fail "ngtcp2 didn't take the wolfSSL in $PREFIX"
run "ngtcp2 build" cmake --build "$WORK_DIR/ngtcp2-build" -j "$JOBS"
run "ngtcp2 install" cmake --install "$WORK_DIR/ngtcp2-build"

# Everything in PREFIX/lib (were anything to land in lib64, move it), and pkg-config files that
# link statically as they are: wolfssl.pc lacks the libraries that configure found it needs
# (libm: pow and log in dh.c; pthread, which is in libc since glibc 2.34 but costs nothing), and
# libngtcp2_crypto_wolfssl.pc names neither ngtcp2 nor wolfSSL, which it needs (so that
# `pkg-config --static --libs libngtcp2_crypto_wolfssl` is complete, and in link order).
LOG="$DEPS_DIR/install.log"
: >"$LOG"
if [[ -d $PREFIX/lib64 ]]; then
	run "lib64 move" cp -a "$PREFIX/lib64/." "$PREFIX/lib/"
	rm -rf "${PREFIX:?}/lib64"
	sed -i "s#^libdir=.*#libdir=\${exec_prefix}/lib#" "$PREFIX"/lib/pkgconfig/*.pc
fi
pc="$PREFIX/lib/pkgconfig/wolfssl.pc"
grep -q '^Libs.private:' "$pc" || echo 'Libs.private: -lm -lpthread' >>"$pc"
pc="$PREFIX/lib/pkgconfig/libngtcp2_crypto_wolfssl.pc"
grep -q '^Requires' "$pc" || echo 'Requires.private: libngtcp2 wolfssl' >>"$pc"
for f in "${OUTPUTS[@]}"; do [[ -f $f ]] || fail "missing after install: $f"; done

# Smoke test: link statically against all three by pkg-config, and run.
cat >"$WORK_DIR/smoke.c" <<'EOF'
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <ngtcp2/ngtcp2_crypto_wolfssl.h>
int main(void)
{
	wolfSSL_Init();
	WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfTLSv1_3_client_method());
	int rc = ctx && ngtcp2_crypto_wolfssl_configure_client_context(ctx) == 0 ? 0 : 1;
	wolfSSL_CTX_free(ctx);
	wolfSSL_Cleanup();
	return rc;
}
EOF
# shellcheck disable=SC2046
run "smoke test build" cc -o "$WORK_DIR/smoke" "$WORK_DIR/smoke.c" \
	$(PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig" pkg-config --cflags --libs --static libngtcp2_crypto_wolfssl)
run "smoke test" "$WORK_DIR/smoke"

# Sources stay cached in build/deps/src; the unpacked trees and build trees go.
cd "$ME_ROOT_DIR"
rm -rf "$WORK_DIR"
printf '%s\nwolfssl %s\nngtcp2 %s\n' "$KEY" "$WOLFSSL_VERSION" "$NGTCP2_VERSION" >"$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"
echo "deps: built wolfssl $WOLFSSL_VERSION and ngtcp2 $NGTCP2_VERSION in build/deps/prefix ($((SECONDS - START))s)"
echo "deps: PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig (or: . scripts/env.sh)"
