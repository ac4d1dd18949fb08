#!/usr/bin/env bash
# A real Slurm cluster (munge + slurmctld + slurmd) and OpenMPI on this machine, for CI and the
# `slurm`/`mpi` tests. Debian packages; root; no systemd needed.
#
#   .ci/cluster.sh install   apt-get install Slurm, munge, OpenMPI (idempotent; ~30 s on a fresh machine)
#   .ci/cluster.sh up        one node (this host), partition "debug"; waits until idle
#   .ci/cluster.sh up2       two "nodes" n1, n2 on this host (multiple slurmd), partition "debug"
#   .ci/cluster.sh down      stops the daemons this script started (by the pids in their pid files)
#   .ci/cluster.sh status    exit 0 when the cluster answers and every node is idle
#
# Every wait is bounded. State lives under $DAPT_CLUSTER_DIR (default /var/tmp/dapt-cluster), the
# config in /etc/slurm/slurm.conf (where the Slurm clients look for it).
#
# The one node declares DAPT_CLUSTER_CPUS CPUs (default: 8, or this host's count when larger), more
# than a small CI machine has (SlurmdParameters=config_overrides makes slurmd accept the configured
# count): the scripts' own layout, 8 tasks per node as on an 8-GPU node, then fits with
# `--cpus-per-task=1` (8 ranks share the real cores; the tests set the threads per rank to 1).
set -euo pipefail

DIR=${DAPT_CLUSTER_DIR:-/var/tmp/dapt-cluster}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
die() { echo "cluster.sh: error: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
wait_for() {
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${limit}s waiting for $what"
        sleep 0.2
    done
}

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (installs packages, starts daemons)"; }

installed() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged && command -v mpirun; } >/dev/null 2>&1

cmd_install() {
    installed && { log "Slurm, munge and OpenMPI already installed"; return; }
    need_root
    command -v apt-get >/dev/null || die "apt-get not found: install Slurm, munge and OpenMPI by hand"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    # OpenMPI (with libpmix2) before slurmd ever starts: a slurmd started without PMIx makes
    # `srun --mpi=pmix` hang.
    timeout 900 apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev >/dev/null
    installed || die "packages installed but a command is still missing"
    log "installed: $(slurmctld -V), $(mpirun --version 2>/dev/null | head -n1)"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 20 munged sh -c 'munge -n | unmunge'
    mkdir -p "$DIR/run" && touch "$DIR/run/munged.ours"  # `down` stops only a munged started here
}

write_conf() {  # $1 = 1 or 2 nodes
    local nodes=$1 cpus mem declared
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys both: the machine's cores here
    declared=${DAPT_CLUSTER_CPUS:-8}
    [[ $declared =~ ^[1-9][0-9]*$ ]] || die "DAPT_CLUSTER_CPUS=$declared: expected a number of CPUs"
    (( declared >= cpus )) || declared=$cpus
    # slurmd -C reports RealMemory in MB; leave ~1 GB for the system
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
    mem=$(( ${mem:-4000} > 2000 ? ${mem:-4000} - 1000 : ${mem:-4000} ))
    mkdir -p /etc/slurm "$DIR"/{state,log,run}
    if [[ -s $CONF ]] && ! head -n1 "$CONF" | grep -q '^# written by dapt .ci/cluster.sh'; then
        die "$CONF exists and was not written by this script: not touching a real cluster's configuration"
    fi
    {
        echo "# written by dapt .ci/cluster.sh ($nodes node(s))"
        echo "ClusterName=dapt"
        echo "SlurmctldHost=$HOST(127.0.0.1)"
        echo "SlurmUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # credentials expire after 10 s instead of 120: a requeued job reruns ~10 s after it ends
        echo "AuthInfo=cred_expire=10"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "MpiDefault=none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "ReturnToService=2"
        echo "MinJobAge=300"
        # test pending jobs every second (default 60 s): a requeued job starts as soon as it may
        echo "SchedulerParameters=sched_interval=1,bf_interval=1"
        echo "KillWait=30"
        echo "SlurmctldPort=16817"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
        echo "SlurmdSpoolDir=$DIR/%n/spool"
        echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
        echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
        echo "TmpFS=$DIR/%n/tmp"
        if [[ $nodes == 1 ]]; then
            echo "SlurmdPort=16818"
            # the configured CPUs, not the hardware's: room for 8 one-CPU tasks on a 2-core machine
            echo "SlurmdParameters=config_overrides"
            echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$declared RealMemory=$mem State=UNKNOWN"
        else
            # several slurmd on one host (Debian builds Slurm with MULTIPLE_SLURMD)
            echo "SlurmdParameters=config_overrides"
            local i
            for i in 1 2; do
                echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$cpus RealMemory=$((mem / 2)) State=UNKNOWN"
            done
        fi
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF"
}

node_names() { if [[ $1 == 1 ]]; then echo "$HOST"; else echo n1 n2; fi; }

all_idle() {
    local states
    states=$(timeout 10 sinfo -h -N -o %T 2>/dev/null) || return 1
    [[ -n $states ]] && ! grep -qv '^idle$' <<<"$states"
}

cmd_up() {  # $1 = number of nodes
    local nodes=$1 n
    need_root
    installed || die "Slurm is not installed: run '$0 install' first"
    cmd_down quiet
    start_munge
    write_conf "$nodes"
    for n in $(node_names "$nodes"); do mkdir -p "$DIR/$n/spool" "$DIR/$n/tmp"; done
    rm -rf "${DIR:?}"/state/*  # a fresh controller: no jobs left over, job ids restart at 1
    slurmctld -c
    wait_for 30 slurmctld timeout 5 scontrol ping
    if [[ $nodes == 1 ]]; then
        slurmd
    else
        for n in $(node_names "$nodes"); do slurmd -N "$n"; done
    fi
    wait_for 60 "all nodes idle" all_idle
    log "up: $nodes node(s): $(sinfo -h -N -o '%N %c CPUs %T' | tr '\n' ' ')"
}

kill_pidfile() {
    local f=$1 pid
    [[ -s $f ]] || return 0
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
        local end=$((SECONDS + 20))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$f"
}

cmd_down() {  # slurmd(s) and slurmctld by their pid files; munged too, unless restarting
    local f
    shopt -s nullglob
    for f in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid; do kill_pidfile "$f"; done
    [[ ${1:-} == quiet ]] && return
    if [[ -f $DIR/run/munged.ours ]]; then
        kill_pidfile /run/munge/munged.pid
        rm -f "$DIR/run/munged.ours"
    fi
    log "down"
}

case ${1:-} in
    install) cmd_install ;;
    up) cmd_up 1 ;;
    up2) cmd_up 2 ;;
    down) cmd_down ;;
    status) installed && all_idle ;;
    *) die "usage: $0 install|up|up2|down|status" ;;
esac
