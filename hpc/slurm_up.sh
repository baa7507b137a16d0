#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster (munged + MariaDB + slurmdbd +
# slurmctld + slurmd) on this Debian machine. No systemd needed.
#
# Idempotent: when everything already runs and the node is up, it returns at
# once and changes nothing; otherwise it starts only what is missing. It
# records the PID of every daemon it starts under $STATE_DIR so that
# hpc/slurm_down.sh stops exactly those (and nothing else).
#
# Logs: /var/log/bayesflip-slurm/. Stop with hpc/slurm_down.sh.
set -euo pipefail

CLUSTER=localcluster
PARTITION=debug
STATE_DIR=/var/run/bayesflip-slurm
LOG_DIR=/var/log/bayesflip-slurm
CONF_DIR=/etc/slurm
SLURM_CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
DB_SOCK=/run/mysqld/mysqld.sock
DEADLINE_S=60
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

log() { echo "[slurm-up] $*"; }

# die MESSAGE [LOGFILE...]: print message and the tail of each given log.
die() {
    local msg=$1; shift
    echo "[slurm-up] ERROR: $msg" >&2
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            echo "[slurm-up] ---- tail of $f ----" >&2
            tail -n 30 "$f" >&2 || true
        fi
    done
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root"

# ---------------------------------------------------------------- helpers
# pid_alive NAME: true if $STATE_DIR/NAME.pid names a live process that is
# still the one we started (same command name and start time).
pid_alive() {
    local name=$1 f=$STATE_DIR/$1.pid pid start comm
    [[ -f $f ]] || return 1
    read -r pid start < "$f" || return 1
    [[ -n ${pid:-} && -d /proc/$pid ]] || return 1
    live_by_pid "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]] || return 1
    [[ $(proc_start "$pid") == "${start:-}" ]] || return 1
}

# live_by_pid PID: PID exists and is not a zombie.
live_by_pid() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [[ ${st:0:1} != Z ]]
}

# proc_start PID: kernel start time of PID (field 22 of /proc/PID/stat).
proc_start() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }               # drop "pid (comm) "
    # shellcheck disable=SC2086
    set -- $stat
    echo "${20}"                    # field 22 overall = 20th after comm
}

# launch NAME LOGFILE CMD...: start CMD detached, record its PID.
# setsid/nohup/setpriv all exec, so $! is the daemon's own PID.
launch() {
    local name=$1 logf=$2; shift 2
    setsid nohup "$@" </dev/null >>"$logf" 2>&1 &
    local pid=$!
    local start="" i
    for ((i = 0; i < 100; i++)); do   # wait (<= 5 s) for the final exec
        live_by_pid "$pid" || die "$name exited immediately" "$logf"
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
            start=$(proc_start "$pid") && break
        fi
        sleep 0.05
    done
    [[ -n $start ]] || die "$name did not start" "$logf"
    echo "$pid $start" > "$STATE_DIR/$name.pid"
    log "started $name (pid $pid)"
}

# wait_for DESC LOGFILE CMD...: poll CMD until it succeeds or deadline.
wait_for() {
    local desc=$1 logf=$2; shift 2
    local end=$((SECONDS + DEADLINE_S))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${DEADLINE_S}s waiting for $desc" "$logf"
        sleep 0.2
    done
}

# live_by_name NAME: some non-zombie process named NAME exists (maybe not
# ours; e.g. started by hand). Zombies matter: init here reaps exited
# children only after a few seconds, and pgrep alone still lists them.
live_by_name() {
    local p st
    for p in $(pgrep -x "$1" 2>/dev/null); do
        st=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        st=${st##*) }
        [[ ${st:0:1} == Z ]] || return 0
    done
    return 1
}

# running NAME: the daemon we recorded is alive, or another instance is.
running() { pid_alive "$1" || live_by_name "$1"; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
db_ok() { mariadb-admin --socket="$DB_SOCK" -uroot ping >/dev/null 2>&1; }
dbd_ok() { sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n1; }
node_usable() {
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

# ------------------------------------------------------------- fast path
if command -v slurmd >/dev/null 2>&1 && [[ -f $SLURM_CONF ]] \
    && running munged && running mariadbd && running slurmdbd \
    && running slurmctld && running slurmd && node_usable; then
    log "cluster already up (node $(node_state)); nothing to do"
    exit 0
fi

# ------------------------------------------------------------- packages
missing=()
for p in "${PACKAGES[@]}"; do
    if [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) != installed ]]; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    log "installing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    mkdir -p "$LOG_DIR"
    apt-get update -qq >>"$LOG_DIR/apt.log" 2>&1 || die "apt-get update failed" "$LOG_DIR/apt.log"
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$LOG_DIR/apt.log" 2>&1 \
        || die "apt-get install failed" "$LOG_DIR/apt.log"
fi

# ------------------------------------------------------------- hostname
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
    log "adding '127.0.0.1 $HOST' to /etc/hosts"
    echo "127.0.0.1 $HOST" >> /etc/hosts
fi

# ------------------------------------------------------------- dirs, key
mkdir -p "$STATE_DIR" "$LOG_DIR" "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
install -d -o mysql -g mysql -m 0755 /run/mysqld
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

# ------------------------------------------------------------- configs
# Write a file only when its content changes; return 0 if it changed.
write_if_changed() {
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp "$dest.XXXXXX")
    cat > "$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$dest"
    return 0
}

NODE_LINE=$(slurmd -C 2>/dev/null | head -n1)
[[ $NODE_LINE == NodeName=* ]] || die "slurmd -C gave no node line: '$NODE_LINE'"
NODE_NAME=${NODE_LINE%% *}; NODE_NAME=${NODE_NAME#NodeName=}

slurm_conf_changed=0
if write_if_changed "$SLURM_CONF" 0644 <<EOF
# Written by bayesflip hpc/slurm_up.sh -- single-node local cluster.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=5
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
then
    slurm_conf_changed=1
    log "wrote $SLURM_CONF"
fi

# Reuse the DB password of an existing slurmdbd.conf so re-runs are stable.
DB_PASS=""
if [[ -f $DBD_CONF ]]; then
    DB_PASS=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" | head -n1)
fi
if [[ -z $DB_PASS ]]; then
    DB_PASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20)
fi
if write_if_changed "$DBD_CONF" 0600 <<EOF
# Written by bayesflip hpc/slurm_up.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
then
    log "wrote $DBD_CONF"
fi
chown root:root "$DBD_CONF"
chmod 0600 "$DBD_CONF"

# ------------------------------------------------------------- munged
if running munged; then
    munge_ok || die "munged runs but munge/unmunge fails" "$LOG_DIR/munged.log" /var/log/munge/munged.log
else
    launch munged "$LOG_DIR/munged.log" \
        setpriv --reuid=munge --regid=munge --clear-groups munged -F
    wait_for "munged" "$LOG_DIR/munged.log" munge_ok
fi

# ------------------------------------------------------------- mariadb
if ! running mariadbd; then
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        log "initialising MariaDB data dir"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql \
            >>"$LOG_DIR/mariadb.log" 2>&1 || die "mariadb-install-db failed" "$LOG_DIR/mariadb.log"
    fi
    launch mariadbd "$LOG_DIR/mariadb.log" \
        mariadbd --user=mysql --bind-address=127.0.0.1 --socket="$DB_SOCK" \
        --pid-file=/run/mysqld/mysqld.pid
fi
wait_for "MariaDB" "$LOG_DIR/mariadb.log" db_ok

if ! running slurmdbd; then
    # Idempotent: ensures user, password and grants match slurmdbd.conf.
    mariadb --socket="$DB_SOCK" -uroot <<SQL >>"$LOG_DIR/mariadb.log" 2>&1 || die "creating DB user failed" "$LOG_DIR/mariadb.log"
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
    launch slurmdbd "$LOG_DIR/slurmdbd.out" slurmdbd -D
fi
wait_for "slurmdbd" "$LOG_DIR/slurmdbd.log" dbd_ok

if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    log "registering cluster $CLUSTER in accounting"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed" "$LOG_DIR/slurmdbd.log"
fi

# ------------------------------------------------------------- slurmctld
if running slurmctld; then
    if ((slurm_conf_changed)); then
        log "slurm.conf changed; scontrol reconfigure"
        scontrol reconfigure || true
    fi
else
    launch slurmctld "$LOG_DIR/slurmctld.out" slurmctld -D
fi
wait_for "slurmctld" "$LOG_DIR/slurmctld.log" ctld_ok

# ------------------------------------------------------------- slurmd
if ! running slurmd; then
    launch slurmd "$LOG_DIR/slurmd.out" slurmd -D
fi

# ------------------------------------------------------------- node state
end=$((SECONDS + DEADLINE_S))
next_resume=0
while :; do
    state=$(node_state)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*)
            if ((SECONDS >= next_resume)); then
                log "node $NODE_NAME is '$state'; resuming"
                scontrol update nodename="$NODE_NAME" state=resume 2>/dev/null || true
                next_resume=$((SECONDS + 5))
            fi
            ;;
    esac
    if ((SECONDS >= end)); then
        die "node $NODE_NAME not up after ${DEADLINE_S}s (state '$state')" \
            "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmd.out" "$LOG_DIR/slurmctld.log"
    fi
    sleep 0.2
done
log "cluster up: node $NODE_NAME $state, partition $PARTITION"
