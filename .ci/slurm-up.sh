#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster (Debian's slurm-wlm, munge, slurmdbd on MariaDB)
# for CI. Idempotent: installs what is missing, writes the configs, starts only the daemons
# that are not running, and records their pids in $STATE so that slurm-down.sh stops exactly
# those. Fake GPUs (character devices cloned from /dev/null) are declared as gres, so GPU
# requests are scheduled on a CPU machine. Run as root.
#   SLURM_CI_CPUS (default: nproc)  SLURM_CI_GPUS (default 2)  SLURM_CI_PARTITION (default debug)
set -euo pipefail
start=$SECONDS
STATE=/run/slurm-ci
CPUS=${SLURM_CI_CPUS:-$(nproc)}
GPUS=${SLURM_CI_GPUS:-2}
PARTITION=${SLURM_CI_PARTITION:-debug}
HOST=$(hostname -s)
DB_PASSWORD=slurm-ci-local-only

die() { echo "slurm-up: ERROR: $*" >&2; for f in /var/log/slurm/*.log; do [ -f "$f" ] && tail -5 "$f" >&2; done; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# --- packages ---------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  guard=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep postinst scripts from starting daemons
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; guard=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server >/dev/null
  [ "$guard" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# --- directories, name, fake GPUs -------------------------------------------------------------
mkdir -p "$STATE/gpu" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm /run/munge /run/mysqld
chown -R slurm:slurm /var/lib/slurm /var/log/slurm /run/slurm
chown munge:munge /run/munge; chown mysql:mysql /run/mysqld
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
for i in $(seq 0 $((GPUS - 1))); do
  [ -c "$STATE/gpu/gpu$i" ] || mknod -m 666 "$STATE/gpu/gpu$i" c 1 3
done

# --- configuration ----------------------------------------------------------------------------
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
gres_line=""; gres_node=""
if [ "$GPUS" -gt 0 ]; then
  gres_line="GresTypes=gpu"; gres_node="Gres=gpu:$GPUS"
  echo "NodeName=$HOST Name=gpu File=$STATE/gpu/gpu[0-$((GPUS - 1))]" > /etc/slurm/gres.conf.new
else
  : > /etc/slurm/gres.conf.new
fi
cat > /etc/slurm/slurm.conf.new <<EOF
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire + 1 s before they start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups on this machine
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=300
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
$gres_line
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb $gres_node State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat > /etc/slurm/slurmdbd.conf.new <<EOF
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
changed=""
for f in slurm.conf gres.conf slurmdbd.conf; do
  if ! cmp -s "/etc/slurm/$f.new" "/etc/slurm/$f"; then mv "/etc/slurm/$f.new" "/etc/slurm/$f"; changed="$changed $f"; else rm "/etc/slurm/$f.new"; fi
done
chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf

# --- daemons ----------------------------------------------------------------------------------
alive() {  # alive NAME PROGRAM: the recorded pid runs PROGRAM and is not a zombie
  local pid; pid=$(cat "$STATE/$1.pid" 2>/dev/null) || return 1
  [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ] || return 1
  grep -q "$2" "/proc/$pid/cmdline" 2>/dev/null
}
record() { cat "$2" > "$STATE/$1.pid"; }
wait_for() { local i; for i in $(seq 1 150); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
restart_if_changed() {  # a daemon whose config changed is stopped, to be started again below
  if alive "$1" "$1" && [[ "$changed" == *"$2"* ]]; then kill "$(cat "$STATE/$1.pid")"; wait_for "! alive $1 $1"; fi
}

if ! alive munged munged; then
  [ -f /etc/munge/munge.key ] || mungekey -c
  chown -R munge:munge /etc/munge; chmod 700 /etc/munge; chmod 600 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --force
  wait_for "[ -s /run/munge/munged.pid ]" || die "munged did not start"
  record munged /run/munge/munged.pid
fi

if ! alive mariadbd mariadbd; then
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
  setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --innodb-lock-wait-timeout=900 \
    >>/var/log/slurm/mariadbd.log 2>&1 < /dev/null &
  wait_for "mysqladmin ping" || die "mariadbd does not answer"
  record mariadbd /run/mysqld/mysqld.pid
fi
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

restart_if_changed slurmdbd slurmdbd.conf
if ! alive slurmdbd slurmdbd; then
  rm -f /run/slurm/slurmdbd.pid; /usr/sbin/slurmdbd
  wait_for "[ -s /run/slurm/slurmdbd.pid ]" || die "slurmdbd did not start"
  record slurmdbd /run/slurm/slurmdbd.pid
  wait_for "sacctmgr -n show cluster" || die "slurmdbd does not answer"
fi
sacctmgr -n show cluster | grep -q ci || sacctmgr -i add cluster ci >/dev/null

restart_if_changed slurmctld "slurm.conf gres.conf"
restart_if_changed slurmd "slurm.conf gres.conf"
if ! alive slurmctld slurmctld; then
  rm -f /run/slurm/slurmctld.pid; /usr/sbin/slurmctld
  wait_for "[ -s /run/slurm/slurmctld.pid ]" || die "slurmctld did not start"
  record slurmctld /run/slurm/slurmctld.pid
  wait_for "scontrol ping | grep -q UP" || die "slurmctld does not answer"
fi
if ! alive slurmd slurmd; then
  rm -f /run/slurm/slurmd.pid; /usr/sbin/slurmd
  wait_for "[ -s /run/slurm/slurmd.pid ]" || die "slurmd did not start"
  record slurmd /run/slurm/slurmd.pid
fi

# a node once marked down keeps that state: resume it
state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
case "$state" in idle|mixed|allocated) ;; *) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;; esac
wait_for "sinfo -h -n $HOST -o %T | grep -Eq 'idle|mixed|allocated'" || die "node $HOST is not idle: $(sinfo -h -n "$HOST" -o '%T %E')"
wait_for "sacct -n -X --starttime now-1minutes" || die "sacct does not answer"
echo "slurm up in $((SECONDS - start)) s (node $HOST: $CPUS CPUs, $GPUS fake GPUs, partition $PARTITION)"
