#!/usr/bin/env bash
# Runs fuzz targets one after another with the limits of FUZZING.md:
#   fuzz/run.sh RUNS TARGET...      (RUNS executions each, e.g. 10000000)
#   MAX_TIME=900 fuzz/run.sh RUNS TARGET...   (stop at RUNS or after 900 s)
# Build first: cargo +nightly fuzz build -s none   (from fuzz/)
# Each target starts from fuzz/corpus/TARGET (seed it with the smoke test's
# write_seed_corpora, see FUZZING.md), logs to fuzz/logs/TARGET.log and
# leaves any crash, timeout or out-of-memory input in fuzz/artifacts/.
set -uo pipefail
cd "$(dirname "$0")"
RUNS="$1"
shift
BIN=target/x86_64-unknown-linux-gnu/release
mkdir -p logs artifacts
for t in "$@"; do
    case "$t" in
        settings_toml) dict=(-dict=dict/settings_toml.dict) ;;
        control_wire | node_report | reading_json | mqtt_parse) dict=(-dict=dict/json.dict) ;;
        *) dict=() ;;
    esac
    mkdir -p "corpus/$t"
    start=$(date +%s)
    "$BIN/$t" -runs="$RUNS" -timeout=2 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
        -max_len=4096 -max_total_time="${MAX_TIME:-0}" -print_final_stats=1 "${dict[@]}" \
        -artifact_prefix="artifacts/$t-" "corpus/$t" >"logs/$t.log" 2>&1
    rc=$?
    end=$(date +%s)
    execs=$(grep -a '^stat::number_of_executed_units' "logs/$t.log" | awk '{print $2}')
    cov=$(grep -a -E '^#[0-9]+' "logs/$t.log" | tail -1 | grep -o 'cov: [0-9]*')
    echo "$t rc=$rc execs=${execs:-?} seconds=$((end - start)) $cov corpus=$(ls "corpus/$t" | wc -l)"
done
