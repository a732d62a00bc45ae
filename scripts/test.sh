#!/usr/bin/env bash
# The whole test suite: installs and builds what the tests need (Tansu, moto,
# docker-compose, Prometheus, kubernetes-validate, cargo-audit), checks formatting and
# clippy (warnings fail), audits Cargo.lock, then runs every test. Tests start
# their own broker, emulator and Prometheus on free ports; nothing needs to be running
# before.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_build_deps
ensure_tansu
ensure_moto
ensure_kpl_deaggregator
ensure_compose
ensure_prometheus
ensure_kubernetes_tools
ensure_cargo_audit
ensure_lint_tools

lint
audit_dependencies

log "cargo test"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$out"
# One closing line over every test binary (the last binary cargo runs is a doc-test
# pass with nothing in it, which would otherwise close the output).
summary=$(awk '/^test result:/ {p += $4; f += $6} END {printf "%d passed, %d failed", p, f}' "$out")

log "smoke test of the first README command (scripts/demo.sh --once)"
scripts/demo.sh --once

echo "tests: $summary"
