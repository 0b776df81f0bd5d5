#!/usr/bin/env bash
# Restate's own programs from npm, at one version: the server (restate-server, the
# baseline of Ferry's benchmarks, started by chaos-tests/src/restate.rs) and the CLI
# (restate, run against Ferry by chaos-tests/tests/restate_cli.rs).
#
# Usage:
#   scripts/restate.sh install server|cli   install it into target/restate-server or
#                                           target/restate-cli if missing; prints the binary's path
#   scripts/restate.sh path server|cli      prints the binary's path (fails if it is not installed)
#
# Environment:
#   RESTATE_VERSION   version to install (default: 1.7.12)
#
# Each npm package is a launcher; the program itself is a static binary in a platform
# package (@restatedev/restate-server-linux-x64, @restatedev/restate-linux-x64, or the
# -linux-arm64 ones). Their install scripts (telemetry) are not run.
set -euo pipefail

VERSION="${RESTATE_VERSION:-1.7.12}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "restate.sh: $*" >&2; exit 1; }

arch() {
    case "$(uname -s)-$(uname -m)" in
        Linux-x86_64) echo "linux-x64" ;;
        Linux-aarch64) echo "linux-arm64" ;;
        *) die "no Restate package for $(uname -s)-$(uname -m)" ;;
    esac
}

# program -> npm package, binary name, and the first word `--version` prints
case "${2:-}" in
    server) PACKAGE=restate-server BINARY=restate-server BANNER=restate-server ;;
    cli) PACKAGE=restate BINARY=restate BANNER=restate-cli ;;
    *) echo "usage: $0 {install|path} {server|cli}" >&2; exit 2 ;;
esac
PREFIX="$ROOT/target/$BANNER"

binary_path() {
    echo "$PREFIX/node_modules/@restatedev/$PACKAGE-$(arch)/bin/$BINARY"
}

binary_ok() {
    local bin
    bin="$(binary_path)"
    [ -x "$bin" ] || return 1
    # e.g. "restate-server 1.7.12", "restate-cli 1.7.12 (577e032 x86_64-unknown-linux-musl ...)"
    case "$("$bin" --version 2>/dev/null)" in
        "$BANNER $VERSION" | "$BANNER $VERSION "*) return 0 ;;
        *) return 1 ;;
    esac
}

cmd_install() {
    if ! binary_ok; then
        command -v npm >/dev/null 2>&1 || die "npm is needed to install @restatedev/$PACKAGE"
        echo "restate.sh: installing @restatedev/$PACKAGE@$VERSION into $PREFIX..." >&2
        mkdir -p "$PREFIX"
        npm install --prefix "$PREFIX" --ignore-scripts --no-audit --no-fund \
            "@restatedev/$PACKAGE@$VERSION" >&2
        binary_ok || die "$(binary_path) is not $BANNER $VERSION after install"
    fi
    binary_path
}

cmd_path() {
    binary_ok || die "$BANNER $VERSION is not installed; run: $0 install $2"
    binary_path
}

case "${1:-}" in
    install) cmd_install ;;
    path) cmd_path "$@" ;;
    *) echo "usage: $0 {install|path} {server|cli}" >&2; exit 2 ;;
esac
