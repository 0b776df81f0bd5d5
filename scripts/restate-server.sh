#!/usr/bin/env bash
# The real Restate server (npm package @restatedev/restate-server), the baseline of Ferry's
# benchmarks. The harness in chaos-tests/src/restate.rs starts and configures it.
#
# Usage:
#   scripts/restate-server.sh install   install restate-server $RESTATE_VERSION into
#                                       target/restate-server if missing; prints the binary's path
#   scripts/restate-server.sh path      prints the binary's path (fails if it is not installed)
#
# Environment:
#   RESTATE_VERSION   version to install (default: 1.7.12)
#
# The npm package is a launcher; the server itself is a static binary in the platform package
# @restatedev/restate-server-linux-x64 (or -linux-arm64). Its install scripts (telemetry) are
# not run.
set -euo pipefail

VERSION="${RESTATE_VERSION:-1.7.12}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$ROOT/target/restate-server"

die() { echo "restate-server.sh: $*" >&2; exit 1; }

platform_package() {
    case "$(uname -s)-$(uname -m)" in
        Linux-x86_64) echo "restate-server-linux-x64" ;;
        Linux-aarch64) echo "restate-server-linux-arm64" ;;
        *) die "no restate-server package for $(uname -s)-$(uname -m)" ;;
    esac
}

binary_path() {
    echo "$PREFIX/node_modules/@restatedev/$(platform_package)/bin/restate-server"
}

binary_ok() {
    local bin
    bin="$(binary_path)"
    [ -x "$bin" ] || return 1
    # `restate-server --version` prints e.g. "restate-server 1.7.12"
    [ "$("$bin" --version 2>/dev/null)" = "restate-server $VERSION" ]
}

cmd_install() {
    if ! binary_ok; then
        command -v npm >/dev/null 2>&1 || die "npm is needed to install restate-server"
        echo "restate-server.sh: installing @restatedev/restate-server@$VERSION into $PREFIX..." >&2
        mkdir -p "$PREFIX"
        npm install --prefix "$PREFIX" --ignore-scripts --no-audit --no-fund \
            "@restatedev/restate-server@$VERSION" >&2
        binary_ok || die "$(binary_path) is not restate-server $VERSION after install"
    fi
    binary_path
}

cmd_path() {
    binary_ok || die "restate-server $VERSION is not installed; run: $0 install"
    binary_path
}

case "${1:-}" in
    install) cmd_install ;;
    path) cmd_path ;;
    *) echo "usage: $0 {install|path}" >&2; exit 2 ;;
esac
