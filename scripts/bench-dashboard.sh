#!/usr/bin/env bash
# The dashboard's cost with many actors: a cloud and two edges (release
# builds), DEVICES simulated devices per edge, run twice for SECONDS each:
# once without the dashboard, once with it and one page (an SSE client)
# connected. Prints the cloud's CPU in both runs, the snapshot's size and the
# SSE stream's bytes per second.
#
#   cargo build --release -p tributary-node
#   scripts/kafka.sh start /tmp/kbench 29292 29293
#   TRIBUTARY_KAFKA_BOOTSTRAP=127.0.0.1:29292 scripts/bench-dashboard.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-5000}
SECONDS_RUN=${SECONDS_RUN:-60}
NODE=target/release/node
DIR=$(mktemp -d /tmp/tributary-bench-dash.XXXXXX)
: "${TRIBUTARY_KAFKA_BOOTSTRAP:?set TRIBUTARY_KAFKA_BOOTSTRAP to a running Kafka}"
export TRIBUTARY_TLS_DIR="$DIR/pki"
"$NODE" certs init --dir "$DIR/pki" >/dev/null
"$NODE" certs issue --dir "$DIR/pki" --id cloud-1 --role cloud >/dev/null
for e in edge-1 edge-2; do
    "$NODE" certs issue --dir "$DIR/pki" --id "$e" --role edge --out "$DIR/pki/$e" >/dev/null
done
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

run() { # $1 = with dashboard (1) or not (0)
    local tag=$1 run="r$RANDOM" sse=
    local extra=()
    [ "$tag" = 1 ] && extra=(--dashboard-addr 127.0.0.1:28099)
    "$NODE" --role cloud --node-id cloud-1 --listen-addr 127.0.0.1:24499 \
        --readings-topic "bench-dash-$run" --hwm-topic "bench-dash-hwm-$run" \
        --transactional-id-prefix "bench-dash-$run" --report-interval-ms 0 "${extra[@]}" \
        >"$DIR/cloud-$tag.log" 2>&1 &
    local cloud=$!
    PIDS+=("$cloud")
    sleep 3
    for e in edge-1 edge-2; do
        "$NODE" --role edge --node-id "$e" --tls-dir "$DIR/pki/$e" --cloud-addr 127.0.0.1:24499 \
            --outbox-dir "$DIR/$e-$tag.outbox" --device-count "$DEVICES" --device-rate-hz 0.2 \
            --report-interval-ms 0 >"$DIR/$e-$tag.log" 2>&1 &
        PIDS+=($!)
    done
    sleep 15 # devices started, reports flowing
    local sse_bytes=0
    if [ "$tag" = 1 ]; then
        curl -s 127.0.0.1:28099/api/snapshot -o "$DIR/snapshot.json"
        echo "snapshot: $(wc -c <"$DIR/snapshot.json") bytes, $(grep -o '"kind"' "$DIR/snapshot.json" | wc -l) actors"
        timeout "$SECONDS_RUN" curl -sN 127.0.0.1:28099/api/events -o "$DIR/events.txt" &
        sse=$!
    fi
    local t0 c0
    t0=$(date +%s.%N)
    c0=$(ticks "$cloud")
    sleep "$SECONDS_RUN"
    local c1 t1
    c1=$(ticks "$cloud")
    t1=$(date +%s.%N)
    [ -n "${sse:-}" ] && { wait "$sse" 2>/dev/null || true; }
    echo "cloud CPU ($([ "$tag" = 1 ] && echo with || echo without) dashboard): $(echo "($c1 - $c0) / $HZ / ($t1 - $t0) * 100" | bc -l | cut -c1-5)% of a core"
    if [ "$tag" = 1 ]; then
        local first
        first=$(awk '/^event: snapshot/{f=1} f&&/^data:/{print length($0); exit}' "$DIR/events.txt")
        local updates
        updates=$(grep -c '^event: update' "$DIR/events.txt" || true)
        echo "SSE: $(wc -c <"$DIR/events.txt") bytes in ${SECONDS_RUN} s: first snapshot $first bytes, $updates updates, $(( ($(wc -c <"$DIR/events.txt") - first) / (updates > 0 ? updates : 1) )) bytes per update"
    fi
    kill "${PIDS[@]}" 2>/dev/null || true
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
run 0
run 1
