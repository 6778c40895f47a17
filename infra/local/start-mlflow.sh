#!/usr/bin/env bash
# Start a local MLflow tracking server on 127.0.0.1: runs and model registry in PostgreSQL (started
# by start-postgres.sh, on 127.0.0.1:$PGPORT, data in $DIR/pg), artifacts proxied to S3, as in
# infra/k8s/mlflow.yaml. BACKEND=sqlite keeps everything in $DIR/mlflow.db instead (no PostgreSQL).
# Run start-s3.sh first and eval its exports: the server needs the S3 endpoint and keys.
#   eval "$(bash infra/local/start-mlflow.sh)"
# Settings (environment): BACKEND (postgres | sqlite), PYTHON (.venv/bin/python), PORT (5001),
# PGPORT (5433), PGBIN (see start-postgres.sh), BUCKET (raysl), WORKERS (2), DIR (/tmp/raysl-local:
# PID file mlflow.pid, log mlflow.log, backend in use mlflow.backend). Stop with stop.sh.
# Rerunning it while the server runs reuses the server. The database password stays in
# $DIR/pgpass (libpq reads it through PGPASSFILE); the backend URI holds none.
# Only the export line goes to stdout; progress and errors go to stderr.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"

BACKEND=${BACKEND:-postgres}
PYTHON=${PYTHON:-.venv/bin/python}
PORT=${PORT:-5001}
PGPORT=${PGPORT:-5433}
BUCKET=${BUCKET:-raysl}
WORKERS=${WORKERS:-2}
DIR=${DIR:-/tmp/raysl-local}
URI="http://127.0.0.1:${PORT}"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PIDFILE="$DIR/mlflow.pid"
LOG="$DIR/mlflow.log"

case "$BACKEND" in
  postgres)
    # Prints PGPASSFILE and MLFLOW_BACKEND_STORE_URI; starts PostgreSQL unless it runs already.
    pg_exports=$(DIR="$DIR" PGPORT="$PGPORT" bash "$HERE/start-postgres.sh")
    eval "$pg_exports"
    STORE=$MLFLOW_BACKEND_STORE_URI
    unset MLFLOW_BACKEND_STORE_URI ;;
  sqlite)
    STORE="sqlite:///$DIR/mlflow.db" ;;
  *)
    echo "error: BACKEND=$BACKEND; choose postgres or sqlite" >&2
    exit 1 ;;
esac

healthy() { [[ "$(curl -s --max-time 2 "$URI/health" 2>/dev/null)" == "OK" ]]; }

if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && healthy; then
  running=$(cat "$DIR/mlflow.backend" 2>/dev/null || echo "unknown")
  if [[ "$running" != "$STORE" ]]; then
    echo "error: the MLflow server on $URI uses backend $running, not $STORE; run stop.sh first" >&2
    exit 1
  fi
  echo "MLflow server already running (pid $(cat "$PIDFILE")) at $URI, backend $STORE" >&2
else
  if curl -s -o /dev/null --max-time 2 "$URI/"; then
    echo "error: something else already answers on $URI; set PORT to a free port" >&2
    exit 1
  fi
  if [[ -z "${AWS_ENDPOINT_URL:-}" ]]; then
    echo "note: AWS_ENDPOINT_URL is unset, so artifacts go to AWS S3 itself;" \
         "for the local stack run: eval \"\$(bash infra/local/start-s3.sh)\"" >&2
  fi
  [[ -x "$PYTHON" ]] || command -v "$PYTHON" >/dev/null || { echo "error: no python at $PYTHON (set PYTHON)" >&2; exit 1; }
  echo "$STORE" >"$DIR/mlflow.backend"
  # setsid: its own process group, so stop.sh also ends the uvicorn workers it spawns. Job execution
  # off: no job-runner processes (about 2 GB less, faster start). MLflow creates its tables in an
  # empty database on start; after an MLflow upgrade run `mlflow db upgrade` on it once.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
  setsid "$PYTHON" -m mlflow server \
    --backend-store-uri "$STORE" \
    --artifacts-destination "s3://$BUCKET/mlflow" \
    --host 127.0.0.1 --port "$PORT" --workers "$WORKERS" \
    >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  wait_ready "MLflow server on $URI" healthy 240 "$PIDFILE" "$LOG"
  echo "MLflow server pid $(cat "$PIDFILE") at $URI, backend $STORE, artifacts s3://$BUCKET/mlflow, log $LOG" >&2
fi

echo "export MLFLOW_TRACKING_URI=$URI"
