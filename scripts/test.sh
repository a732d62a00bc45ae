#!/usr/bin/env bash
# The whole test suite: installs and builds what the tests need (Tansu, moto,
# docker-compose, Prometheus, kubernetes-validate, cargo-audit, cargo-deny, Chromium), checks
# formatting and clippy (warnings fail), audits Cargo.lock and checks its licences and
# duplicate versions, then runs every test. Tests start
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
ensure_cargo_deny
ensure_lint_tools
ensure_chromium

lint
audit_dependencies
check_dependencies

log "cargo test"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$out"
# One closing line over every test binary (the last binary cargo runs is a doc-test
# pass with nothing in it, which would otherwise close the output).
summary=$(awk '/^test result:/ {p += $4; f += $6} END {printf "%d passed, %d failed", p, f}' "$out")

log "chaos run, 2 minutes (scripts/chaos.sh; the README states what a 20-minute run showed)"
chaos_out=$(mktemp)
trap 'rm -f "$out" "$chaos_out"' EXIT
# A fixed seed (that of the README's 20-minute run), so that the faults are the same from
# run to run; CHAOS_SEED picks another.
scripts/chaos.sh --minutes 2 --seed "${CHAOS_SEED:-309556767}" 2>&1 | tee "$chaos_out"
chaos=$(awk '/^test result:/ {p += $4; f += $6} END {printf "%d passed, %d failed", p, f}' "$chaos_out")

log "smoke test of the first README command (scripts/demo.sh --once)"
scripts/demo.sh --once

echo "chaos: $chaos"
echo "tests: $summary"
