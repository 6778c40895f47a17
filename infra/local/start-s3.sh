#!/usr/bin/env bash
# Start a local S3-compatible server (moto) on 127.0.0.1, create a bucket, print exports to eval:
#   eval "$(bash infra/local/start-s3.sh)"
# Settings (environment): PYTHON (.venv/bin/python), PORT (5000), BUCKET (raysl),
# DIR (/tmp/raysl-local: PID file s3.pid, log s3.log). Stop with infra/local/stop.sh.
# moto keeps objects in memory: they are gone when the server stops.
# Only the export lines go to stdout; progress and errors go to stderr.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PYTHON=${PYTHON:-.venv/bin/python}
PORT=${PORT:-5000}
BUCKET=${BUCKET:-raysl}
DIR=${DIR:-/tmp/raysl-local}
ENDPOINT="http://127.0.0.1:${PORT}"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PIDFILE="$DIR/s3.pid"
LOG="$DIR/s3.log"

answers() { curl -s -o /dev/null --max-time 2 "$ENDPOINT/"; }

if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && answers; then
  echo "S3 server already running (pid $(cat "$PIDFILE")) at $ENDPOINT" >&2
else
  if answers; then
    echo "error: something else already answers on $ENDPOINT; set PORT to a free port" >&2
    exit 1
  fi
  [[ -x "$PYTHON" ]] || command -v "$PYTHON" >/dev/null || { echo "error: no python at $PYTHON (set PYTHON)" >&2; exit 1; }
  # setsid: its own process group, so stop.sh can end it and any children together.
  setsid "$PYTHON" -m moto.server -H 127.0.0.1 -p "$PORT" >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  wait_ready "S3 server on $ENDPOINT" answers 60 "$PIDFILE" "$LOG"
  echo "S3 server (moto) pid $(cat "$PIDFILE") at $ENDPOINT, log $LOG" >&2
fi

AWS_ENDPOINT_URL="$ENDPOINT" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true BUCKET="$BUCKET" \
"$PYTHON" -c '
import os, sys, boto3
s3 = boto3.client("s3")
name = os.environ["BUCKET"]
try:
    s3.create_bucket(Bucket=name)
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass
print(f"bucket s3://{name} ready", file=sys.stderr)
'

cat <<EXPORTS
export AWS_ENDPOINT_URL=$ENDPOINT
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
EXPORTS
