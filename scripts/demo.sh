#!/usr/bin/env bash
# Tributary's demo: the `factory` example (examples/factory.rs), a topology
# defined in code, run as one cloud node and two edge nodes against a local
# Kafka and Mosquitto. Simulated presses are windowed on the edges; MQTT line
# sensors are published by this script; the cloud raises alerts from the log.
# Along the way it kills one edge with SIGKILL and restarts it, to show that
# its outbox carries on.
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
FACTORY="$ROOT/target/debug/examples/factory"
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

say "Building the factory example (a node with its topology in code)"
cargo build -q -p tributary-node -p tributary-examples --example factory || die "build failed"

ensure_mosquitto || die "Mosquitto is needed"

say "Starting Kafka (KRaft, from Maven Central jars) and Mosquitto"
scripts/kafka.sh fetch || die "could not fetch the Kafka jars"
rm -rf "$DIR" && mkdir -p "$DIR"
free_port KAFKA_PORT && free_port CONTROLLER_PORT && free_port CLOUD_PORT && free_port MQTT_PORT &&
    free_port DASHBOARD_PORT ||
    die "no free ports"
scripts/kafka.sh start "$DIR/kafka" "$KAFKA_PORT" "$CONTROLLER_PORT" || die "Kafka did not start"
export TRIBUTARY_KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
start_mosquitto "$DIR/mosquitto" "$MQTT_PORT" || die "Mosquitto did not start"
PIDS+=("$MQTT_PID")

say "Creating the cluster CA and node certificates"
"$NODE" certs init --dir "$DIR/pki"
"$NODE" certs issue --dir "$DIR/pki" --id cloud-1 --role cloud
# Each edge gets a tls_dir of its own, without the CA's key. Its labels are
# in its certificate: the cloud admits the streams those labels place on it.
"$NODE" certs issue --dir "$DIR/pki" --id edge-1 --role edge --labels plant-a --out "$DIR/pki/edge-1"
"$NODE" certs issue --dir "$DIR/pki" --id edge-2 --role edge --labels plant-a --out "$DIR/pki/edge-2"
export TRIBUTARY_TLS_DIR="$DIR/pki"

edge() {
    "$FACTORY" --role edge --node-id "$1" --tls-dir "$DIR/pki/$1" --cloud-addr "127.0.0.1:$CLOUD_PORT" \
        --outbox-dir "$DIR/$1.outbox" --mqtt-addr "127.0.0.1:$MQTT_PORT" \
        --mqtt-client-id "factory-$1" --report-interval-ms 5000 \
        >>"$DIR/$1.log" 2>&1 &
    PIDS+=($!)
    echo "$1 started (pid $!), log $DIR/$1.log"
}

say "Starting the cloud node and two edges (the factory topology)"
DASHBOARD_TOKEN="demo-token-$(date +%s)"
"$FACTORY" --role cloud --node-id cloud-1 --listen-addr "127.0.0.1:$CLOUD_PORT" \
    --dashboard-addr "127.0.0.1:$DASHBOARD_PORT" --dashboard-token "$DASHBOARD_TOKEN" \
    --report-interval-ms 5000 >"$DIR/cloud.log" 2>&1 &
PIDS+=($!)
echo "cloud-1 started (pid $!), log $DIR/cloud.log"
echo "dashboard: http://127.0.0.1:$DASHBOARD_PORT/  (token for actions: $DASHBOARD_TOKEN)"
edge edge-1
edge edge-2
EDGE2_PID="${PIDS[-1]}"
grep -h "part of the topology" "$DIR"/cloud.log "$DIR"/edge-*.log 2>/dev/null |
    sed -E 's/.*topology="factory" /  /' || true

say "Three MQTT line sensors publish to factory/<sensor>/telemetry (QoS 1)"
# Vibration around 0.4; sensor-2 shakes hard once, about 15 s in.
(
    i=0
    while true; do
        ts=$(date +%s%3N)
        for s in 0 1 2; do
            v="0.4$((RANDOM % 10))"
            if [[ $s -eq 2 && $i -eq 100 ]]; then v="9.5"; fi
            mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -q 1 -t "factory/sensor-$s/telemetry" \
                -m "{\"ts\": $ts, \"vibration\": $v}" 2>/dev/null
        done
        i=$((i + 1))
        sleep 0.1
    done
) &
PIDS+=($!)

say "Per-second press windows, made on the edges, as committed to Kafka"
"$NODE" tail --readings-topic tributary.presses.1s --count 4 --idle-s 60 || die "no windows reached Kafka"

say "What flows (the cloud's and edge-1's reports every 5 s)"
tail -n +1 -f "$DIR/cloud.log" "$DIR/edge-1.log" |
    grep --line-buffered -E "cloud flow|edge flow|mqtt flow|member (up|down)" |
    sed -u -E 's/^([0-9T:-]+)[0-9.]*Z .*(cloud flow|edge flow|mqtt flow|member up|member down)/\1 \2/' &
PIDS+=($!)

sleep 10
say "kill -9 of edge-2: its outbox keeps what it accepted"
kill -KILL "$EDGE2_PID" 2>/dev/null
sleep 5
say "Restarting edge-2 on the same outbox"
edge edge-2

say "Alerts, raised on the cloud from the log and written exactly once"
"$NODE" tail --readings-topic tributary.alerts --count 3 --idle-s 90 || echo "no alert yet"

if [[ "$DEMO_SECONDS" -eq 0 ]]; then
    wait
else
    sleep "$DEMO_SECONDS"
fi
