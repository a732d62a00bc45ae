#!/usr/bin/env bash
# Benchmarks (figures, not pass/fail): 100,000 tenants through the file and topic
# providers, routing speed, memory per cached credential. Needs Tansu (installed if
# missing) for the topic provider.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_build_deps
ensure_tansu
cargo bench --locked --bench tenants "$@"
