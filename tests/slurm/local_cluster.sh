#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the tests: slurmctld plus two slurmd
# (n1, n2) on 127.0.0.1 with their own ports, authenticated by munge. Needs root.
#   tests/slurm/local_cluster.sh install   # Debian's slurm-wlm + munge (apt)
#   tests/slurm/local_cluster.sh start     # write the config, start munged, slurmctld, 2 x slurmd
#   tests/slurm/local_cluster.sh stop
# Choices that matter on a container without systemd (see CPU_NOTES): proctrack/linuxproc and
# task/none (no cgroups), no accounting, and no cgroup.conf at all (CgroupPlugin=disabled makes slurmd exit).
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/lib/bigvit-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurm-wlm munge
}

write_config() {
  mkdir -p "$(dirname "$CONF")" "$STATE"/{ctld,n1,n2,log}
  cat >"$CONF" <<EOF
ClusterName=bigvit-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/%n/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
# Fast turnaround for tests: dead jobs leave quickly, signals escalate quickly.
MinJobAge=30
KillWait=20
InactiveLimit=0
SlurmdTimeout=60
NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start() {
  write_config
  mkdir -p /run/munge && chown munge:munge /run/munge
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  pgrep -x slurmctld >/dev/null || slurmctld -f "$CONF"
  for node in n1 n2; do
    pgrep -f "slurmd -N $node" >/dev/null || slurmd -f "$CONF" -N "$node"
  done
  for _ in $(seq 60); do
    if [ "$(sinfo -h -o '%T' 2>/dev/null | grep -c idle)" -ge 1 ] \
      && [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c idle)" -eq 2 ]; then
      sinfo -N
      return
    fi
    sleep 1
  done
  echo "slurm did not come up; logs in $STATE/log" >&2
  tail -n 20 "$STATE"/log/* >&2 || true
  exit 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
}

for action in "$@"; do
  case "$action" in
    install | start | stop) "$action" ;;
    *) echo "usage: $0 install|start|stop ..." >&2; exit 2 ;;
  esac
done
