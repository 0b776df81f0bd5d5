#!/usr/bin/env bash
# Kafka-compatible test broker (tansu 0.6) for Ferry's end-to-end tests.
#
# Usage:
#   scripts/broker.sh install          install tansu 0.6.x with the in-memory and SQLite storage
#                                      engines if missing, and openssl and socat (the TLS front
#                                      the tests put before tansu, which cannot serve TLS itself:
#                                      its --cert and --key flags exclude each other); prints
#                                      tansu's path
#   scripts/broker.sh start            start a broker on 127.0.0.1 (port $BROKER_PORT or a free one);
#                                      prints "BROKER=127.0.0.1:PORT", "PID=<pid>" and "LOG=<file>"
#   scripts/broker.sh stop PID         stop a broker started by `start`
#
# Environment:
#   BROKER_PORT           port to listen on (default: a free loopback port)
#   BROKER_LOG            log file (default: ${TMPDIR:-/tmp}/ferry-tansu-PORT.log)
#   BROKER_CLUSTER_ID     Kafka cluster id (default: ferry_test)
#   BROKER_START_TIMEOUT  seconds to wait for the port (default: 30)
#   BROKER_RUST_LOG       tansu's log filter (default: warn; "info" writes ~1 GB per 20 min of tests)
#
# `start` gives an in-memory broker: everything is lost when it stops. (The tests' harness
# also starts brokers on `sqlite://` storage, which survive a restart.) tansu does NOT auto-create
# topics: create them first, e.g. with the CreateTopics API or
#   tansu topic create NAME --partitions 4 --broker tcp://127.0.0.1:PORT
# Known tansu 0.6 quirks that tests must work around:
#  - produce test records one per batch (librdkafka `batch.num.messages=1`): a Fetch from
#    an offset inside a multi-record batch silently skips the rest of that batch, and
#    ListOffsets(latest) returns "base offset of the newest batch + 1";
#  - with eager assignors (librdkafka's default "range,roundrobin") the partitions of a
#    consumer that dies without leaving the group are not reassigned; use
#    partition.assignment.strategy=cooperative-sticky or assign() partitions manually;
#  - clients must bundle librdkafka >= 2.2 (Debian 12's 2.0.2 cannot parse its ApiVersions).
set -euo pipefail

TANSU_VERSION_REQ='^0.6'
TANSU_FEATURES='dynostore,libsql'

die() { echo "broker.sh: $*" >&2; exit 1; }

tansu_ok() {
    command -v tansu >/dev/null 2>&1 || return 1
    # `tansu --version` prints e.g. "tansu 0.6.0"
    tansu --version 2>/dev/null | grep -Eq '^tansu 0\.6\.[0-9]+' || return 1
    # Installed by cargo with every storage engine the tests use.
    python3 - "$TANSU_FEATURES" <<'EOF'
import json, os, sys
home = os.environ.get("CARGO_HOME") or os.path.expanduser("~/.cargo")
installs = json.load(open(os.path.join(home, ".crates2.json")))["installs"]
wanted = set(sys.argv[1].split(","))
sys.exit(0 if any(k.startswith("tansu ") and wanted <= set(v["features"]) for k, v in installs.items()) else 1)
EOF
}

cmd_install() {
    export PATH="$HOME/.cargo/bin:$PATH"
    if ! tansu_ok; then
        echo "broker.sh: installing tansu $TANSU_VERSION_REQ (this takes several minutes)..." >&2
        cargo install --locked tansu --version "$TANSU_VERSION_REQ" --features "$TANSU_FEATURES" >&2
        tansu_ok || die "tansu still not usable after install"
    fi
    local tools=()
    command -v openssl >/dev/null 2>&1 || tools+=(openssl)
    command -v socat >/dev/null 2>&1 || tools+=(socat)
    if [ ${#tools[@]} -gt 0 ]; then
        echo "broker.sh: installing ${tools[*]} (the tests' TLS front)..." >&2
        local sudo_cmd=""
        [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get update -q >&2
        $sudo_cmd apt-get install -y -q --no-install-recommends "${tools[@]}" >&2
    fi
    command -v tansu
}

free_port() {
    python3 - <<'EOF' 2>/dev/null && return 0
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
    # fallback: random high port not currently listening
    local p
    for _ in $(seq 1 50); do
        p=$(( 20000 + RANDOM % 40000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
    done
    return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

cmd_start() {
    export PATH="$HOME/.cargo/bin:$PATH"
    tansu_ok || die "tansu 0.6.x not found on PATH; run: $0 install"
    local port="${BROKER_PORT:-}"
    [ -n "$port" ] || port=$(free_port) || die "could not find a free port"
    port_open "$port" && die "port $port on 127.0.0.1 is already in use"
    local log="${BROKER_LOG:-${TMPDIR:-/tmp}/ferry-tansu-$port.log}"
    local timeout="${BROKER_START_TIMEOUT:-30}"
    local url="tcp://127.0.0.1:$port"

    # tansu also reads its flags from these env vars; clear them so that a stray
    # environment cannot override ours (e.g. make it listen on 0.0.0.0 or export OTLP).
    # RUST_LOG is not inherited (a test run's RUST_LOG=debug would make tansu write GBs).
    env -u CLUSTER_ID -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE \
        -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
        RUST_LOG="${BROKER_RUST_LOG:-warn}" NO_COLOR=1 \
        setsid tansu broker \
            --cluster-id "${BROKER_CLUSTER_ID:-ferry_test}" \
            --storage-engine memory://tansu/ \
            --listener-url "$url" \
            --advertised-listener-url "$url" \
            </dev/null >"$log" 2>&1 &
    local pid=$!

    local deadline=$(( $(date +%s) + timeout ))
    until port_open "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "broker.sh: tansu exited during startup; log $log:" >&2
            tail -n 30 "$log" >&2 || true
            exit 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            kill "$pid" 2>/dev/null || true
            die "tansu did not open port $port within ${timeout}s (log: $log)"
        fi
        sleep 0.1
    done
    echo "BROKER=127.0.0.1:$port"
    echo "PID=$pid"
    echo "LOG=$log"
}

cmd_stop() {
    local pid="${1:-}"
    [[ "$pid" =~ ^[0-9]+$ ]] || die "usage: $0 stop PID"
    kill -0 "$pid" 2>/dev/null || { echo "broker.sh: pid $pid not running" >&2; return 0; }
    # refuse to kill anything that is not tansu
    local comm
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || ps -o comm= -p "$pid" 2>/dev/null || true)
    [ "$comm" = "tansu" ] || die "pid $pid is '$comm', not tansu; not stopping it"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) shift; cmd_stop "$@" ;;
    *) echo "usage: $0 {install|start|stop PID}" >&2; exit 2 ;;
esac
