#!/usr/bin/env bash
# Stop the test cluster that tests/cluster/up.sh started: cancel its jobs, then stop slurmd,
# slurmctld, slurmdbd, MariaDB and munged. Only processes recorded in the state folder's pid files
# are stopped, so a munged that up.sh found already running stays. Safe to run when nothing runs.
# State, configuration and the accounting database stay, so the next up.sh starts fast.
set -euo pipefail

SCRIPT_NAME="down.sh"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$SCRIPT_DIR/common.sh"

# Cancel every job of the test cluster and wait up to 60 s for them to end, because slurmstepd
# processes outlive a stopped slurmd.
cancel_jobs() {
  if ! live_pid "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null; then
    return 0
  fi
  local job_ids
  job_ids="$(timeout 10 squeue -h -o %A 2>/dev/null || true)"
  if [[ -z "$job_ids" ]]; then
    return 0
  fi
  log "cancelling jobs: $(printf '%s' "$job_ids" | tr '\n' ' ')"
  # Word splitting is wanted here: squeue prints one job id per line.
  # shellcheck disable=SC2086
  scancel $job_ids || true
  local deadline=$((SECONDS + 60))
  while [[ -n "$(timeout 10 squeue -h -o %A 2>/dev/null || true)" ]]; do
    if ((SECONDS >= deadline)); then
      log "jobs still in the queue after 60 s; stopping the daemons anyway"
      return 0
    fi
    sleep 1
  done
}

main() {
  if ((EUID != 0)); then
    fail "run as root: the daemons run as root or as munge and mysql"
  fi
  if [[ ! -d "$STATE" ]]; then
    log "nothing to stop: $STATE does not exist"
    return 0
  fi

  cancel_jobs
  stop_process slurmd "$RUN_DIR/slurmd.pid" slurmd
  stop_process slurmctld "$RUN_DIR/slurmctld.pid" slurmctld
  stop_process slurmdbd "$RUN_DIR/slurmdbd.pid" slurmdbd
  # mariadbd shuts down cleanly on SIGTERM, and mysqld_safe then exits instead of restarting it.
  stop_process mariadbd "$MARIADB_DIR/mariadbd.pid" mariadbd 60
  stop_process mysqld_safe "$RUN_DIR/mysqld_safe.pid" mysqld_safe 10
  stop_process munged "$RUN_DIR/munged.pid" munged
  log "stopped; state kept in $STATE"
}

main "$@"
