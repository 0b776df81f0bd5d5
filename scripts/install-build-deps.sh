#!/usr/bin/env bash
# Installs what building Ferry needs beyond a Rust toolchain: a C toolchain,
# make, perl and pkg-config for librdkafka (built from source by rdkafka-sys),
# and OpenSSL's headers for its TLS and SASL/SCRAM support.
# Used by scripts/test.sh and by the Dockerfile, so CI and the image build the
# same way. Does nothing when every tool is there.
set -euo pipefail

missing=()
for tool in cc c++ make perl pkg-config; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl || missing+=("OpenSSL headers")
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing build tools (missing: ${missing[*]})"
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
$sudo_cmd apt-get update -q
$sudo_cmd apt-get install -y -q --no-install-recommends build-essential pkg-config perl libssl-dev
