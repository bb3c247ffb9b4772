#!/usr/bin/env bash
# Tributary's demo: a local Kafka broker, one cloud node and two edge nodes
# with simulated devices, printing what flows. Along the way it kills one
# edge with SIGKILL and restarts it, to show that its outbox carries on.
#
#   scripts/demo.sh              run for DEMO_SECONDS (default 40), then stop
#   DEMO_SECONDS=0 scripts/demo.sh   run until Ctrl-C
#
# Everything lives under .cache/demo/ (logs, certificates, outboxes).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

DEMO_SECONDS="${DEMO_SECONDS:-40}"
DIR="$ROOT/.cache/demo"
NODE="$ROOT/target/debug/node"
PIDS=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo.sh: $*" >&2; exit 1; }

cleanup() {
    trap - EXIT INT TERM
    say "Stopping"
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null
    scripts/kafka.sh stop "$DIR/kafka" >/dev/null 2>&1 || true
    echo "logs are in $DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "Building the node binary"
cargo build -q -p tributary-node || die "build failed"

say "Starting Kafka (KRaft, from Maven Central jars)"
scripts/kafka.sh fetch || die "could not fetch the Kafka jars"
rm -rf "$DIR" && mkdir -p "$DIR"
free_port KAFKA_PORT && free_port CONTROLLER_PORT && free_port CLOUD_PORT || die "no free ports"
scripts/kafka.sh start "$DIR/kafka" "$KAFKA_PORT" "$CONTROLLER_PORT" || die "Kafka did not start"
export TRIBUTARY_KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"

say "Creating the cluster CA and node certificates"
"$NODE" certs init --dir "$DIR/pki"
"$NODE" certs issue --dir "$DIR/pki" --id cloud-1 --role cloud
"$NODE" certs issue --dir "$DIR/pki" --id edge-1 --role edge
"$NODE" certs issue --dir "$DIR/pki" --id edge-2 --role edge
export TRIBUTARY_TLS_DIR="$DIR/pki"

edge() {
    "$NODE" --role edge --node-id "$1" --cloud-addr "127.0.0.1:$CLOUD_PORT" \
        --outbox-dir "$DIR/$1.outbox" --device-count 5 --device-rate-hz 10 \
        >>"$DIR/$1.log" 2>&1 &
    PIDS+=($!)
    echo "$1 started (pid $!), log $DIR/$1.log"
}

say "Starting the cloud node and two edges"
"$NODE" --role cloud --node-id cloud-1 --listen-addr "127.0.0.1:$CLOUD_PORT" \
    --report-interval-ms 5000 >"$DIR/cloud.log" 2>&1 &
PIDS+=($!)
echo "cloud-1 started (pid $!), log $DIR/cloud.log"
edge edge-1
edge edge-2
EDGE2_PID="${PIDS[-1]}"

say "A few readings as they are committed to Kafka (read_committed)"
"$NODE" tail --count 6 --idle-s 30 || die "no readings reached Kafka"

say "What flows (the cloud's report every 5 s)"
tail -n +1 -f "$DIR/cloud.log" |
    grep --line-buffered -E "cloud flow|edge connected|edge link down" |
    sed -u -E 's/^([0-9T:-]+)[0-9.]*Z .*(cloud flow|edge connected|edge link down)/\1 \2/' &
PIDS+=($!)

sleep 10
say "kill -9 of edge-2: its outbox keeps what it accepted"
kill -KILL "$EDGE2_PID" 2>/dev/null
sleep 5
say "Restarting edge-2 on the same outbox"
edge edge-2

if [[ "$DEMO_SECONDS" -eq 0 ]]; then
    wait
else
    sleep "$DEMO_SECONDS"
fi
