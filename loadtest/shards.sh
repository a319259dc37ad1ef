#!/usr/bin/env bash
# Publishing on one Redis, on three independent Redis servers (REDIS_SHARDS) and on a
# three-primary Redis Cluster (REDIS_CLUSTER), in one run: throughput, latency and server CPU
# per event (publisher and every Redis), and each Redis server's own CPU per event it stored.
#
#   loadtest/shards.sh                   # 10 s per run
#   DURATION=20s loadtest/shards.sh
#
# Needs redis-server and redis-cli. Everything listens on 127.0.0.1 and is stopped at the end.
# Tables go to $OUT/tables.md (default target/bench-shards).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/bench-shards}
BASE_PORT=${BASE_PORT:-16410}
PUB_PORT=${PUB_PORT:-18181}
DURATION=${DURATION:-10s}
CLIENTS=${CLIENTS:-16}

for tool in redis-server redis-cli curl; do
  command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install redis-server redis-tools curl" >&2; exit 1; }
done

cargo build --release --locked -p eventgate -p eventgate-loadtest
EG=${EG:-target/release/eventgate}
LG=target/release/loadgen
rm -rf "$OUT" && mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

export RUST_LOG=warn RATE_LIMIT_PUBLISH="1000000/s,burst=1000000"
export JWT_SECRET="$(head -c 32 /dev/urandom | base64 | tr -d '=+/\n')"
export PUBLISHER_API_KEYS="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export EVENTGATE_PUBLISHER_KEY="$PUBLISHER_API_KEYS"

REDIS_PIDS=()
REDIS_PORTS=()
start_redis() { # port, extra redis-server arguments...
  local port=$1; shift
  mkdir -p "$OUT/redis-$port"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$OUT/redis-$port" \
    --loglevel warning "$@" > "$OUT/redis-$port.log" 2>&1 &
  REDIS_PIDS+=($!); REDIS_PORTS+=("$port"); PIDS+=($!)
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "redis on $port did not start" >&2; exit 1
}
stop_all() {
  for pid in "${REDIS_PIDS[@]}" "$PUB_PID"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  REDIS_PIDS=(); REDIS_PORTS=()
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Stream entries a server stored so far (XADD calls, scripts' included).
xadds() { redis-cli -p "$1" info commandstats | sed -n 's/^cmdstat_xadd:calls=\([0-9]*\),.*/\1/p' | grep . || echo 0; }

HZ=$(getconf CLK_TCK)
REDIS_TABLE="$OUT/redis.md"
{
  echo "| setup | requests | Redis | events stored | Redis CPU s | Redis µs/event |"
  echo "|---|---|---|---|---|---|"
} > "$REDIS_TABLE"

publish_runs() { # setup name
  local setup=$1 batch label
  "$EG" publisher --publisher-addr "127.0.0.1:$PUB_PORT" > "$OUT/publisher-$setup.log" 2>&1 &
  PUB_PID=$!; PIDS+=("$PUB_PID")
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$PUB_PORT/readyz" && break; sleep 0.1; done
  curl -sf -o /dev/null "http://127.0.0.1:$PUB_PORT/readyz" || { echo "publisher not ready ($setup)" >&2; exit 1; }
  local pids=("$PUB_PID" "${REDIS_PIDS[@]}")
  for batch in 1 100; do
    if [ "$batch" = 1 ]; then label="(g) publish, single, $setup"; else label="(g) publish, batches of 100, $setup"; fi
    local before_ticks=() before_xadds=()
    for i in "${!REDIS_PIDS[@]}"; do
      before_ticks+=("$(ticks "${REDIS_PIDS[$i]}")"); before_xadds+=("$(xadds "${REDIS_PORTS[$i]}")")
    done
    echo "== $label" >&2
    "$LG" --json "$RESULTS" --label "$label" $(printf -- '--server-pid %s ' "${pids[@]}") \
      publish --target eventgate --publisher "http://127.0.0.1:$PUB_PORT" \
      --clients "$CLIENTS" --batch "$batch" --duration "$DURATION" || echo "run $label failed" >&2
    for i in "${!REDIS_PIDS[@]}"; do
      local cpu events
      cpu=$(( $(ticks "${REDIS_PIDS[$i]}") - before_ticks[i] ))
      events=$(( $(xadds "${REDIS_PORTS[$i]}") - before_xadds[i] ))
      awk -v s="$setup" -v b="$batch" -v r="${REDIS_PORTS[$i]}" -v e="$events" -v c="$cpu" -v hz="$HZ" 'BEGIN {
        printf "| %s | %s | :%s | %d | %.2f | %s |\n", s, (b == 1 ? "single" : "batches of " b), r, e, c / hz,
          (e > 0 ? sprintf("%.2f", c / hz * 1e6 / e) : "-") }' >> "$REDIS_TABLE"
    done
  done
}

# One Redis.
start_redis "$BASE_PORT"
export REDIS_URL="redis://127.0.0.1:$BASE_PORT"
publish_runs "one Redis"
stop_all; unset REDIS_URL

# Three independent Redis servers: three shards, one on each.
for i in 1 2 3; do start_redis $((BASE_PORT + i)); done
export REDIS_SHARDS="redis://127.0.0.1:$((BASE_PORT + 1)),redis://127.0.0.1:$((BASE_PORT + 2)),redis://127.0.0.1:$((BASE_PORT + 3))"
publish_runs "3 shards"
stop_all; unset REDIS_SHARDS

# A three-primary Redis Cluster (no replicas, so the CPU compares): 16 shards, its default.
seeds=()
for i in 4 5 6; do
  port=$((BASE_PORT + i))
  start_redis "$port" --cluster-enabled yes --cluster-config-file "nodes-$port.conf"
  seeds+=("127.0.0.1:$port")
done
redis-cli --cluster create "${seeds[@]}" --cluster-replicas 0 --cluster-yes > "$OUT/cluster-create.log"
for port in "${REDIS_PORTS[@]}"; do
  for _ in $(seq 100); do
    redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' && break; sleep 0.1
  done
done
export REDIS_CLUSTER="$(printf 'redis://%s,' "${seeds[@]}" | sed 's/,$//')"
publish_runs "3-primary cluster"
stop_all; unset REDIS_CLUSTER

{
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sr)"
  echo "Versions: $($EG --version), $(redis-server --version | cut -d' ' -f3)"
  echo
  "$LG" report --input "$RESULTS"
  echo
  echo "Each Redis server's own CPU, per stream entry it stored:"
  echo
  cat "$REDIS_TABLE"
} | tee "$OUT/tables.md"
