#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft, broker and controller in one JVM)
# for Tributary's tests and demos, run from the Maven Central jars.
#
#   scripts/kafka.sh fetch                         jars into .cache/kafka/libs (idempotent)
#   scripts/kafka.sh start DIR PORT CONTROLLER_PORT start in DIR, wait until ready
#   scripts/kafka.sh stop DIR                      SIGTERM, SIGKILL after a bound
#   scripts/kafka.sh kill DIR                      SIGKILL
#
# Environment:
#   TRIBUTARY_KAFKA_LIBS     where the jars are (default: <repo>/.cache/kafka/libs)
#   KAFKA_START_TIMEOUT_S    how long `start` waits for readiness (default 90)
#   KAFKA_STOP_TIMEOUT_S     how long `stop` waits before SIGKILL (default 30)
#   KAFKA_HEAP_MAX           the JVM's -Xmx (default 512m)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POM="$ROOT/scripts/kafka-pom.xml"
LIBS="${TRIBUTARY_KAFKA_LIBS:-$ROOT/.cache/kafka/libs}"
START_TIMEOUT_S="${KAFKA_START_TIMEOUT_S:-90}"
STOP_TIMEOUT_S="${KAFKA_STOP_TIMEOUT_S:-30}"
KILL_TIMEOUT_S=10
PORT_FREE_TIMEOUT_S=10
HEAP_MAX="${KAFKA_HEAP_MAX:-512m}"
# Printed when the broker does not come up, so that CI logs show why.
LOG_TAIL_LINES=60

die() {
    echo "kafka.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

pom_hash() {
    sha256sum "$POM" | cut -d' ' -f1
}

cmd_fetch() {
    local marker="$LIBS/.fetched"
    # The marker holds the pom's hash, so that changing the Kafka version in
    # the pom fetches again instead of silently running the old jars.
    if [[ -f "$marker" && "$(cat "$marker")" == "$(pom_hash)" ]]; then
        echo "kafka.sh: jars already in $LIBS"
        return 0
    fi
    command -v mvn >/dev/null || die "mvn is not installed"
    local parent work
    parent="$(dirname "$LIBS")"
    mkdir -p "$parent"
    # Maven writes into the pom's directory, so run it on a copy outside the tree,
    # and fill a scratch dir first so that an interrupted fetch leaves no half set.
    work="$(mktemp -d "$parent/fetch.XXXXXX")"
    cp "$POM" "$work/pom.xml"
    echo "kafka.sh: fetching the Kafka jars from Maven Central into $LIBS"
    if ! (cd "$work" && mvn -q -B dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$work/libs"); then
        rm -rf "$work"
        die "mvn could not fetch the Kafka jars"
    fi
    ls "$work/libs"/kafka_2.13-*.jar >/dev/null 2>&1 || {
        rm -rf "$work"
        die "the fetched jars lack kafka_2.13"
    }
    pom_hash >"$work/libs/.fetched"
    rm -rf "$LIBS"
    mv "$work/libs" "$LIBS"
    rm -rf "$work"
    echo "kafka.sh: $(find "$LIBS" -name '*.jar' | wc -l) jars in $LIBS"
}

java_cp() {
    [[ -f "$LIBS/.fetched" ]] || die "no Kafka jars in $LIBS: run scripts/kafka.sh fetch"
    echo "$LIBS/*"
}

# The pid in DIR/kafka.pid, only if it is alive and is the broker of DIR:
# a stale pid file must never make us signal an unrelated process.
broker_pid() {
    local dir="$1" pid state
    [[ -f "$dir/kafka.pid" ]] || return 1
    pid="$(cat "$dir/kafka.pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "kafka.Kafka $dir/server.properties" || return 1
    echo "$pid"
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

write_config() {
    local dir="$1" port="$2" cport="$3"
    cat >"$dir/server.properties" <<EOF
# Written by scripts/kafka.sh: a single-node KRaft broker for tests.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$dir/data

num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions: the first transaction and the first consumer group
# create these topics, and 50 partitions each is seconds of test time.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
# After a kill -9 the controller refuses the restarted broker's registration
# until the old incarnation's session expires (9 s by default): keep it short.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000

# Small footprint: the machine is shared with the build and the tests.
num.network.threads=2
num.io.threads=4
log.cleaner.dedupe.buffer.size=16777216
EOF
    cat >"$dir/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.controller.name = kafka.controller
logger.controller.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
EOF
}

random_cluster_id() {
    # A Kafka Uuid: 16 random bytes in URL-safe base64 without padding. Like Kafka's own
    # generator, refuse a leading '-', which command lines take for an option.
    local id="-"
    while [[ "$id" == -* ]]; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    done
    echo "$id"
}

cmd_start() {
    [[ $# -eq 3 ]] || usage
    local dir port cport cp pid log offset deadline
    mkdir -p "$1"
    dir="$(cd "$1" && pwd)"
    port="$2"
    cport="$3"
    [[ "$port" =~ ^[0-9]+$ && "$cport" =~ ^[0-9]+$ ]] || die "ports must be numbers"
    cp="$(java_cp)"
    if pid="$(broker_pid "$dir")"; then
        die "a broker already runs in $dir (pid $pid)"
    fi
    wait_port_free "$port" || die "port $port is already in use"
    wait_port_free "$cport" || die "port $cport is already in use"

    write_config "$dir" "$port" "$cport"
    log="$dir/kafka.log"
    touch "$log"
    # Formatting only once is what lets a restart keep the data.
    if [[ ! -f "$dir/data/meta.properties" ]]; then
        if ! java -cp "$cp" -Dlog4j2.configurationFile="$dir/log4j2.properties" \
            kafka.tools.StorageTool format --cluster-id="$(random_cluster_id)" \
            -c "$dir/server.properties" >>"$log" 2>&1; then
            tail -n "$LOG_TAIL_LINES" "$log" >&2
            die "formatting the storage in $dir/data failed"
        fi
    fi

    # Readiness is judged on what this run logs, not on an earlier run's lines.
    offset="$(stat -c %s "$log")"
    # shellcheck disable=SC2086
    nohup java -Xms128m -Xmx"$HEAP_MAX" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$cp" kafka.Kafka "$dir/server.properties" </dev/null >>"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/kafka.pid"

    deadline=$((SECONDS + START_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n "$LOG_TAIL_LINES" "$log" >&2
            die "the broker in $dir exited during start"
        fi
        # "Kafka Server started" comes after the broker is unfenced, so it
        # then serves metadata, produce and transactions.
        if tail -c +"$((offset + 1))" "$log" | grep -q "Kafka Server started" &&
            port_open "$port"; then
            echo "kafka.sh: broker ready on 127.0.0.1:$port (pid $pid, dir $dir)"
            return 0
        fi
        sleep 0.2
    done
    tail -n "$LOG_TAIL_LINES" "$log" >&2
    kill -KILL "$pid" 2>/dev/null || true
    die "the broker in $dir was not ready after ${START_TIMEOUT_S}s"
}

# Whether any thread of the process still lives. A killed JVM's main thread turns
# zombie before its other threads are gone, and those still hold the sockets, so the
# leader's state alone would call it dead too early.
alive() {
    local pid="$1" states
    [[ -d "/proc/$pid/task" ]] || return 1
    # The state follows the command name, which may hold spaces and parentheses.
    states="$(cat /proc/"$pid"/task/*/stat 2>/dev/null | sed -n 's/.*) \(.\).*/\1/p' || true)"
    [[ "$states" =~ [^ZX[:space:]] ]]
}

wait_gone() {
    local pid="$1" timeout_s="$2" deadline
    deadline=$((SECONDS + timeout_s))
    while ((SECONDS < deadline)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    return 1
}

# Waits, bounded, for a port to stop accepting connections: the previous broker on
# it may still be closing its sockets.
wait_port_free() {
    local port="$1" deadline=$((SECONDS + PORT_FREE_TIMEOUT_S))
    while port_open "$port"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    local dir pid
    [[ -d "$1" ]] || return 0
    dir="$(cd "$1" && pwd)"
    pid="$(broker_pid "$dir")" || {
        echo "kafka.sh: no broker runs in $dir"
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$STOP_TIMEOUT_S"; then
        echo "kafka.sh: broker $pid did not stop in ${STOP_TIMEOUT_S}s, killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" "$KILL_TIMEOUT_S" || die "broker $pid survived SIGKILL"
    fi
    rm -f "$dir/kafka.pid"
    echo "kafka.sh: broker $pid stopped"
}

cmd_kill() {
    [[ $# -eq 1 ]] || usage
    local dir pid
    [[ -d "$1" ]] || return 0
    dir="$(cd "$1" && pwd)"
    pid="$(broker_pid "$dir")" || {
        echo "kafka.sh: no broker runs in $dir"
        return 0
    }
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" "$KILL_TIMEOUT_S" || die "broker $pid survived SIGKILL"
    rm -f "$dir/kafka.pid"
    echo "kafka.sh: broker $pid killed"
}

[[ $# -ge 1 ]] || usage
sub="$1"
shift
case "$sub" in
fetch) cmd_fetch "$@" ;;
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
kill) cmd_kill "$@" ;;
*) usage ;;
esac
