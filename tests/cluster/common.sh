# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this file
# Settings and helpers shared by up.sh and down.sh. Sourced, not run.

STATE="${KITSJOBS_SLURM_STATE:-/var/lib/kitsjobs-slurm}"
ETC_DIR="$STATE/etc"
RUN_DIR="$STATE/run"
LOG_DIR="$STATE/log"
MARIADB_DIR="$STATE/mariadb"
# MariaDB of the test cluster listens on this loopback port. Slurm keeps its default ports 6817-6819.
DB_PORT="${KITSJOBS_SLURM_DB_PORT:-6816}"
CLUSTER_NAME="kitsjobs"
NODE_NAME="localhost"
# Daemons and the commands below read this file. /etc/slurm/slurm.conf links to it for other clients.
export SLURM_CONF="$ETC_DIR/slurm.conf"

# Print a progress line.
log() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*"
}

# Print the error and the tail of LOG_FILE (if given and present) to stderr, then exit 1.
fail() {
  local message="$1" log_file="${2:-}"
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$message" >&2
  if [[ -n "$log_file" && -s "$log_file" ]]; then
    printf '%s: last lines of %s:\n' "$SCRIPT_NAME" "$log_file" >&2
    tail -n 25 "$log_file" | sed 's/^/    /' >&2
  fi
  exit 1
}

# Print the pid stored in PID_FILE if that process is alive and its command line contains PROGRAM.
# The command-line check keeps a recycled pid from being taken for one of our daemons.
live_pid() {
  local pid_file="$1" program="$2" pid
  [[ -s "$pid_file" ]] || return 1
  pid="$(tr -d '[:space:]' <"$pid_file")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$program" || return 1
  printf '%s\n' "$pid"
}

# Send SIGTERM to the process in PID_FILE (if it runs PROGRAM), wait up to TIMEOUT_S seconds,
# then SIGKILL it. Removes PID_FILE afterwards.
stop_process() {
  local name="$1" pid_file="$2" program="$3" timeout_s="${4:-30}" pid waited_s=0
  if ! pid="$(live_pid "$pid_file" "$program")"; then
    rm -f "$pid_file"
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do
    if ((waited_s >= timeout_s)); then
      log "$name (pid $pid) still runs after ${timeout_s} s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 1
    waited_s=$((waited_s + 1))
  done
  rm -f "$pid_file"
}
