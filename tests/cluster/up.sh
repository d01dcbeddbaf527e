#!/usr/bin/env bash
# Install (when missing) and start a single-node Slurm 22.05 cluster with accounting on loopback:
# munged, MariaDB, slurmdbd, slurmctld and slurmd. Safe to run again while it is up.
# Run as root on Debian bookworm. State and logs live in $KITSJOBS_SLURM_STATE
# (default /var/lib/kitsjobs-slurm); tests/cluster/down.sh stops what this script started.
set -euo pipefail

SCRIPT_NAME="up.sh"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$SCRIPT_DIR/common.sh"

PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)

# Resources the node declares. They may exceed the machine's (SlurmdParameters=config_overrides),
# so that several multi-GPU, multi-CPU tasks fit at once as on a real GPU node.
NODE_CPUS=32
NODE_CORES_PER_SOCKET=16
NODE_REAL_MEMORY_MB=128000
NODE_GPUS=4
ACCOUNT="ippmed"
QOS="ippmed-qos"
QOS_MAX_GPUS_PER_USER=4

trap 'printf "%s: error: command failed (exit %s) at line %s: %s\n" "$SCRIPT_NAME" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

# Install the Debian packages that are missing, without letting their scripts start services.
install_packages() {
  local missing=() package
  for package in "${PACKAGES[@]}"; do
    if [[ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" != "install ok installed" ]]; then
      missing+=("$package")
    fi
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi

  log "installing ${missing[*]}"
  # A policy-rc.d that exits 101 stops maintainer scripts from starting system-wide instances,
  # which would take the ports and sockets this script uses.
  local policy_file=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e "$policy_file" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy_file"
    chmod 755 "$policy_file"
    added_policy=1
  fi
  local status=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confold "${missing[@]}"
  } >"$LOG_DIR/apt.log" 2>&1 || status=$?
  if ((added_policy)); then
    rm -f "$policy_file"
  fi
  if ((status != 0)); then
    fail "apt-get install of ${missing[*]} failed (exit $status)" "$LOG_DIR/apt.log"
  fi
}

# Run COMMAND... every second until it succeeds. Fail and show LOG_FILE after TIMEOUT_S seconds,
# or as soon as the daemon in PID_FILE has exited (checked once the daemon has written PID_FILE).
wait_until() {
  local timeout_s="$1" what="$2" log_file="$3" pid_file="$4" program="$5"
  shift 5
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    if [[ -s "$pid_file" ]] && ! live_pid "$pid_file" "$program" >/dev/null; then
      fail "$program exited while waiting for $what" "$log_file"
    fi
    if ((SECONDS >= deadline)); then
      fail "timed out after ${timeout_s} s waiting for $what" "$log_file"
    fi
    sleep 1
  done
}

# Fill a template: @NAME@ placeholders become values. Writes OUTPUT only when its text changes,
# and returns 0 when it changed, 1 when not.
render() {
  local template="$1" output="$2" mode="$3" text
  text="$(<"$template")"
  text="${text//@STATE@/"$STATE"}"
  text="${text//@CPUS@/"$NODE_CPUS"}"
  text="${text//@CORES_PER_SOCKET@/"$NODE_CORES_PER_SOCKET"}"
  text="${text//@REAL_MEMORY_MB@/"$NODE_REAL_MEMORY_MB"}"
  text="${text//@GPUS@/"$NODE_GPUS"}"
  text="${text//@LAST_GPU@/"$((NODE_GPUS - 1))"}"
  text="${text//@DB_PORT@/"$DB_PORT"}"
  text="${text//@DB_PASSWORD@/"$DB_PASSWORD"}"
  text="${text//@GPU_FILES@/"$GPU_FILES"}"
  text="${text//@COMMUNICATION_PARAMETERS@/"$COMMUNICATION_PARAMETERS"}"
  if [[ -f "$output" && "$(<"$output")" == "$text" ]]; then
    return 1
  fi
  # Write next to the target and rename, so a daemon never reads a half-written file.
  printf '%s\n' "$text" >"$output.tmp"
  chmod "$mode" "$output.tmp"
  mv "$output.tmp" "$output"
  return 0
}

# Create the state folders, the database password, the configuration files and fake GPU device
# files. Stops daemons whose configuration changed, so that the start steps below restart them.
write_configs() {
  mkdir -p "$ETC_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE/slurmctld" "$STATE/slurmd" "$STATE/dev"
  chmod 700 "$ETC_DIR"

  if [[ ! -s "$ETC_DIR/db_password" ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=\n' >"$ETC_DIR/db_password")
  fi
  DB_PASSWORD="$(<"$ETC_DIR/db_password")"

  make_gpu_device_files
  choose_communication_parameters

  local slurm_changed=0 dbd_changed=0
  render "$SCRIPT_DIR/slurm.conf.in" "$ETC_DIR/slurm.conf" 644 && slurm_changed=1
  render "$SCRIPT_DIR/gres.conf.in" "$ETC_DIR/gres.conf" 644 && slurm_changed=1
  # slurmdbd rejects a slurmdbd.conf that others can read, because it contains the password.
  render "$SCRIPT_DIR/slurmdbd.conf.in" "$ETC_DIR/slurmdbd.conf" 600 && dbd_changed=1
  if ((slurm_changed)); then
    stop_process slurmd "$RUN_DIR/slurmd.pid" slurmd
    stop_process slurmctld "$RUN_DIR/slurmctld.pid" slurmctld
  fi
  if ((dbd_changed)); then
    stop_process slurmdbd "$RUN_DIR/slurmdbd.pid" slurmdbd
  fi

  link_client_config
}

# Create $STATE/dev/nvidia0... as character devices with the numbers of /dev/null (1, 3), so that
# Slurm numbers the GPUs and sets CUDA_VISIBLE_DEVICES. Sets GPU_FILES to the gres.conf File= clause,
# or to nothing where mknod is not permitted.
make_gpu_device_files() {
  local index device
  GPU_FILES=" File=$STATE/dev/nvidia[0-$((NODE_GPUS - 1))]"
  for ((index = 0; index < NODE_GPUS; index++)); do
    device="$STATE/dev/nvidia$index"
    if [[ -c "$device" ]]; then
      continue
    fi
    rm -f "$device"
    if ! mknod -m 666 "$device" c 1 3 2>/dev/null; then
      log "mknod is not permitted here: jobs get no CUDA_VISIBLE_DEVICES, only SLURM_GPUS_ON_NODE"
      GPU_FILES=""
      return 0
    fi
  done
}

# Set COMMUNICATION_PARAMETERS. NoInAddrAny binds the daemons to the address the hostname
# resolves to, so it keeps them on loopback only when that address is a loopback one. Otherwise
# slurmd would listen where slurmctld (NodeAddr=127.0.0.1) cannot reach it.
choose_communication_parameters() {
  local host_address
  host_address="$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk 'NR == 1 { print $1 }')"
  if [[ "$host_address" == 127.* ]]; then
    COMMUNICATION_PARAMETERS="CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"
  else
    log "hostname $(hostname) resolves to '${host_address:-nothing}', not loopback:" \
      "slurmctld and slurmd will listen on all interfaces"
    COMMUNICATION_PARAMETERS="# CommunicationParameters left at its default: the hostname is not loopback."
  fi
}

# Point /etc/slurm/slurm.conf, where sbatch, sacct and submitit look by default, at our file.
# Fails rather than replace a configuration this script did not write.
link_client_config() {
  local link=/etc/slurm/slurm.conf
  mkdir -p /etc/slurm
  if [[ -e "$link" || -L "$link" ]]; then
    if [[ "$(readlink -f "$link")" == "$(readlink -f "$SLURM_CONF")" ]]; then
      return 0
    fi
    # A link into another state folder of this script, or a dangling link, may be replaced.
    if [[ ! -L "$link" ]] || { [[ -e "$link" ]] && ! grep -q 'written by tests/cluster/up.sh' "$link"; }; then
      fail "$link exists and was not written by this script; move it away to use the test cluster"
    fi
  fi
  ln -sfn "$SLURM_CONF" "$link"
}

# Start munged as user munge, unless a munged already responds on the default socket.
start_munge() {
  if live_pid "$RUN_DIR/munged.pid" munged >/dev/null; then
    return 0
  fi
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "using the munged that already runs (not started by this script, so down.sh leaves it)"
    return 0
  fi

  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  # munged refuses to start unless its socket folder belongs to its own user.
  install -d -o munge -g munge -m 755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged >>"$LOG_DIR/munged.start.log" 2>&1 ||
    fail "munged failed to start" /var/log/munge/munged.log
  wait_until 20 "munged to respond" /var/log/munge/munged.log /run/munge/munged.pid munged \
    bash -c 'munge -n </dev/null | unmunge'
  cp /run/munge/munged.pid "$RUN_DIR/munged.pid"
}

# Initialize (first time) and start a MariaDB bound to 127.0.0.1:$DB_PORT with its data in the state folder.
start_mariadb() {
  local socket="$MARIADB_DIR/mysqld.sock"
  if ! live_pid "$MARIADB_DIR/mariadbd.pid" mariadbd >/dev/null; then
    install -d -o mysql -g mysql -m 750 "$MARIADB_DIR" "$MARIADB_DIR/data"
    if [[ ! -d "$MARIADB_DIR/data/mysql" ]]; then
      mariadb-install-db --no-defaults --user=mysql --datadir="$MARIADB_DIR/data" \
        --auth-root-authentication-method=socket --skip-test-db \
        >"$LOG_DIR/mariadb-install.log" 2>&1 ||
        fail "mariadb-install-db failed" "$LOG_DIR/mariadb-install.log"
    fi
    touch "$LOG_DIR/mariadb.log"
    chown mysql:mysql "$LOG_DIR/mariadb.log"
    # --no-defaults keeps /etc/mysql settings (another socket, port or data folder) out. slurmdbd
    # 22.05 logs an error unless the InnoDB buffer pool is at least 512 MiB and the lock wait 450 s.
    setsid nohup mysqld_safe --no-defaults --user=mysql --datadir="$MARIADB_DIR/data" \
      --socket="$socket" --pid-file="$MARIADB_DIR/mariadbd.pid" --log-error="$LOG_DIR/mariadb.log" \
      --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
      --innodb-lock-wait-timeout=900 --innodb-buffer-pool-size=512M </dev/null >>"$LOG_DIR/mysqld_safe.log" 2>&1 &
    printf '%s\n' "$!" >"$RUN_DIR/mysqld_safe.pid"
    wait_until 60 "MariaDB to accept connections" "$LOG_DIR/mariadb.log" \
      "$RUN_DIR/mysqld_safe.pid" mysqld_safe \
      mariadb-admin --no-defaults --socket="$socket" ping
  fi

  # Root logs in through the socket (unix_socket authentication). slurmdbd uses TCP and a password.
  mariadb --no-defaults --socket="$socket" <<SQL || fail "creating the Slurm database failed"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

start_slurmdbd() {
  if ! live_pid "$RUN_DIR/slurmdbd.pid" slurmdbd >/dev/null; then
    rm -f "$RUN_DIR/slurmdbd.pid"
    slurmdbd >>"$LOG_DIR/slurmdbd.start.log" 2>&1 || fail "slurmdbd failed to start" "$LOG_DIR/slurmdbd.log"
  fi
  # The first start creates the tables, which takes a few seconds.
  wait_until 90 "slurmdbd to respond to sacctmgr" "$LOG_DIR/slurmdbd.log" \
    "$RUN_DIR/slurmdbd.pid" slurmdbd \
    timeout 10 sacctmgr -n show cluster

  # slurmctld registers with slurmdbd at start, so the cluster must exist before it.
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
  fi
}

start_slurmctld() {
  if ! live_pid "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null; then
    rm -f "$RUN_DIR/slurmctld.pid"
    slurmctld >>"$LOG_DIR/slurmctld.start.log" 2>&1 || fail "slurmctld failed to start" "$LOG_DIR/slurmctld.log"
  fi
  wait_until 60 "slurmctld to respond to scontrol ping" "$LOG_DIR/slurmctld.log" \
    "$RUN_DIR/slurmctld.pid" slurmctld \
    bash -c 'timeout 10 scontrol ping | grep -q "is UP"'
}

# Create the QoS, account and user association (each only when missing), then set their limits.
setup_accounting() {
  if ! sacctmgr -n -P show qos format=name | grep -qx "$QOS"; then
    sacctmgr -i add qos "$QOS" >/dev/null
  fi
  sacctmgr -i modify qos where name="$QOS" set MaxTRESPerUser="gres/gpu=$QOS_MAX_GPUS_PER_USER" >/dev/null

  if ! sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT"; then
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER_NAME" \
      Description="kitsjobs test account" Organization=kitsjobs >/dev/null
  fi
  if ! sacctmgr -n -P show association where user=root account="$ACCOUNT" format=user | grep -qx root; then
    sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER_NAME" >/dev/null
  fi
  sacctmgr -i modify user where name=root set DefaultAccount="$ACCOUNT" \
    QOS="normal,$QOS" DefaultQOS="$QOS" >/dev/null
}

# Start slurmd and wait until the node is usable. ReturnToService=2 brings back a node that was
# marked DOWN because the previous slurmd stopped.
start_slurmd() {
  if ! live_pid "$RUN_DIR/slurmd.pid" slurmd >/dev/null; then
    rm -f "$RUN_DIR/slurmd.pid"
    slurmd -N "$NODE_NAME" >>"$LOG_DIR/slurmd.start.log" 2>&1 || fail "slurmd failed to start" "$LOG_DIR/slurmd.log"
  fi
  local deadline=$((SECONDS + 60)) node_state=""
  while true; do
    node_state="$(sinfo -h -N -n "$NODE_NAME" -o %t 2>/dev/null | head -n 1)"
    case "$node_state" in
      idle | mix | alloc) return 0 ;;
    esac
    if [[ -s "$RUN_DIR/slurmd.pid" ]] && ! live_pid "$RUN_DIR/slurmd.pid" slurmd >/dev/null; then
      fail "slurmd exited while waiting for node $NODE_NAME to become idle" "$LOG_DIR/slurmd.log"
    fi
    if ((SECONDS >= deadline)); then
      sinfo -R >&2 || true
      fail "node $NODE_NAME is '$node_state', not idle, after 60 s" "$LOG_DIR/slurmd.log"
    fi
    sleep 1
  done
}

main() {
  if ((EUID != 0)); then
    fail "run as root: the script installs packages and starts daemons"
  fi
  mkdir -p "$LOG_DIR"

  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  setup_accounting
  start_slurmd

  log "Slurm cluster '$CLUSTER_NAME' up in ${SECONDS} s: node $NODE_NAME" \
    "(${NODE_CPUS} CPUs, ${NODE_REAL_MEMORY_MB} MB, gpu:a40:${NODE_GPUS}), partitions IPPMED-A40" \
    "(default, 2 days) and debug (1 h), account $ACCOUNT, QoS $QOS" \
    "(gres/gpu=${QOS_MAX_GPUS_PER_USER} per user), state $STATE"
}

main "$@"
