#!/usr/bin/env bash
# Tributary's test command, locally and in CI (.ci/run calls it).
#
# It installs what a fresh Debian machine lacks (mosquitto, chromium and
# chromium-driver, once: skipped when present), fetches the Kafka
# jars, starts a shared single-node Kafka broker and a mosquitto broker on free
# loopback ports, then runs rustfmt, the build, clippy and the test suite.
# The brokers are stopped on every exit path.
#
# Exported to the tests:
#   TRIBUTARY_KAFKA_BOOTSTRAP  the shared broker, 127.0.0.1:PORT
#   TRIBUTARY_KAFKA_LIBS       the Kafka jars, so tests can start private brokers
#   TRIBUTARY_MQTT_ADDR        the mosquitto broker, 127.0.0.1:PORT
#   TRIBUTARY_CHROMIUM         the browser the dashboard's test drives
#   TRIBUTARY_CHROMEDRIVER     its WebDriver server
#
# Knobs:
#   TRIBUTARY_TEST_THREADS     cargo test's --test-threads (default 2)
#   TRIBUTARY_SKIP_LINT=1      skip rustfmt and clippy (a quicker local loop)
#   extra arguments are passed to `cargo test` before `--`,
#   e.g. scripts/test.sh -p tributary-tests
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

TEST_THREADS="${TRIBUTARY_TEST_THREADS:-2}"
MQTT_STOP_TIMEOUT_S=5
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

T0=$SECONDS
section() {
    printf '\n===== %s (t=%ss) =====\n' "$*" "$((SECONDS - T0))"
}

die() {
    echo "test.sh: $*" >&2
    exit 1
}

WORK=""
MQTT_PID=""
STATUS=1
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$WORK" ]]; then
        section "Stopping the brokers"
        if [[ -f "$WORK/kafka/kafka.pid" ]]; then
            scripts/kafka.sh stop "$WORK/kafka" || true
        fi
        if [[ -n "$MQTT_PID" ]] && kill -0 "$MQTT_PID" 2>/dev/null; then
            kill -TERM "$MQTT_PID" 2>/dev/null || true
            local deadline=$((SECONDS + MQTT_STOP_TIMEOUT_S))
            while kill -0 "$MQTT_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
            kill -KILL "$MQTT_PID" 2>/dev/null || true
            wait "$MQTT_PID" 2>/dev/null || true
        fi
        if [[ "$STATUS" -eq 0 ]]; then
            rm -rf "$WORK"
        else
            echo "test.sh: broker logs kept in $WORK"
        fi
    fi
    if [[ "$rc" -ne 0 && "$STATUS" -eq 0 ]]; then
        STATUS=$rc
    fi
    exit "$STATUS"
}
trap cleanup EXIT
trap 'STATUS=130; exit 130' INT TERM

section "Tools"
ensure_mosquitto || die "Mosquitto is needed"
ensure_chromium || die "Chromium and chromedriver are needed (the dashboard's browser test)"
for tool in java mvn cargo cmake cc; do
    command -v "$tool" >/dev/null || die "$tool is missing: this machine should come with it"
done
java -version 2>&1 | head -n 1
cargo --version

section "Kafka jars"
FETCH_T0=$SECONDS
scripts/kafka.sh fetch || die "could not fetch the Kafka jars"
echo "fetch took $((SECONDS - FETCH_T0))s"
export TRIBUTARY_KAFKA_LIBS="$ROOT/.cache/kafka/libs"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/tributary-test.XXXXXX")"

section "Shared Kafka broker"
free_port KAFKA_PORT || die "no free port"
free_port KAFKA_CONTROLLER_PORT || die "no free port"
BROKER_T0=$SECONDS
scripts/kafka.sh start "$WORK/kafka" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" ||
    die "the shared Kafka broker did not start"
echo "broker start took $((SECONDS - BROKER_T0))s"
export TRIBUTARY_KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"

section "Mosquitto"
free_port MQTT_PORT || die "no free port"
start_mosquitto "$WORK/mosquitto" "$MQTT_PORT" || die "Mosquitto did not start"
export TRIBUTARY_MQTT_ADDR="127.0.0.1:$MQTT_PORT"
echo "mosquitto on $TRIBUTARY_MQTT_ADDR (pid $MQTT_PID)"

export RUST_BACKTRACE=1
failed=()

if [[ "${TRIBUTARY_SKIP_LINT:-0}" != 1 ]]; then
    section "cargo fmt --check"
    cargo fmt --all -- --check || failed+=("cargo fmt")
fi

section "cargo build"
if ! cargo build --workspace --all-targets; then
    failed+=("cargo build")
    echo "test.sh: FAILED: ${failed[*]}" >&2
    STATUS=1
    exit 1
fi

if [[ "${TRIBUTARY_SKIP_LINT:-0}" != 1 ]]; then
    section "cargo clippy"
    cargo clippy --workspace --all-targets -- -D warnings || failed+=("cargo clippy")
fi

section "cargo test"
if [[ $# -gt 0 ]]; then
    cargo test --no-fail-fast "$@" -- --test-threads="$TEST_THREADS" || failed+=("cargo test")
else
    cargo test --workspace --no-fail-fast -- --test-threads="$TEST_THREADS" ||
        failed+=("cargo test")
fi

section "Summary"
if ((${#failed[@]})); then
    echo "test.sh: FAILED: ${failed[*]}"
    STATUS=1
else
    echo "test.sh: all steps passed"
    STATUS=0
fi
exit "$STATUS"
