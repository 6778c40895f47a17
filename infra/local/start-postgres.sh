#!/usr/bin/env bash
# Start a local PostgreSQL for the MLflow server, listening on 127.0.0.1 only (no Unix socket):
# a cluster in $DIR/pg, created on the first run (initdb, then role and database `mlflow` in
# single-user mode; the folder appears only once all of that succeeded). The role's password is
# random, made once, and kept only in the libpq password file $DIR/pgpass (mode 600): it is never
# in a URI, an argument, stdout or a log. Every TCP login needs a password (scram-sha-256); the
# superuser has none, so nothing can log in as it over the network.
#   eval "$(bash infra/local/start-postgres.sh)"      # start-mlflow.sh runs it for you
# Settings (environment): PGPORT (5433), DIR (/tmp/raysl-local: data pg/, password file pgpass,
# log postgres.log), PGBIN (folder of initdb/pg_ctl; default: PATH, else the newest
# /usr/lib/postgresql/*/bin). As root the server runs as user `postgres` (PostgreSQL refuses root),
# which must be able to reach $DIR. Stop with stop.sh.
# Only the export lines go to stdout (PGPASSFILE and MLFLOW_BACKEND_STORE_URI, which carries no
# password); progress and errors go to stderr.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PGPORT=${PGPORT:-5433}
DIR=${DIR:-/tmp/raysl-local}

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PGDATA="$DIR/pg"
PGPASS="$DIR/pgpass"
LOG="$DIR/postgres.log"
PGBIN=$(pg_bindir)
# +psycopg2: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, which raysl does not install.
STORE="postgresql+psycopg2://mlflow@127.0.0.1:${PGPORT}/mlflow"

if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
  echo "error: running as root, PostgreSQL needs an unprivileged user \`postgres\` (useradd --system postgres)" >&2
  exit 1
fi

# owned_by_pg PATH: hand PATH to the user the server runs as (as root: postgres).
owned_by_pg() {
  if [[ $EUID -eq 0 ]]; then chown postgres: "$1"; fi
}

init_cluster() {
  local tmp="$DIR/pg.init" pw
  rm -rf "$tmp"
  mkdir -m 700 "$tmp"
  owned_by_pg "$tmp"
  if ! as_pg test -w "$tmp"; then
    rm -rf "$tmp"
    echo "error: user postgres cannot reach $DIR (a parent folder is not searchable by others):" \
         "choose another DIR, or chmod o+x the parent folders" >&2
    exit 1
  fi
  echo "creating a PostgreSQL cluster in $PGDATA (first run)" >&2
  if ! as_pg "$PGBIN/initdb" -D "$tmp" --auth-local=peer --auth-host=scram-sha-256 --no-locale -E UTF8 >"$DIR/pg-init.log" 2>&1; then
    echo "error: initdb failed; last lines of $DIR/pg-init.log:" >&2
    tail -n 20 "$DIR/pg-init.log" >&2
    exit 1
  fi
  printf "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n" >>"$tmp/postgresql.conf"
  pw=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
  # Single-user mode: no server, no network, no superuser password needed. The statements arrive on
  # stdin (not in argv); log_min_error_statement=panic keeps a failed statement out of the log.
  if ! printf "CREATE ROLE mlflow LOGIN PASSWORD '%s';\nCREATE DATABASE mlflow OWNER mlflow;\n" "$pw" |
      as_pg "$PGBIN/postgres" --single -D "$tmp" -c exit_on_error=true -c log_min_error_statement=panic \
        postgres >>"$DIR/pg-init.log" 2>&1; then
    echo "error: creating role and database mlflow failed; last lines of $DIR/pg-init.log:" >&2
    tail -n 20 "$DIR/pg-init.log" >&2
    exit 1
  fi
  (umask 077 && printf '127.0.0.1:*:*:mlflow:%s\n' "$pw" >"$PGPASS.tmp" && mv "$PGPASS.tmp" "$PGPASS")
  mv "$tmp" "$PGDATA"
}

[[ -f "$PGDATA/PG_VERSION" ]] || init_cluster
if [[ ! -f "$PGPASS" ]]; then
  echo "error: $PGPASS is missing, so the password of role mlflow is lost;" \
       "run stop.sh and delete $PGDATA to start over" >&2
  exit 1
fi

if pg_running "$PGDATA"; then
  # postmaster.pid: line 1 the PID, line 4 the port.
  running_port=$(sed -n 4p "$PGDATA/postmaster.pid")
  if [[ "$running_port" != "$PGPORT" ]]; then
    echo "error: the PostgreSQL in $PGDATA already runs on port $running_port, not PGPORT=$PGPORT;" \
         "set PGPORT=$running_port or run stop.sh first" >&2
    exit 1
  fi
  echo "PostgreSQL already running (pid $(sed -n 1p "$PGDATA/postmaster.pid")) on 127.0.0.1:$PGPORT" >&2
else
  if port_answers "$PGPORT"; then
    echo "error: something else already listens on 127.0.0.1:$PGPORT; set PGPORT to a free port" >&2
    exit 1
  fi
  touch "$LOG"
  owned_by_pg "$LOG"
  if ! as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$LOG" -s -w -t 60 -o "-p $PGPORT" start >&2; then
    echo "error: PostgreSQL did not start; last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
  echo "PostgreSQL pid $(sed -n 1p "$PGDATA/postmaster.pid") on 127.0.0.1:$PGPORT, data $PGDATA, log $LOG" >&2
fi

# The role, its password and the database answer (catches a stale or edited password file).
PSQL="$PGBIN/psql"
[[ -x "$PSQL" ]] || PSQL=psql
if ! PGPASSFILE="$PGPASS" PGCONNECT_TIMEOUT=5 "$PSQL" -X -q -w -h 127.0.0.1 -p "$PGPORT" -U mlflow -d mlflow -c "SELECT 1" >/dev/null 2>"$DIR/pg-check.log"; then
  echo "error: cannot log in as mlflow to 127.0.0.1:$PGPORT/mlflow with $PGPASS:" >&2
  cat "$DIR/pg-check.log" >&2
  exit 1
fi

cat <<EXPORTS
export PGPASSFILE=$PGPASS
export MLFLOW_BACKEND_STORE_URI=$STORE
EXPORTS
