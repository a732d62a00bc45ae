#!/usr/bin/env bash
# The chaos run: two workers in one group, the broker and the AWS fake, while faults
# drawn from a seed hit them (worker SIGKILL and SIGTERM, broker restart, throttling,
# 5xx, latency, black holes, a role revoked, settings changed mid-retry); then every
# invariant is checked from outside and printed as a table (tests/chaos.rs).
#
#   scripts/chaos.sh [--minutes N] [--seed S]
#
# N defaults to 20; without --seed one is drawn and printed. The same seed replays the
# same faults at the same times. Installs what it needs, like scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

minutes=20
seed=
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "chaos.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

ensure_build_deps
ensure_tansu

log "chaos run: $minutes minutes${seed:+, seed $seed}"
CHAOS_MINUTES="$minutes" CHAOS_SEED="$seed" \
  cargo test --workspace --locked --test chaos -- --ignored --nocapture --test-threads 1
