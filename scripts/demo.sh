#!/usr/bin/env bash
# Runs the worker on a local default: a Tansu broker on 127.0.0.1:9092 and a moto AWS
# emulator on 127.0.0.1:4566 (both installed if missing), topics, one Kinesis stream per
# sample tenant (deploy/tenants.sample.json), the worker with /metrics on :9464, then
# sample events of every type, read back from each tenant's stream.
#
#   scripts/demo.sh          keeps everything running until Ctrl-C
#   scripts/demo.sh --once   stops after showing the events arrive (a smoke test)
#
# Ports can be moved with KAFKA_PORT, AWS_PORT and HTTP_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ONCE=0
[ "${1:-}" = "--once" ] && ONCE=1
KAFKA_PORT=${KAFKA_PORT:-9092}
AWS_PORT=${AWS_PORT:-4566}
HTTP_PORT=${HTTP_PORT:-9464}
DEMO=.demo
BIN=target/debug/kinesis-destination

ensure_build_deps
ensure_tansu
ensure_moto
log "building kinesis-destination"
cargo build --locked --quiet --bin kinesis-destination

for port in "$KAFKA_PORT" "$AWS_PORT" "$HTTP_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    log "port $port is in use (another demo running?); set KAFKA_PORT, AWS_PORT or HTTP_PORT"
    exit 1
  fi
done

rm -rf "$DEMO" && mkdir -p "$DEMO"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting tansu on 127.0.0.1:$KAFKA_PORT and moto on 127.0.0.1:$AWS_PORT"
# On SQLite, in the demo's directory (the database path is relative to the working
# directory). Producers here may use any codec but snappy, which that engine cannot read
# back (tests/broker.rs).
(cd "$DEMO" && exec tansu broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --storage-engine sqlite://tansu.db >tansu.log 2>&1) &
pids+=($!)
python3 -m moto.server -H 127.0.0.1 -p "$AWS_PORT" >"$DEMO/moto.log" 2>&1 &
pids+=($!)
wait_port "$KAFKA_PORT"
wait_port "$AWS_PORT"

log "creating topics segment-events (3 partitions) and segment-events-dlq"
tansu topic create segment-events --partitions 3 --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null
tansu topic create segment-events-dlq --partitions 1 --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null

export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
log "creating one Kinesis stream per sample tenant, in the tenant's own account"
python3 - "$AWS_PORT" <<'PY'
import json, sys, boto3
endpoint = f"http://127.0.0.1:{sys.argv[1]}"
for t in json.load(open("deploy/tenants.sample.json")):
    sts = boto3.client("sts", endpoint_url=endpoint, region_name=t["region"])
    c = sts.assume_role(RoleArn=t["roleAddress"], RoleSessionName="demo-setup",
                        ExternalId=t.get("secretId") or t["sourceId"])["Credentials"]
    kinesis = boto3.client("kinesis", endpoint_url=endpoint, region_name=t["region"],
                           aws_access_key_id=c["AccessKeyId"],
                           aws_secret_access_key=c["SecretAccessKey"],
                           aws_session_token=c["SessionToken"])
    kinesis.create_stream(StreamName=t["stream"], ShardCount=t.get("shards", 1))
    kinesis.get_waiter("stream_exists").wait(StreamName=t["stream"],
                                             WaiterConfig={"Delay": 0.2, "MaxAttempts": 50})
    print(f"    {t['sourceId']}: stream {t['stream']} in {t['region']}, account {t['roleAddress'].split(':')[4]}")
PY

cp deploy/tenants.sample.json "$DEMO/tenants.json"
cat >"$DEMO/config.toml" <<TOML
[kafka]
bootstrap_servers = "127.0.0.1:$KAFKA_PORT"
group_id = "kinesis-destination-demo"
topics = ["segment-events"]
dead_letter_topic = "segment-events-dlq"
[kafka.librdkafka]
"session.timeout.ms" = "6000"

[tenants]
file = "tenants.json"

[aws]
endpoint_url = "http://127.0.0.1:$AWS_PORT"

[http]
listen = "127.0.0.1:$HTTP_PORT"
TOML

log "starting the worker (logs: $DEMO/worker.log)"
"$BIN" run --config "$DEMO/config.toml" >"$DEMO/worker.log" 2>&1 &
worker=$!
pids+=($worker)
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$worker" 2>/dev/null || { cat "$DEMO/worker.log"; exit 1; }
  sleep 0.1
done
curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null || { log "worker not ready"; cat "$DEMO/worker.log"; exit 1; }

COUNT=60
log "sending $COUNT sample events (identify, track, page, screen, group, alias) for three tenants"
"$BIN" produce --bootstrap-servers "127.0.0.1:$KAFKA_PORT" \
  --sources src_acme,src_globex,src_initech --count "$COUNT" --source-in both

for _ in $(seq 1 300); do
  delivered=$(curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | awk '/^kinesis_destination_events_delivered_total /{print $2}')
  [ "${delivered:-0}" -ge "$COUNT" ] && break
  sleep 0.1
done

total=0
for src in src_acme src_globex src_initech; do
  "$BIN" tail --config "$DEMO/config.toml" --source-id "$src" --format record >"$DEMO/$src.jsonl"
  n=$(wc -l <"$DEMO/$src.jsonl")
  total=$((total + n))
  log "$src: $n records in its stream; the first:"
  head -n 1 "$DEMO/$src.jsonl"
done
log "metrics:"
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | grep -E '^kinesis_destination_(events_(received|delivered)_total|assume_role_total[{][^}]*[}]|credential_cache_(hits|misses)_total) '

if [ "$total" -ne "$COUNT" ]; then
  log "expected $COUNT records in the streams, found $total"
  exit 1
fi
log "all $COUNT events arrived in their tenants' streams"

if [ "$ONCE" = 1 ]; then
  kill -TERM "$worker"
  wait "$worker"
  log "worker stopped cleanly"
  exit 0
fi
log "running: metrics at http://127.0.0.1:$HTTP_PORT/metrics; send more with"
log "  $BIN produce --bootstrap-servers 127.0.0.1:$KAFKA_PORT --sources src_acme --count 100"
log "Ctrl-C stops everything"
wait "$worker"
