#!/usr/bin/env bash
# A real single-node Slurm on this machine, for tests/test_slurm.py (Debian 12, as root).
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing, writes a
# slurm.conf for this host (CPUs and memory from `slurmd -C`, one GPU generic resource, no
# accounting database, a job completion log), starts munged, slurmctld and slurmd (nothing
# starts them by itself here: no systemd) and waits until the node is idle.
# Idempotent: a second run with the daemons up and the same configuration changes nothing.
#
#   .ci/slurm-up.sh            # bring it up (or check it is up)
#   .ci/slurm-up.sh --down     # stop the daemons this script started
#
# Environment: SLURM_UP_PARTITION (default "ci"), SLURM_UP_TIMEOUT seconds (default 90).
set -euo pipefail

PARTITION=${SLURM_UP_PARTITION:-ci}
TIMEOUT=${SLURM_UP_TIMEOUT:-90}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
JOBCOMP_LOG=$LOG_DIR/jobcomp.log
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

say() { echo "slurm-up: $*"; }
die() { echo "slurm-up: error: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"

alive() {  # alive PIDFILE NAME: the process of the pid file runs and is NAME
    local pid stat
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/stat ]] || return 1
    [[ $(</proc/"$pid"/comm) == "$2"* ]] || return 1
    # An exited daemon whose parent does not reap it (no init here) lingers as a zombie.
    stat=$(</proc/"$pid"/stat) || return 1
    [[ ${stat##*) } != Z* ]]
}

stop() {  # stop PIDFILE NAME: end the daemon of the pid file, and wait for it
    local pid i
    alive "$1" "$2" || return 0
    pid=$(<"$1")
    kill "$pid"
    for i in $(seq 50); do alive "$1" "$2" || return 0; sleep 0.2; done
    die "$2 (pid $pid) did not stop"
}

if [[ ${1:-} == --down ]]; then
    stop "$SLURMD_PID" slurmd
    stop "$CTLD_PID" slurmctld
    stop "$MUNGE_PID" munged
    say "stopped"
    exit 0
fi

# --- packages --------------------------------------------------------------------------------
packages=(slurmctld slurmd slurm-client munge)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' scripts must not start the daemons with Debian's default config: this
    # script starts them once slurm.conf is written.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}"; }
    # Package lists may be absent on a fresh image; fetch them only when needed.
    apt_install >/tmp/slurm-up-apt.log 2>&1 \
        || { apt-get update -q >>/tmp/slurm-up-apt.log 2>&1 && apt_install >>/tmp/slurm-up-apt.log 2>&1; } \
        || { tail -20 /tmp/slurm-up-apt.log >&2; die "apt-get install failed (log: /tmp/slurm-up-apt.log)"; }
fi

# --- munge -----------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating a munge key"
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! alive "$MUNGE_PID" munged; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not work (see /var/log/munge/munged.log)"

# --- configuration ---------------------------------------------------------------------------
NODE=$(hostname -s)
# "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=N"
HW=$(slurmd -C | head -1)
[[ $HW == NodeName=* ]] || die "unexpected 'slurmd -C' output: $HW"
HW=${HW#NodeName=* }
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
# Without a default, a job that names no memory is given the whole node's.
DEF_MEM_PER_CPU=$((MEM / CPUS < 1024 ? MEM / CPUS : 1024))

install -d -m 0755 "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd

new_conf=$(cat <<EOF
# Written by .ci/slurm-up.sh: a single-node test cluster on $NODE; edits are overwritten.
ClusterName=qlora-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container or a small VM: track processes by their parent ids.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$DEF_MEM_PER_CPU
# No accounting database (sacct has nothing to query): Snakemake's Slurm executor must use
# squeue for job status, which sees a finished job for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
# Every finished job, with its allocated TRES (cpu, mem, gres/gpu), one line each.
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_LOG
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 $HW Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
# slurmd 22.05 drops a GPU declared without a device file; /dev/null stands in for one.
new_gres="NodeName=$NODE Name=gpu File=/dev/null"

changed=0
if [[ ! -f $CONF_DIR/slurm.conf ]] || [[ $(<"$CONF_DIR/slurm.conf") != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" >"$CONF_DIR/slurm.conf"
    changed=1
fi
if [[ ! -f $CONF_DIR/gres.conf ]] || [[ $(<"$CONF_DIR/gres.conf") != "$new_gres" ]]; then
    printf '%s\n' "$new_gres" >"$CONF_DIR/gres.conf"
    changed=1
fi
if ((changed)); then
    say "wrote $CONF_DIR/slurm.conf and gres.conf ($NODE: $HW, Gres=gpu:1)"
    stop "$SLURMD_PID" slurmd
    stop "$CTLD_PID" slurmctld
fi

# --- daemons ---------------------------------------------------------------------------------
if ! alive "$CTLD_PID" slurmctld; then
    say "starting slurmctld"
    slurmctld
fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping >/dev/null 2>&1 || {
    tail -n 5 "$LOG_DIR/slurmctld.log" >&2 || true
    die "slurmctld is not answering (log: $LOG_DIR/slurmctld.log)"
}
if ! alive "$SLURMD_PID" slurmd; then
    say "starting slurmd"
    slurmd
fi

deadline=$((SECONDS + TIMEOUT))
state=""
while ((SECONDS < deadline)); do
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    case $state in
        idle | mix | alloc) break ;;
        # A node the controller marked down or drained earlier (e.g. before a reconfiguration)
        down | drain | drng) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
case $state in
    idle | mix | alloc) ;;
    *)
        tail -n 5 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
        die "node $NODE is '${state:-unknown}' after ${TIMEOUT}s, not idle" ;;
esac
say "up: $(sinfo -h -o '%P %D %t %c cpus %m MB %G')"
