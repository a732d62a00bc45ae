#!/usr/bin/env bash
# Benchmarks (figures, not pass/fail): 100,000 tenants through the file and topic
# providers, routing speed, memory per cached credential; then the throughput table (see
# tests/throughput.rs): many tenants and one, PutRecord and PutRecords, 0 and 20 ms
# sinks, against a bare consumer's rate and, when ../shared/peers/vector is there,
# Vector 0.58 on the same input. Needs Tansu (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_build_deps
ensure_tansu
cargo bench --locked --bench tenants "$@"
echo
echo "== throughput: fresh broker and AWS fake per scenario, ${BENCH_EVENTS:-200000} events produced first"
echo "   (BENCH_EVENTS to change the count, BENCH_ONLY=<text> to run matching scenarios only)"
cargo test --release --locked --test throughput -- --ignored --nocapture --test-threads 1 2>&1 \
    | awk '/^## / {table = 1} table && (/^\|/ || /^##/) {print} /^test result/ {print}'
