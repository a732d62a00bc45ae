#!/usr/bin/env bash
# The whole test suite: installs and builds what the tests need (Tansu, moto,
# docker-compose), then runs every test. Tests start their own broker and emulator on
# free ports; nothing needs to be running before.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_build_deps
ensure_tansu
ensure_moto
ensure_compose

log "cargo test"
cargo test --workspace --locked "$@"

log "smoke test of the first README command (scripts/demo.sh --once)"
scripts/demo.sh --once
