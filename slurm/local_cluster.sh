#!/usr/bin/env bash
# Single-node Slurm cluster on 127.0.0.1 for tests (Debian bookworm, Slurm 22.05).
#
#   slurm/local_cluster.sh start    install packages if missing, start munged,
#                                   a private MariaDB, slurmdbd, slurmctld, slurmd;
#                                   returns once the node is idle and root has an
#                                   association in the accounting database
#   slurm/local_cluster.sh stop     cancel jobs, stop only the daemons started here
#   slurm/local_cluster.sh status   print state; exit 0 when up, 1 when down
#   slurm/local_cluster.sh env      print `export SLURM_CONF=...` for clients
#   slurm/local_cluster.sh purge    stop, then delete the state folder
#
# Everything (configs, pid files, logs, spool, DB, munge socket) lives under
# $RCOT_SLURM_STATE (default /tmp/reinforce-cot-slurm). The client config is
# also copied to /etc/slurm/slurm.conf so plain sbatch/sacct/submitit work
# without SLURM_CONF. See slurm/README.md.
set -euo pipefail

export OMP_NUM_THREADS=1
export LC_ALL=C

STATE="${RCOT_SLURM_STATE:-/tmp/reinforce-cot-slurm}"
CLUSTER="${RCOT_SLURM_CLUSTER:-rcot}"
CTLD_PORT="${RCOT_SLURM_PORT:-6817}"          # slurmd uses +1, slurmdbd +2, the second slurmd +3
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
SLURMD2_PORT=$((CTLD_PORT + 3))
DB_PORT="${RCOT_SLURM_DB_PORT:-3307}"          # private MariaDB, 127.0.0.1 only
TIMEOUT="${RCOT_SLURM_TIMEOUT:-60}"            # seconds per readiness wait
APT_LOCK_TIMEOUT="${RCOT_SLURM_APT_LOCK_TIMEOUT:-600}"  # seconds to wait for another apt-get/dpkg
PACKAGES=(slurm-wlm slurmdbd slurm-client munge mariadb-server mariadb-client)

ETC="$STATE/etc"
RUN="$STATE/run"
LOG="$STATE/log"
CONF="$ETC/slurm.conf"
DBDCONF="$ETC/slurmdbd.conf"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
MUNGE_KEY="$MUNGE_DIR/munge.key"
DB_DIR="$STATE/mysql"
DB_SOCKET="$RUN/mysqld.sock"
SYSTEM_CONF=/etc/slurm/slurm.conf
MARKER="# managed by reinforce-cot slurm/local_cluster.sh"
# Two slurmd on this host (Debian's Slurm is built with multiple-slurmd support: `scontrol show config`
# says MULTIPLE_SLURMD = Yes): NODE (all CPUs, partition debug) and NODE2 (1 CPU), which with NODE forms
# partition `multi`, where a job can span 2 nodes. A slurm.conf without this line is from an older script.
NODE=$(hostname -s)
NODE2="$NODE-2"
LAYOUT="# layout: nodes $NODE and $NODE2 (partitions debug, multi)"

# daemon name -> pid file; the name is also the expected /proc/PID/comm
declare -A PIDFILE=(
  [munged]="$RUN/munged.pid"
  [mariadbd]="$RUN/mariadbd.pid"
  [slurmdbd]="$RUN/slurmdbd.pid"
  [slurmctld]="$RUN/slurmctld.pid"
  [slurmd]="$RUN/slurmd-$NODE.pid"
  [slurmd2]="$RUN/slurmd-$NODE2.pid"
)
declare -A LOGFILE=(
  [munged]="$LOG/munged.log"
  [mariadbd]="$LOG/mariadbd.log"
  [slurmdbd]="$LOG/slurmdbd.log"
  [slurmctld]="$LOG/slurmctld.log"
  [slurmd]="$LOG/slurmd-$NODE.log"
  [slurmd2]="$LOG/slurmd-$NODE2.log"
)
declare -A COMM=([slurmd2]=slurmd)  # /proc/PID/comm where it is not the daemon's name
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd slurmd2)

log() { echo "local_cluster: $*" >&2; }

# Daemons started here must not inherit the caller's open files: under `flock LOCK local_cluster.sh start`
# munged, mariadbd and slurmdbd would keep LOCK's descriptor, and so the lock, for as long as they run.
close_inherited_fds() {
  local fd
  for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2 && fd != 255)); then eval "exec $fd>&-" 2>/dev/null || true; fi
  done
}

die() {  # die MESSAGE [LOGFILE]: tail of the log, then a one-line error last
  if [[ -n "${2:-}" && -f "$2" ]]; then
    echo "---- last lines of $2 ----" >&2
    tail -n 15 "$2" >&2 || true
    echo "----" >&2
  fi
  echo "local_cluster: ERROR: $1${2:+ (log: $2)}" >&2
  exit 1
}

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (daemons run as SlurmUser=root)"; }

# alive and not a zombie (daemons are reparented to PID 1, which may be slow
# to reap them, and kill -0 succeeds on a zombie)
alive() {
  local st
  st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
  [[ -n $st && $st != Z && $st != X ]]
}

# pid from a pid file if that process is alive and is the expected program
live_pid() {
  local name=$1 f=${PIDFILE[$1]} pid comm
  [[ -s $f ]] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [[ -n $pid ]] && alive "$pid" || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "${COMM[$name]:-$name}" ]] || return 1   # guards against pid reuse
  echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION LOGFILE CMD...
  local secs=$1 what=$2 logf=$3; shift 3
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "$what not ready within ${secs}s" "$logf"
    sleep 0.2
  done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

with_conf() { SLURM_CONF="$CONF" "$@"; }

# ---------------------------------------------------------------- packages
have_packages() {
  local p st
  for p in "${PACKAGES[@]}"; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) || return 1
    [[ $st == installed ]] || return 1
  done
  command -v slurmctld >/dev/null && command -v mariadbd >/dev/null
}

# apt/dpkg locks another apt-get or dpkg may hold (fcntl locks: flock(1) cannot test them)
APT_LOCKS=(/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock)

lock_holder() {  # lock_holder FILE: "PID (COMMAND)" of the process holding FILE's lock, per /proc/locks
  local ino pid
  ino=$(stat -c %i "$1" 2>/dev/null) || return 1
  pid=$(awk -v ino="$ino" '$2 != "->" { n = split($6, d, ":"); if (d[n] == ino) { print $5; exit } }' /proc/locks)
  [[ -n $pid ]] || return 1
  echo "$pid ($(cat "/proc/$pid/comm" 2>/dev/null || echo '?'))"
}

held_apt_lock() {  # prints "LOCKFILE held by PID (COMMAND)" for the first held lock; fails when none is
  local f holder
  for f in "${APT_LOCKS[@]}"; do
    holder=$(lock_holder "$f") && { echo "$f held by process $holder"; return 0; }
  done
  return 1
}

# apt_run LOG CMD...: run an apt-get command; while another apt-get/dpkg holds a lock, wait (up to
# APT_LOCK_TIMEOUT seconds in all, saying so once) instead of failing. apt's own DPkg::Lock::Timeout
# covers the dpkg lock only, not `apt-get update`'s lists lock, hence the loop. Returns 75 with
# LOCK_ERROR set when the wait times out (the caller restores policy-rc.d before it dies).
LOCK_ERROR=""
apt_run() {
  local logf=$1; shift
  local end=$((SECONDS + APT_LOCK_TIMEOUT)) said="" held rc
  while :; do
    while held=$(held_apt_lock); do
      if ((SECONDS >= end)); then
        LOCK_ERROR="waited ${APT_LOCK_TIMEOUT}s for the apt/dpkg lock ($held); let that apt-get finish, or raise RCOT_SLURM_APT_LOCK_TIMEOUT"
        return 75
      fi
      [[ $said == "$held" ]] || { log "waiting for the apt/dpkg lock: $held (up to ${APT_LOCK_TIMEOUT}s)"; said=$held; }
      sleep 1
    done
    rc=0
    "$@" -o DPkg::Lock::Timeout=$((end > SECONDS ? end - SECONDS : 1)) >>"$logf" 2>&1 || rc=$?
    ((rc == 0)) && return 0
    # taken between our check and apt's: wait again; any other failure is the caller's to report
    tail -n 5 "$logf" | grep -qE "Could not get lock|Unable to acquire the dpkg frontend lock|Unable to lock" || return $rc
    if ((SECONDS >= end)); then
      LOCK_ERROR="waited ${APT_LOCK_TIMEOUT}s for the apt/dpkg lock; let the other apt-get finish, or raise RCOT_SLURM_APT_LOCK_TIMEOUT"
      return 75
    fi
  done
}

install_packages() {
  have_packages && return 0
  command -v apt-get >/dev/null || die "packages missing (${PACKAGES[*]}) and apt-get not available"
  log "installing ${PACKAGES[*]} (apt-get)"
  # policy-rc.d exit 101 keeps maintainer scripts from starting daemons;
  # put ours in place for the install and restore whatever was there.
  local prc=/usr/sbin/policy-rc.d backup="" created=0
  if [[ -e $prc ]] && ! grep -qx 'exit 101' "$prc"; then
    backup=$(mktemp); cp -p "$prc" "$backup"
  fi
  if [[ ! -e $prc || -n $backup ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod 755 "$prc"; created=1
  fi
  local rc=0
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get install -y -q --no-install-recommends
             -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  : >"/tmp/rcot-slurm-apt.log"
  apt_run /tmp/rcot-slurm-apt.log "${apt[@]}" "${PACKAGES[@]}" || rc=$?
  if ((rc != 0 && rc != 75)); then
    log "install failed with current package lists; running apt-get update once"
    rc=0
    { apt_run /tmp/rcot-slurm-apt.log apt-get update -q &&
      apt_run /tmp/rcot-slurm-apt.log "${apt[@]}" "${PACKAGES[@]}"; } || rc=$?
  fi
  if ((created)); then
    if [[ -n $backup ]]; then cp -p "$backup" "$prc"; rm -f "$backup"; else rm -f "$prc"; fi
  fi
  ((rc != 75)) || die "$LOCK_ERROR" /tmp/rcot-slurm-apt.log
  ((rc == 0)) || die "apt-get install failed" /tmp/rcot-slurm-apt.log
  have_packages || die "packages still missing after apt-get install" /tmp/rcot-slurm-apt.log
}

# ---------------------------------------------------------------- config
node_name() { echo "$NODE"; }

write_configs() {
  local node=$NODE cpus mem_total real_mem sockets cores threads line
  # GNU nproc honours OMP_NUM_THREADS (exported as 1 above): unset it here
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
  mem_total=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
  # RealMemory must not exceed what slurmd measures, or the node is drained;
  # keep a margin for the OS and the daemons themselves.
  real_mem=$((mem_total - 1024)); ((real_mem >= 256)) || real_mem=$((mem_total / 2))
  # Socket/core/thread layout as slurmd sees it (avoids "config differs" noise).
  sockets=""; cores=""; threads=""
  if line=$(slurmd -C 2>/dev/null | head -n1) && [[ $line == NodeName=* ]]; then
    local c
    c=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$line")
    if [[ $c == "$cpus" ]]; then
      sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$line")
      cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$line")
      threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$line")
    fi
  fi
  local topo=""
  [[ -n $sockets && -n $cores && -n $threads ]] &&
    topo=" Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads"

  cat >"$CONF.new" <<EOF
$MARKER
$LAYOUT
# Test cluster on one host; state folder: $STATE
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also is how long a requeued job waits before it may start again
# (default 120 s); 10 s keeps scontrol-requeue and submitit-requeue tests quick.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
# Connections to slurmdbd take their munge socket from AccountingStoragePass,
# not AuthInfo; without this sacct/sacctmgr use /run/munge and fail.
AccountingStoragePass=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/slurmctld
# %n: the node name, one of each per slurmd
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=${LOGFILE[slurmctld]}
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MailProg=/bin/true
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# sched_interval/bf_interval: re-test pending jobs every 2 s (defaults 60/30 s),
# so a requeued job restarts as soon as its cred_expire delay is over
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
EnforcePartLimits=ALL
JobRequeue=1
KillWait=5
OverTimeLimit=0
InactiveLimit=0
MinJobAge=300
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node Port=$SLURMD_PORT CPUs=$cpus$topo RealMemory=$real_mem State=UNKNOWN
# the second slurmd, same host: 1 CPU, so that a 2-node job of 1 task per node uses this host's 2 cores
NodeName=$NODE2 NodeAddr=127.0.0.1 NodeHostname=$node Port=$SLURMD2_PORT CPUs=1 RealMemory=$((real_mem / 2)) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=01:00:00 DefaultTime=00:10:00 State=UP
PartitionName=multi Nodes=$node,$NODE2 MaxTime=01:00:00 DefaultTime=00:10:00 State=UP
EOF
  mv "$CONF.new" "$CONF"
  chmod 644 "$CONF"

  [[ -s $ETC/dbpass ]] || { head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$ETC/dbpass"; }
  chmod 600 "$ETC/dbpass"
  umask 077
  cat >"$DBDCONF" <<EOF
$MARKER
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$node
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=${LOGFILE[slurmdbd]}
PidFile=${PIDFILE[slurmdbd]}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/dbpass")
StorageLoc=slurm_acct_db
EOF
  umask 022
  chmod 600 "$DBDCONF"
}

# Clients (sbatch, sacct, submitit) read /etc/slurm/slurm.conf by default.
install_system_conf() {
  mkdir -p "$(dirname "$SYSTEM_CONF")"
  if [[ -e $SYSTEM_CONF ]] && ! grep -qxF "$MARKER" "$SYSTEM_CONF"; then
    log "WARNING: $SYSTEM_CONF exists and is not ours; left untouched. Use: eval \"\$($0 env)\""
    return 0
  fi
  cp "$CONF" "$SYSTEM_CONF.rcot.tmp" && mv "$SYSTEM_CONF.rcot.tmp" "$SYSTEM_CONF"
}

# ---------------------------------------------------------------- daemons
start_munged() {
  live_pid munged >/dev/null && return 0
  if [[ ! -s $MUNGE_KEY ]]; then
    umask 077
    if command -v mungekey >/dev/null; then mungekey -c -k "$MUNGE_KEY" >/dev/null 2>&1 || true; fi
    [[ -s $MUNGE_KEY ]] || dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    umask 022
  fi
  chmod 600 "$MUNGE_KEY"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" \
    --pid-file="${PIDFILE[munged]}" --log-file="${LOGFILE[munged]}" \
    --seed-file="$MUNGE_DIR/munged.seed" --num-threads=2 \
    </dev/null >>"$LOG/munged.stdout" 2>&1 ||
    die "munged failed to start" "${LOGFILE[munged]}"
  wait_for "$TIMEOUT" munged "${LOGFILE[munged]}" bash -c "munge -S '$MUNGE_SOCKET' -n </dev/null | unmunge -S '$MUNGE_SOCKET'"
}

db_sql() { mariadb --no-defaults -S "$DB_SOCKET" -uroot "$@"; }

start_mariadb() {
  if ! live_pid mariadbd >/dev/null; then
    if [[ ! -d $DB_DIR/mysql ]]; then
      log "initialising private MariaDB in $DB_DIR"
      rm -rf "$DB_DIR"; mkdir -p "$DB_DIR"
      mariadb-install-db --no-defaults --datadir="$DB_DIR" --user=root \
        --skip-test-db >"$LOG/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed" "$LOG/mariadb-install.log"
    fi
    port_in_use "$DB_PORT" && die "port $DB_PORT (MariaDB) already in use; set RCOT_SLURM_DB_PORT"
    rm -f "$DB_SOCKET"
    setsid mariadbd --no-defaults --user=root --datadir="$DB_DIR" \
      --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 \
      --pid-file="${PIDFILE[mariadbd]}" --log-error="${LOGFILE[mariadbd]}" \
      --skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=128M \
      --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >>"$LOG/mariadbd.stdout" 2>&1 &
    wait_for "$TIMEOUT" MariaDB "${LOGFILE[mariadbd]}" \
      mariadb-admin --no-defaults -S "$DB_SOCKET" -uroot ping
    wait_for 10 "MariaDB pid file" "${LOGFILE[mariadbd]}" live_pid mariadbd
  fi
  local pass; pass=$(cat "$ETC/dbpass")
  db_sql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
    >>"$LOG/mariadb-setup.log" 2>&1 || die "MariaDB user setup failed" "$LOG/mariadb-setup.log"
}

start_slurmdbd() {
  if ! live_pid slurmdbd >/dev/null; then
    port_in_use "$DBD_PORT" && die "port $DBD_PORT (slurmdbd) already in use; set RCOT_SLURM_PORT"
    SLURM_CONF="$CONF" slurmdbd </dev/null >>"$LOG/slurmdbd.stdout" 2>&1 ||
      die "slurmdbd failed to start" "${LOGFILE[slurmdbd]}"
  fi
  # first start creates the schema, which takes a few seconds
  wait_for "$TIMEOUT" slurmdbd "${LOGFILE[slurmdbd]}" with_conf sacctmgr -n -P show cluster
  if [[ -z $(with_conf sacctmgr -n -P show cluster format=cluster where cluster="$CLUSTER" 2>/dev/null) ]]; then
    with_conf sacctmgr -i add cluster "$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 ||
      die "sacctmgr add cluster $CLUSTER failed" "$LOG/sacctmgr.log"
  fi
  # `add cluster` creates account root with user root; make it explicit anyway
  if [[ -z $(with_conf sacctmgr -n -P show assoc format=account where cluster="$CLUSTER" user=root 2>/dev/null) ]]; then
    with_conf sacctmgr -i add user root account=root cluster="$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 ||
      die "sacctmgr add user root failed" "$LOG/sacctmgr.log"
  fi
}

start_slurmctld() {
  live_pid slurmctld >/dev/null && return 0
  port_in_use "$CTLD_PORT" && die "port $CTLD_PORT (slurmctld) already in use; set RCOT_SLURM_PORT"
  SLURM_CONF="$CONF" slurmctld </dev/null >>"$LOG/slurmctld.stdout" 2>&1 ||
    die "slurmctld failed to start" "${LOGFILE[slurmctld]}"
}

start_slurmd() {  # start_slurmd DAEMON NODENAME PORT
  live_pid "$1" >/dev/null && return 0
  port_in_use "$3" && die "port $3 ($1) already in use; set RCOT_SLURM_PORT"
  mkdir -p "$STATE/slurmd/$2"
  SLURM_CONF="$CONF" slurmd -N "$2" </dev/null >>"$LOG/$1.stdout" 2>&1 || die "$1 failed to start" "${LOGFILE[$1]}"
}

node_state() { with_conf sinfo -h -N -n "${1:-$NODE}" -o %T 2>/dev/null | head -n1; }
node_ready() {
  local n
  for n in "$NODE" "$NODE2"; do [[ $(node_state "$n") =~ ^(idle|mixed|allocated|completing)$ ]] || return 1; done
}
ctld_registered() {  # slurmctld has connected to slurmdbd
  [[ -n $(with_conf sacctmgr -n -P show cluster format=controlhost where cluster="$CLUSTER" 2>/dev/null) ]]
}

# The one-slurmd pid file an older copy of this script reads (another checkout on the same machine): it then
# sees the cluster up instead of failing to start a second slurmd on a port in use.
link_old_pidfile() { ln -sfn "slurmd-$NODE.pid" "$RUN/slurmd.pid"; }

all_running() {
  local d
  for d in "${DAEMONS[@]}"; do live_pid "$d" >/dev/null || return 1; done
}

cmd_start() {
  need_root
  if all_running && node_ready; then
    link_old_pidfile
    log "already running (state: $STATE)"
    return 0
  fi
  local t0=$SECONDS
  # unix socket paths are limited to 107 bytes; slurm.conf cannot quote spaces
  ((${#MUNGE_SOCKET} < 100)) || die "state path too long for a unix socket: $STATE"
  [[ $STATE != *[[:space:]]* ]] || die "state path must not contain spaces: $STATE"
  install_packages
  if [[ -f $CONF ]] && ! grep -qxF "$LAYOUT" "$CONF" && { live_pid slurmctld || live_pid slurmdbd; } >/dev/null; then
    log "running with the config of an older local_cluster.sh: restarting with this one's"
    cmd_stop
  fi
  mkdir -p "$ETC" "$RUN" "$LOG" "$MUNGE_DIR" "$STATE/slurmctld" "$STATE/slurmd"
  chmod 755 "$STATE" "$ETC" "$RUN" "$LOG" "$MUNGE_DIR"
  if ! live_pid slurmctld >/dev/null && ! live_pid slurmd >/dev/null && ! live_pid slurmd2 >/dev/null &&
     ! live_pid slurmdbd >/dev/null; then
    write_configs   # fresh view of hostname/CPUs/memory while nothing uses them
  fi
  install_system_conf
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd slurmd "$NODE" "$SLURMD_PORT"
  start_slurmd slurmd2 "$NODE2" "$SLURMD2_PORT"
  link_old_pidfile
  wait_for "$TIMEOUT" "slurmctld" "${LOGFILE[slurmctld]}" with_conf scontrol ping
  wait_for "$TIMEOUT" "nodes $NODE and $NODE2 idle (state: \$(sinfo))" "${LOGFILE[slurmd]}" node_ready
  wait_for "$TIMEOUT" "slurmctld registration with slurmdbd" "${LOGFILE[slurmctld]}" ctld_registered
  all_running || die "a daemon exited during start; see logs in $LOG"
  log "up in $((SECONDS - t0))s: cluster=$CLUSTER nodes=$NODE,$NODE2 partitions=debug,multi state=$STATE conf=$CONF (also $SYSTEM_CONF)"
}

stop_daemon() {
  local name=$1 pid i
  if pid=$(live_pid "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      log "$name ($pid) ignored SIGTERM for 10s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name ($pid)"
  fi
  rm -f "${PIDFILE[$name]}"
}

cmd_stop() {
  need_root
  if live_pid slurmctld >/dev/null; then
    # cancel our jobs so no slurmstepd / job processes outlive the cluster
    local jobs=()
    mapfile -t jobs < <(with_conf squeue -h -o %i 2>/dev/null)
    if ((${#jobs[@]})); then
      with_conf scancel --full --quiet "${jobs[@]}" 2>/dev/null || true
      local end=$((SECONDS + 15))
      while [[ -n $(with_conf squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < end)); do sleep 0.5; done
    fi
  fi
  local i
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[$i]}"; done
  PIDFILE[slurmd_old]="$RUN/slurmd.pid"; COMM[slurmd_old]=slurmd; stop_daemon slurmd_old  # an older script's
  log "stopped (state kept in $STATE)"
}

cmd_status() {
  local d pid up=0
  echo "state: $STATE"
  for d in "${DAEMONS[@]}"; do
    if pid=$(live_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: down"; up=1; fi
  done
  if ((up == 0)); then
    local n st
    for n in "$NODE" "$NODE2"; do st=$(node_state "$n"); echo "node $n: ${st:-unknown}"; done
    node_ready || up=1
  fi
  if ((up == 0)); then echo "cluster: up"; else echo "cluster: down"; fi
  return $up
}

cmd_env() {
  echo "export SLURM_CONF=$CONF"
  echo "export RCOT_SLURM_STATE=$STATE"
}

cmd_purge() {
  cmd_stop
  rm -rf "$STATE"
  if [[ -e $SYSTEM_CONF ]] && grep -qxF "$MARKER" "$SYSTEM_CONF"; then rm -f "$SYSTEM_CONF"; fi
  log "removed $STATE"
}

# Sourced (tests/test_local_cluster.py calls single functions): define, do not run.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

case "${1:-}" in
  start) close_inherited_fds; cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  purge) cmd_purge ;;
  *) echo "usage: $0 start|stop|status|env|purge" >&2; exit 2 ;;
esac
