# Shared by the scripts in infra/local (sourced, not run).

# wait_ready NAME CHECK TRIES PIDFILE LOG: poll CHECK every 0.5 s until it succeeds; fail early with
# the log's tail if the server's process exits, or after TRIES polls.
wait_ready() {
  local name=$1 check=$2 tries=$3 pidfile=$4 log=$5
  for _ in $(seq 1 "$tries"); do
    "$check" && return 0
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "error: $name exited; last lines of $log:" >&2
      tail -n 20 "$log" >&2
      rm -f "$pidfile"
      exit 1
    fi
    sleep 0.5
  done
  "$check" || { echo "error: $name not ready within $((tries / 2)) s (log: $log)" >&2; exit 1; }
}

# port_answers PORT: true when something accepts TCP connections on 127.0.0.1:PORT.
port_answers() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# pg_bindir: print the folder holding PostgreSQL's server programs (initdb, pg_ctl, postgres, psql):
# $PGBIN if set, else initdb's folder on PATH, else the newest /usr/lib/postgresql/*/bin (Debian
# keeps them off PATH). Fails with a hint when there are none.
pg_bindir() {
  local d
  if [[ -n "${PGBIN:-}" ]]; then
    [[ -x "$PGBIN/initdb" ]] && { echo "$PGBIN"; return 0; }
    echo "error: no initdb in PGBIN=$PGBIN" >&2
    return 1
  fi
  if command -v initdb >/dev/null 2>&1; then
    d=$(dirname "$(readlink -f "$(command -v initdb)")")
    [[ -x "$d/pg_ctl" ]] && { echo "$d"; return 0; }
  fi
  for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
    [[ -x "$d/initdb" ]] && { echo "$d"; return 0; }
  done
  echo "error: PostgreSQL server programs (initdb, pg_ctl) not found: install them" \
       "(Debian: apt-get install postgresql), set PGBIN to their folder, or use BACKEND=sqlite" >&2
  return 1
}

# as_pg CMD…: run CMD as the owner of the PostgreSQL data folder. PostgreSQL refuses to run as root,
# so as root that is user `postgres`; otherwise the current user. Runs from / so that a working
# folder the postgres user cannot read draws no warnings.
as_pg() {
  if [[ $EUID -eq 0 ]]; then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && "$@")
  fi
}

# pg_running PGDATA: true when the postmaster named in PGDATA/postmaster.pid is alive (read from the PID
# file and the process table, no login or user switch needed). A stale file whose PID now belongs to
# another program does not count.
pg_running() {
  local pid
  pid=$(sed -n 1p "$1/postmaster.pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && [[ "$(ps -o comm= -p "$pid")" == postgres* ]]
}
