#!/usr/bin/env bash
# Benchmarks (figures, not pass/fail): 100,000 tenants through the file and topic
# providers, routing speed, memory per cached credential; then one tenant's throughput
# with PutRecord and with PutRecords batches. Needs Tansu (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_build_deps
ensure_tansu
cargo bench --locked --bench tenants "$@"
echo
echo "== throughput: one tenant, 20,000 events, 64 shards, 25 ms per AWS call"
cargo test --release --locked --test throughput -- --ignored --nocapture --test-threads 1 2>&1 \
    | grep -oE "PutRecords? +[0-9].*|test result.*"
