#!/usr/bin/env bash
# deploy/local-farm.sh — a build farm on this one machine: BuildGrid 0.4.4 (with its own
# PostgreSQL) and N reapi-worker bots, then a sample action pushed through it.
#
#   deploy/local-farm.sh [start]   install what is missing, start the farm, run the sample
#                                  action through the scheduler and print its ActionResult
#   deploy/local-farm.sh sample    run the sample action again (the farm must be up)
#   deploy/local-farm.sh status    what runs, where the logs are
#   deploy/local-farm.sh stop      SIGTERM the workers (they drain), stop BuildGrid
#
# Settings (environment):
#   FARM_WORKERS       number of worker processes                 (default 2)
#   FARM_CONCURRENCY   actions per worker at once                 (default 1)
#   FARM_STAGING       hardlink | fuse | auto                     (default hardlink)
#   FARM_DIR           caches, build roots, logs and pid files    (default /tmp/reapi-farm)
#   FARM_METRICS_PORT  first worker's metrics port, +1 per worker (default 9102)
#   BGD_PORT           BuildGrid's port on 127.0.0.1               (default 50051)
#
# Submit your own command once the farm is up (see README.md):
#   .venv/bin/reapi-worker execute --remote grpc://127.0.0.1:50051 --instance-name main \
#       --input-root DIR --output-path out.txt --download /tmp/outs -- sh -c 'make > out.txt'
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKERS="${FARM_WORKERS:-2}"
CONCURRENCY="${FARM_CONCURRENCY:-1}"
STAGING="${FARM_STAGING:-hardlink}"
FARM="${FARM_DIR:-/tmp/reapi-farm}"
METRICS_PORT="${FARM_METRICS_PORT:-9102}"
export BGD_PORT="${BGD_PORT:-50051}"
INSTANCE=main
BGD="$REPO/deploy/buildgrid/start.sh"

log() { printf '[local-farm] %s\n' "$*" >&2; }
die() { printf '[local-farm] ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "FARM_WORKERS must be a positive number, not '$WORKERS'"
[[ "$CONCURRENCY" =~ ^[1-9][0-9]*$ ]] || die "FARM_CONCURRENCY must be a positive number, not '$CONCURRENCY'"

worker_pids() {
  local pidfile
  for pidfile in "$FARM"/worker-*/pid; do
    [ -f "$pidfile" ] || continue
    local pid; pid="$(cat "$pidfile")"
    kill -0 "$pid" 2>/dev/null && echo "$pid"
  done
  return 0
}

start_workers() {
  local venv="$1" address="$2" i
  # bubblewrap runs actions as uid 65534, which must reach every build root.
  mkdir -p "$FARM" && chmod 755 "$FARM"
  for i in $(seq 1 "$WORKERS"); do
    local top="$FARM/worker-$i"
    if [ -f "$top/pid" ] && kill -0 "$(cat "$top/pid")" 2>/dev/null; then
      log "worker $i already running (pid $(cat "$top/pid"))"
      continue
    fi
    mkdir -p "$top" && chmod 755 "$top"
    : > "$top/worker.log"
    setsid "$venv/bin/reapi-worker" bot \
      --remote "grpc://$address" --instance-name "$INSTANCE" \
      --bot-id "$(hostname)-farm-$i" --concurrency "$CONCURRENCY" --staging "$STAGING" \
      --cache-dir "$top/cache" --build-root "$top/builds" --cache-size 2G \
      --metrics-port "$((METRICS_PORT + i - 1))" --metrics-host 127.0.0.1 \
      >>"$top/worker.log" 2>&1 </dev/null &
    echo $! > "$top/pid"
    log "worker $i: pid $!, log $top/worker.log, metrics http://127.0.0.1:$((METRICS_PORT + i - 1))/metrics"
  done
  # Registered = its first session exists; a worker that exits at once shows its log.
  for i in $(seq 1 "$WORKERS"); do
    local top="$FARM/worker-$i" waited=0
    until grep -q "session .* created" "$top/worker.log" 2>/dev/null; do
      kill -0 "$(cat "$top/pid")" 2>/dev/null || { tail -20 "$top/worker.log" >&2; die "worker $i exited"; }
      [ "$waited" -lt 300 ] || { tail -20 "$top/worker.log" >&2; die "worker $i did not register in 30 s"; }
      sleep 0.1; waited=$((waited + 1))
    done
  done
  # Healthy = takes work: a worker that cannot sandbox (e.g. a build root the sandbox's
  # uid cannot reach) reports UNHEALTHY and would leave the sample queued for ever.
  for i in $(seq 1 "$WORKERS"); do
    local url="http://127.0.0.1:$((METRICS_PORT + i - 1))/healthz"
    "$venv/bin/python" - "$url" <<'PY' || die "worker $i is not healthy (see $FARM/worker-$i/worker.log)"
import json, sys, time, urllib.error, urllib.request
deadline = time.monotonic() + 15
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as answer:
            sys.exit(0)
    except urllib.error.HTTPError as error:
        body = json.loads(error.read() or b"{}")
    except OSError as error:
        body = {"reasons": [str(error)]}
    if time.monotonic() > deadline:
        print("[local-farm] unhealthy: " + "; ".join(body.get("reasons", [])), file=sys.stderr)
        sys.exit(1)
    time.sleep(0.2)
PY
  done
  log "$WORKERS worker(s) registered with BuildGrid at $address (instance '$INSTANCE') and healthy"
}

run_sample() {
  local venv="$1" address="$2"
  local input="$REPO/deploy/sample/input" outputs="$FARM/sample-outputs"
  rm -rf "$outputs"
  log "pushing the sample action through the scheduler (input root $input)"
  "$venv/bin/reapi-worker" execute --remote "grpc://$address" --instance-name "$INSTANCE" \
    --input-root "$input" --output-path out/report.txt --download "$outputs" \
    --env PATH=/usr/bin:/bin -- /bin/sh ./build.sh
  log "downloaded: $outputs/out/report.txt"
  cat "$outputs/out/report.txt"
}

stop_farm() {
  local pids; pids="$(worker_pids)"
  if [ -n "$pids" ]; then
    log "stopping workers: $(echo $pids)"
    # shellcheck disable=SC2086  # one pid per word
    kill -TERM $pids 2>/dev/null || true
    local waited=0
    while [ -n "$(worker_pids)" ] && [ "$waited" -lt 600 ]; do sleep 0.1; waited=$((waited + 1)); done
    pids="$(worker_pids)"
    # shellcheck disable=SC2086
    [ -z "$pids" ] || { log "killing workers that did not drain in 60 s: $pids"; kill -KILL $pids || true; }
  fi
  rm -f "$FARM"/worker-*/pid
  "$BGD" stop
}

case "${1:-start}" in
  start)
    VENV="$("$REPO/deploy/install.sh")"
    ADDRESS="$("$BGD" start)"
    log "BuildGrid at $ADDRESS"
    start_workers "$VENV" "$ADDRESS"
    run_sample "$VENV" "$ADDRESS"
    log "the farm is up; 'deploy/local-farm.sh stop' stops it"
    ;;
  sample)
    ADDRESS="$("$BGD" status)" || die "BuildGrid is not running: deploy/local-farm.sh start"
    [ -n "$(worker_pids)" ] || die "no worker is running: deploy/local-farm.sh start"
    run_sample "${REAPI_VENV:-$REPO/.venv}" "$ADDRESS"
    ;;
  status)
    if ADDRESS="$("$BGD" status 2>/dev/null)"; then log "BuildGrid at $ADDRESS"; else log "BuildGrid: not running"; fi
    for top in "$FARM"/worker-*; do
      [ -d "$top" ] || continue
      if [ -f "$top/pid" ] && kill -0 "$(cat "$top/pid")" 2>/dev/null; then
        log "$(basename "$top"): running, pid $(cat "$top/pid"), log $top/worker.log"
      else
        log "$(basename "$top"): stopped"
      fi
    done
    ;;
  stop) stop_farm ;;
  *) die "usage: $0 [start|sample|status|stop]" ;;
esac
