#!/usr/bin/env bash
# Stop the servers that start-s3.sh and start-mlflow.sh started, by the PIDs in their PID files
# under $DIR (default /tmp/raysl-local). Each was started in its own process group (setsid), so the
# whole group is signalled: TERM, then KILL after 10 s. mlflow.db stays; moto's objects are gone.
set -uo pipefail

DIR=${DIR:-/tmp/raysl-local}

stop_one() {
  local name=$1 pidfile="$DIR/$1.pid" pid pgid target
  if [[ ! -f "$pidfile" ]]; then
    echo "$name: no PID file ($pidfile)" >&2
    return 0
  fi
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "$name: pid $pid not running" >&2
    rm -f "$pidfile"
    return 0
  fi
  pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
  # Signal the group only if the server leads it (setsid worked); never some other group.
  if [[ "$pgid" == "$pid" ]]; then target="-$pid"; else target="$pid"; fi
  kill -TERM -- "$target" 2>/dev/null
  for _ in $(seq 1 20); do
    kill -0 -- "$target" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 -- "$target" 2>/dev/null; then
    kill -KILL -- "$target" 2>/dev/null
    echo "$name: pid $pid killed" >&2
  else
    echo "$name: pid $pid stopped" >&2
  fi
  rm -f "$pidfile"
}

stop_one mlflow
stop_one s3
