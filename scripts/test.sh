#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: installs what the tests need
# (a C toolchain for librdkafka, the tansu broker, the Restate Python SDK in a
# virtualenv under target/, the TypeScript SDK and Node.js 22 and Restate's
# CLI under target/),
# then checks formatting, lints with warnings denied, builds every binary and
# runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }

step "build tools"
scripts/install-build-deps.sh

step "test broker"
scripts/broker.sh install

step "Restate Python SDK (compatibility tests)"
python_env=target/python-sdk
if ! "$python_env/bin/python" -c 'import restate, hypercorn' >/dev/null 2>&1; then
    python3 -m venv "$python_env"
    "$python_env/bin/pip" install -q restate-sdk==1.2.0 hypercorn==0.18.0
fi

step "Restate TypeScript SDK and Node.js 22 (compatibility tests)"
scripts/typescript-sdk.sh install >/dev/null

step "Restate's CLI (compatibility tests)"
scripts/restate.sh install cli >/dev/null

if ! command -v cargo-nextest >/dev/null 2>&1; then
    step "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "building binaries and tests"
# With the tests' dev-dependencies, so the binaries the tests start are the
# test builds (fail points compiled in) and nextest builds nothing twice.
cargo build --workspace --all-targets --locked

step "tests"
cargo nextest run --workspace --locked --no-fail-fast
