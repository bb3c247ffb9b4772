#!/usr/bin/env bash
# A Mosquitto broker of its own for `bench mqtt` and `bench mqtt-rss`.
#
#   bench/mosquitto.sh start DIR PORT   # writes DIR/mosquitto.conf, DIR/mosquitto.pid, DIR/mosquitto.log
#   bench/mosquitto.sh stop DIR
#
# The settings (see BENCHMARKS.md, section 7): no persistence, a queue deep
# enough for any lead the benchmarks use (Mosquitto drops a session's
# messages past max_queued_messages, silently), the default in-flight window
# of 20 (which Mosquitto 2.0.11 refills at every PUBACK, so it does not bound
# what is in flight: the edge bounds what it holds with TCP back-pressure).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
case "$cmd" in
start)
    port=${3:?usage: $0 start DIR PORT}
    mkdir -p "$dir"
    cat >"$dir/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 1000000
max_inflight_messages 20
EOF
    # In the foreground of a background shell: the pid is the broker's.
    /usr/sbin/mosquitto -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
    echo $! >"$dir/mosquitto.pid"
    for _ in $(seq 50); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "mosquitto listening on 127.0.0.1:$port, pid $(cat "$dir/mosquitto.pid")"
            exit 0
        fi
        sleep 0.1
    done
    echo "mosquitto did not come up; see $dir/mosquitto.log" >&2
    exit 1
    ;;
stop)
    if [ -f "$dir/mosquitto.pid" ]; then
        kill "$(cat "$dir/mosquitto.pid")" 2>/dev/null || true
        rm -f "$dir/mosquitto.pid"
    fi
    ;;
*)
    echo "usage: $0 start DIR PORT | stop DIR" >&2
    exit 2
    ;;
esac
