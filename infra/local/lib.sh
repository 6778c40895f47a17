# Shared by the start-*.sh scripts (sourced, not run).

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
