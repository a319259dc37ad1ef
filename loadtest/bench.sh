#!/usr/bin/env bash
# Runs the benchmark scenarios against eventgate and nchan on this machine, with identical
# parameters, and prints the figures as Markdown tables (BENCHMARKS.md is written from them).
#
#   loadtest/bench.sh            # every scenario
#   loadtest/bench.sh u a c      # some of them: u a b c d e f (u: unsaturated fan-out and
#                                # the floor, the comparison BENCHMARKS.md leads with)
#   EG=path/to/eventgate loadtest/bench.sh e   # another eventgate binary (an A/B of two builds)
#   PUBLISHER_THREADS=1 loadtest/bench.sh u     # the publisher on one worker thread
#
# Needs redis-server, nginx and Debian's libnginx-mod-nchan. Everything listens on 127.0.0.1
# and is stopped at the end. Raw figures go to $OUT/results.jsonl (default target/bench).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/bench}
NCHAN_MODULE=${NCHAN_MODULE:-/usr/lib/nginx/modules/ngx_nchan_module.so}
REDIS_PORT=${REDIS_PORT:-16399}
PUB_PORT=${PUB_PORT:-18081}
GW_PORTS=(${GW_PORTS:-18080 18082 18083})
NCHAN_PORT=${NCHAN_PORT:-18090}
SCENARIOS=${*:-u a b c d e f}

for tool in redis-server nginx; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool: apt-get install redis-server nginx libnginx-mod-nchan" >&2; exit 1; }
done
[ -f "$NCHAN_MODULE" ] || { echo "bench needs nchan: apt-get install libnginx-mod-nchan" >&2; exit 1; }

cargo build --release --locked -p eventgate -p eventgate-loadtest
EG=${EG:-target/release/eventgate}
LG=target/release/loadgen
rm -rf "$OUT" && mkdir -p "$OUT/redis" "$OUT/nchan/body"
RESULTS="$OUT/results.jsonl"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_for() { # url
  for _ in $(seq 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "not ready: $1" >&2; exit 1
}

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$OUT/redis" \
  --loglevel warning --daemonize no > "$OUT/redis.log" 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

export REDIS_URL="redis://127.0.0.1:$REDIS_PORT" RUST_LOG=warn
# The generator is one user on a few addresses opening thousands of streams at once: limits
# stay on (their cost is measured) but sized so they never refuse it.
export RATE_LIMIT_CONNECT="1000000/s,burst=1000000" RATE_LIMIT_PUBLISH="1000000/s,burst=1000000" \
  MAX_CONNECTIONS_PER_IP=1000000 MAX_CONNECTIONS_PER_USER=1000000
# Fresh key material per run; loadgen reads EVENTGATE_PUBLISHER_KEY and EVENTGATE_TOKEN.
export JWT_SECRET="$(head -c 32 /dev/urandom | base64 | tr -d '=+/\n')"
export PUBLISHER_API_KEYS="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export EVENTGATE_PUBLISHER_KEY="$PUBLISHER_API_KEYS"
# TOKIO_WORKER_THREADS only when asked: the others keep one worker per core.
env ${PUBLISHER_THREADS:+TOKIO_WORKER_THREADS=$PUBLISHER_THREADS} "$EG" publisher --publisher-addr "127.0.0.1:$PUB_PORT" > "$OUT/publisher.log" 2>&1 &
PUB_PID=$!; PIDS+=("$PUB_PID")
GW_PIDS=()
for i in "${!GW_PORTS[@]}"; do
  REPLICA_ID="bench-$i" "$EG" gateway --gateway-addr "127.0.0.1:${GW_PORTS[$i]}" > "$OUT/gateway-$i.log" 2>&1 &
  GW_PIDS+=($!); PIDS+=($!)
done
wait_for "http://127.0.0.1:$PUB_PORT/readyz"
for port in "${GW_PORTS[@]}"; do wait_for "http://127.0.0.1:$port/readyz"; done
EVENTGATE_TOKEN="$(curl -sf -X POST "http://127.0.0.1:$PUB_PORT/v1/tokens" \
  -H "Authorization: Bearer $PUBLISHER_API_KEYS" -H 'Content-Type: application/json' \
  -d '{"sub":"bench","channels":["*"],"ttl_seconds":86400}' | sed 's/.*"token":"\([^"]*\)".*/\1/')"
[ -n "$EVENTGATE_TOKEN" ] || { echo "could not mint a subscriber token" >&2; exit 1; }
export EVENTGATE_TOKEN

NGINX_PID=""
start_nchan() { # workers
  [ -n "$NGINX_PID" ] && { kill "$NGINX_PID"; wait "$NGINX_PID" 2>/dev/null || true; }
  sed -e "s#@PORT@#$NCHAN_PORT#" -e "s#@DIR@#$PWD/$OUT/nchan#g" -e "s#worker_processes auto#worker_processes $1#" \
      -e "s#/usr/lib/nginx/modules/ngx_nchan_module.so#$NCHAN_MODULE#" \
      loadtest/nchan/nginx.conf.template > "$OUT/nchan/nginx.conf"
  nginx -p "$PWD/$OUT/nchan" -c "$PWD/$OUT/nchan/nginx.conf" &
  NGINX_PID=$!; PIDS+=("$NGINX_PID")
  for _ in $(seq 50); do [ -n "$(pgrep -P "$NGINX_PID")" ] && break; sleep 0.1; done
  sleep 0.5
  NCHAN_PIDS=($(pgrep -P "$NGINX_PID"))
}
start_nchan 2

# Server processes whose CPU and memory count: the whole system for each.
eg_all() { for p in "${GW_PIDS[0]}" "$PUB_PID" "$REDIS_PID"; do printf -- '--server-pid %s ' "$p"; done; }
eg_gateways() { local n=$1; for p in "${GW_PIDS[@]:0:$n}"; do printf -- '--server-pid %s ' "$p"; done; }
eg_urls() { local n=$1; for port in "${GW_PORTS[@]:0:$n}"; do printf -- '--gateway http://127.0.0.1:%s ' "$port"; done; }
nchan_all() { for p in "${NCHAN_PIDS[@]}"; do printf -- '--server-pid %s ' "$p"; done; }
EGT="--target eventgate --gateway http://127.0.0.1:${GW_PORTS[0]} --publisher http://127.0.0.1:$PUB_PORT"
NCT="--target nchan --gateway http://127.0.0.1:$NCHAN_PORT --publisher http://127.0.0.1:$NCHAN_PORT"

run() { # label, loadgen arguments...
  local label=$1; shift
  echo "== $label: $*" >&2
  "$LG" --json "$RESULTS" --label "$label" "$@" || echo "run $label failed" >&2
}

for s in $SCENARIOS; do case $s in
  u) # Below saturation, where most deployments run: each server against the floor, the CPU
     # of one write per delivery to as many loopback sockets (loadgen floor), in the same run.
     run "(u) 5k, 1 channel, 10/s" floor --connections 5000 --channels 1 --events 100 --rate 10
     for transport in sse ws; do
       run "(u) 5k, 1 channel, 10/s" $(eg_all) fanout $EGT --transport $transport --subscribers 5000 --channels 1 --rate 10 --events 100 --drain 30s
       run "(u) 5k, 1 channel, 10/s" $(nchan_all) fanout $NCT --transport $transport --subscribers 5000 --channels 1 --rate 10 --events 100 --drain 30s
     done
     run "(u) 5k, 500 channels, 1,000/s" floor --connections 5000 --channels 500 --events 10000 --rate 1000
     for transport in sse ws; do
       run "(u) 5k, 500 channels, 1,000/s" $(eg_all) fanout $EGT --transport $transport --subscribers 5000 --channels 500 --rate 1000 --events 10000 --drain 30s
       run "(u) 5k, 500 channels, 1,000/s" $(nchan_all) fanout $NCT --transport $transport --subscribers 5000 --channels 500 --rate 1000 --events 10000 --drain 30s
     done ;;
  a) # The floor beside every fan-out figure: the same writes, the kernel alone.
     run "(a) 10k SSE, 1 channel, 50/s" floor --connections 10000 --channels 1 --events 500 --rate 50
     run "(a) 10k SSE, 1 channel, 10/s" floor --connections 10000 --channels 1 --events 100 --rate 10
     for t in eg nchan; do
       if [ $t = eg ]; then args="$(eg_all) fanout $EGT"; else args="$(nchan_all) fanout $NCT"; fi
       run "(a) 10k SSE, 1 channel, 50/s" $args --subscribers 10000 --channels 1 --rate 50 --events 500 --drain 60s
       # The same at a rate this machine can serve with the generator on it: latency unsaturated.
       run "(a) 10k SSE, 1 channel, 10/s" $args --subscribers 10000 --channels 1 --rate 10 --events 100 --drain 60s
     done ;;
  b) run "(b) 10k SSE, 1,000 channels, 1,000/s" floor --connections 10000 --channels 1000 --events 10000 --rate 1000
     for t in eg nchan; do
       if [ $t = eg ]; then args="$(eg_all) fanout $EGT"; else args="$(nchan_all) fanout $NCT"; fi
       run "(b) 10k SSE, 1,000 channels, 1,000/s" $args --subscribers 10000 --channels 1000 --rate 1000 --events 10000 --drain 30s
     done ;;
  c) run "(c) 1k SSE, 1 channel, full speed" floor --connections 1000 --channels 1 --events 5000 --rate 0
     for t in eg nchan; do
       if [ $t = eg ]; then args="$(eg_all) fanout $EGT"; else args="$(nchan_all) fanout $NCT"; fi
       run "(c) 1k SSE, 1 channel, full speed" $args --subscribers 1000 --channels 1 --rate 0 --events 5000 --window 20 --drain 30s
     done ;;
  d) for transport in sse ws; do
       run "(d) 20k idle $transport" --procs 2 $(eg_gateways 2) idle --target eventgate $(eg_urls 2) --transport $transport --connections 20000 --channels 2000
     done
     run "(d) 50k idle SSE held" --procs 4 $(eg_gateways 3) idle --target eventgate $(eg_urls 3) --transport sse --connections 50000 --channels 5000 --hold 5s
     start_nchan 3
     for transport in sse ws; do
       run "(d) 20k idle $transport" --procs 2 $(nchan_all) idle $NCT --transport $transport --connections 20000 --channels 2000
     done
     run "(d) 50k idle SSE held" --procs 4 $(nchan_all) idle $NCT --transport sse --connections 50000 --channels 5000 --hold 5s
     start_nchan 2 ;;
  e) run "(e) publish, single" $(eg_all) publish $EGT --clients 16 --batch 1 --duration 10s
     run "(e) publish, batches of 100" $(eg_all) publish $EGT --clients 16 --batch 100 --duration 10s
     run "(e) publish, single" $(nchan_all) publish $NCT --clients 16 --batch 1 --duration 10s
     # More publishers at once: requests share script calls and wake-ups.
     run "(e) publish, single, 64 clients" $(eg_all) publish $EGT --clients 64 --batch 1 --duration 10s
     run "(e) publish, single, 64 clients" $(nchan_all) publish $NCT --clients 64 --batch 1 --duration 10s ;;
  f) for t in eg nchan; do
       if [ $t = eg ]; then args="$(eg_all) resume $EGT"; else args="$(nchan_all) resume $NCT"; fi
       run "(f) 2k clients resuming 1,000 behind" $args --clients 2000 --behind 1000
     done ;;
  *) echo "unknown scenario $s (u a b c d e f)" >&2; exit 64 ;;
esac; done

{
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sr)"
  echo "Versions: $($EG --version), $(redis-server --version | cut -d' ' -f3), $(nginx -v 2>&1 | cut -d' ' -f3), nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo '?')"
  "$LG" report --input "$RESULTS"
} | tee "$OUT/tables.md"
