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
  pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
  [ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing build dependencies: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
}

# Tansu, a Kafka-protocol broker (Rust), built once into ~/.cargo/bin with its SQLite
# storage engine (about 10 minutes on 2 cores). The memory engine of 0.6.0 answers a fetch
# that starts inside a multi-record batch with the next batch; the SQLite one does not.
tansu_has_sqlite() {
  tansu --version 2>/dev/null | grep -q "$TANSU_VERSION" || return 1
  # cargo records the features each installed binary was built with.
  python3 - "$TANSU_VERSION" <<'PY' 2>/dev/null
import json, os, sys
with open(os.path.expanduser("~/.cargo/.crates2.json")) as f:
    installs = json.load(f)["installs"]
ok = any(k.startswith(f"tansu {sys.argv[1]} ") and "libsql" in v.get("features", [])
         for k, v in installs.items())
sys.exit(0 if ok else 1)
PY
}

ensure_tansu() {
  export PATH="$HOME/.cargo/bin:$PATH"
  tansu_has_sqlite && return
  log "building tansu $TANSU_VERSION with its SQLite engine (about 10 minutes, once per machine)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql --quiet
}

# moto, the AWS emulator (STS and Kinesis on one endpoint).
ensure_moto() {
  if python3 -c "import moto, moto.server, flask_cors, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
    return
  fi
  log "installing moto[server]==$MOTO_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
}

# Debian's docker-compose, only to validate docker-compose.yml (no Docker engine here).
ensure_compose() {
  command -v docker-compose >/dev/null && return
  log "installing docker-compose (to validate docker-compose.yml)"
  apt_install docker-compose
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
