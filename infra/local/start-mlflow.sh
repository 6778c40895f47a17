#!/usr/bin/env bash
# Start a local MLflow tracking server: SQLite backend in $DIR, artifacts proxied to S3
# (run start-s3.sh first and eval its exports: the server needs the endpoint and keys).
#   eval "$(bash infra/local/start-mlflow.sh)"
# Settings (environment): PYTHON (.venv/bin/python), PORT (5001), BUCKET (raysl), WORKERS (2),
# DIR (/tmp/raysl-local: mlflow.db, PID file mlflow.pid, log mlflow.log). Stop with stop.sh.
# Only the export line goes to stdout; progress and errors go to stderr.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PYTHON=${PYTHON:-.venv/bin/python}
PORT=${PORT:-5001}
BUCKET=${BUCKET:-raysl}
WORKERS=${WORKERS:-2}
DIR=${DIR:-/tmp/raysl-local}
URI="http://127.0.0.1:${PORT}"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PIDFILE="$DIR/mlflow.pid"
LOG="$DIR/mlflow.log"

healthy() { [[ "$(curl -s --max-time 2 "$URI/health" 2>/dev/null)" == "OK" ]]; }

if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && healthy; then
  echo "MLflow server already running (pid $(cat "$PIDFILE")) at $URI" >&2
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
  # setsid: its own process group, so stop.sh also ends the uvicorn workers it spawns.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
  setsid "$PYTHON" -m mlflow server \
    --backend-store-uri "sqlite:///$DIR/mlflow.db" \
    --artifacts-destination "s3://$BUCKET/mlflow" \
    --host 127.0.0.1 --port "$PORT" --workers "$WORKERS" \
    >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  wait_ready "MLflow server on $URI" healthy 120 "$PIDFILE" "$LOG"
  echo "MLflow server pid $(cat "$PIDFILE") at $URI, store $DIR/mlflow.db, artifacts s3://$BUCKET/mlflow, log $LOG" >&2
fi

echo "export MLFLOW_TRACKING_URI=$URI"
