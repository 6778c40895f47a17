#!/usr/bin/env bash
# Stop what the start-*.sh scripts started under $DIR (default /tmp/raysl-local): the MLflow server
# and moto by the PIDs in their PID files, PostgreSQL with `pg_ctl stop` (fast: open sessions are
# ended, committed data is kept). MLflow and moto were each started in their own process group
# (setsid), so the whole group is signalled: TERM, then KILL after 10 s. Kept: the database in
# $DIR/pg with its password file $DIR/pgpass, and $DIR/mlflow.db; moto's objects are gone.
# Settings (environment): DIR, PGBIN (see start-postgres.sh).
set -uo pipefail
source "$(dirname "$0")/lib.sh"

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

stop_postgres() {
  local pgdata="$DIR/pg" pgbin pid
  if [[ ! -f "$pgdata/postmaster.pid" ]]; then
    [[ -d "$pgdata" ]] && echo "postgres: not running ($pgdata)" >&2
    return 0
  fi
  pid=$(sed -n 1p "$pgdata/postmaster.pid")
  if ! pg_running "$pgdata"; then
    echo "postgres: pid $pid not running" >&2
    return 0
  fi
  if pgbin=$(pg_bindir 2>/dev/null) && as_pg "$pgbin/pg_ctl" -D "$pgdata" -m fast -s -w -t 60 stop >&2; then
    echo "postgres: pid $pid stopped" >&2
    return 0
  fi
  # No pg_ctl, or it failed: SIGINT is PostgreSQL's fast shutdown too.
  kill -INT "$pid" 2>/dev/null
  for _ in $(seq 1 60); do
    pg_running "$pgdata" || { echo "postgres: pid $pid stopped" >&2; return 0; }
    sleep 0.5
  done
  echo "postgres: pid $pid still running after 30 s; see $DIR/postgres.log" >&2
  return 1
}

status=0
stop_one mlflow
stop_postgres || status=1
stop_one s3
exit "$status"
