# shellcheck shell=bash
# Sourced by the other scripts (and usable from a shell: `. scripts/env.sh`). Exports the repo
# root, the prefix that scripts/deps.sh builds wolfSSL and ngtcp2 into, and a PKG_CONFIG_PATH that
# finds that prefix first.
ME_ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ME_DEPS_PREFIX="$ME_ROOT_DIR/build/deps/prefix"
case ":${PKG_CONFIG_PATH:-}:" in
	*":$ME_DEPS_PREFIX/lib/pkgconfig:"*) ;; # sourced before: don't add it twice
	*) PKG_CONFIG_PATH="$ME_DEPS_PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" ;;
esac
export ME_ROOT_DIR ME_DEPS_PREFIX PKG_CONFIG_PATH
