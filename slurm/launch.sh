# Shared launch helper for slurm/*.sh (sourced, not submitted). Everything the stage scripts have in
# common lives here: strict mode, finding the checkout, activating the environment, the rendezvous
# (MASTER_ADDR/MASTER_PORT), one srun task per GPU (or CPU slot) with RANK/WORLD_SIZE/LOCAL_RANK, stop
# signals forwarded to the tasks, and a requeue when training exits 75 ("checkpoint saved, requeue me").
#
# Environment variables (all optional; the stage scripts add DAPT_CONFIG, DAPT_DS_CONFIG, DAPT_OUTPUT_DIR,
# DAPT_MODEL, see README "Running on Slurm"):
#   DAPT_ROOT        the dapt checkout, when the scripts are submitted from a copy outside it
#   DAPT_ENV_SETUP   shell code run first, e.g. "module load cuda/12.4; source ~/envs/dapt/bin/activate"
#   DAPT_VENV        virtualenv to activate (default: $DAPT_ROOT/.venv when it exists; "none" to skip)
#   DAPT_PYTHON      interpreter (default: python3 after the two steps above)
#   DAPT_SRUN_ARGS   extra srun flags, e.g. "--mpi=pmix" or "--gpu-bind=none"
#   DAPT_REQUEUE     1 (default): on exit 75 run `scontrol requeue $SLURM_JOB_ID`; 0: just exit 75
#   DAPT_MASTER_ADDR rendezvous address (default: the first node, or its NodeAddr if its name does not resolve)
#   DAPT_MASTER_PORT rendezvous port (default: 20000 + job id mod 20000, the same on every node)
#
# NCCL (GPUs; nothing here is needed on CPU, where the backend is gloo). Defaults set only when unset:
#   NCCL_DEBUG=WARN                       INFO to debug a hang
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1     a failed rank aborts the others instead of hanging until timeout
# and left to the cluster (set them in DAPT_ENV_SETUP or before sbatch, sbatch exports the environment):
#   NCCL_SOCKET_IFNAME  interface for bootstrap/sockets (e.g. ib0, ^lo,docker)  NCCL_IB_HCA / NCCL_IB_DISABLE
#   NCCL_NET_GDR_LEVEL, NCCL_CROSS_NIC    InfiniBand/GPUDirect tuning from your site's documentation

set -euo pipefail

DAPT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXIT_REQUEUE=75  # dapt/checkpoint.py: a stop signal saved a checkpoint

dapt_die() { echo "dapt-slurm: error: $*" >&2; exit 2; }
dapt_log() { echo "dapt-slurm: $*"; }

# dapt_hosts: the job's host names, one a line (the first is the rendezvous host)
dapt_hosts() { scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}"; }

# dapt_addr HOST: HOST if it resolves, else the NodeAddr Slurm has for it (nodes that are only names to
# Slurm, e.g. several slurmd on one machine; real clusters resolve their node names)
dapt_addr() {
    local host=$1 addr
    if getent hosts "$host" >/dev/null 2>&1; then echo "$host"; return; fi
    addr=$(scontrol show node "$host" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    [[ -n $addr ]] || dapt_die "node $host does not resolve and Slurm has no NodeAddr for it; set MASTER_ADDR"
    echo "$addr"
}

_dapt_file() {  # NAME: a set variable must name a file, here or in the checkout (recipes/..., ds_configs/...)
    local value=${!1:-}
    [[ -z $value || -f $value ]] && return
    [[ $value != /* && -f $DAPT_ROOT/$value ]] || dapt_die "$1=$value: no such file"
    printf -v "$1" '%s' "$DAPT_ROOT/$value"
}

# dapt_init: environment and rendezvous; call once at the top of a stage script
dapt_init() {
    [[ -n ${SLURM_JOB_ID:-} ]] || dapt_die "not inside a Slurm job: submit with sbatch (or run inside salloc)"
    [[ -f $DAPT_ROOT/launch/mlm.py ]] || dapt_die "DAPT_ROOT=$DAPT_ROOT is not a dapt checkout"
    case ${DAPT_REQUEUE:=1} in 0|1) ;; *) dapt_die "DAPT_REQUEUE=$DAPT_REQUEUE: expected 0 or 1" ;; esac
    _dapt_file DAPT_CONFIG
    _dapt_file DAPT_DS_CONFIG
    if [[ -n ${DAPT_ENV_SETUP:-} ]]; then
        eval "$DAPT_ENV_SETUP" || dapt_die "DAPT_ENV_SETUP failed: $DAPT_ENV_SETUP"
    fi
    local venv=${DAPT_VENV:-$DAPT_ROOT/.venv}
    if [[ $venv != none && ( -n ${DAPT_VENV:-} || -d $venv ) ]]; then
        [[ -f $venv/bin/activate ]] || dapt_die "DAPT_VENV=$venv: not a virtualenv (no bin/activate)"
        set +u; source "$venv/bin/activate"; set -u
    fi
    DAPT_PYTHON=${DAPT_PYTHON:-python3}
    command -v "$DAPT_PYTHON" >/dev/null || dapt_die "DAPT_PYTHON=$DAPT_PYTHON: not found"

    local first addr tasks_per_node gpus
    # Computed here, never taken from the submitting shell (sbatch exports its environment).
    first=$(dapt_hosts | head -n1) || dapt_die "cannot list the job's hosts (scontrol show hostnames)"
    addr=${DAPT_MASTER_ADDR:-$(dapt_addr "$first")}
    export MASTER_ADDR=$addr
    export MASTER_PORT=${DAPT_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    [[ $MASTER_PORT =~ ^[0-9]+$ ]] || dapt_die "DAPT_MASTER_PORT=$MASTER_PORT: not a port number"
    # One task per GPU: each task picks its GPU by LOCAL_RANK (all GPUs stay visible, so NCCL sees P2P).
    gpus=${SLURM_GPUS_ON_NODE:-0}
    tasks_per_node=${SLURM_NTASKS_PER_NODE:-}
    if [[ $gpus != 0 && -n $tasks_per_node && $gpus != "$tasks_per_node" ]]; then
        dapt_die "$gpus GPUs per node but $tasks_per_node tasks per node: run one task per GPU (sbatch --ntasks-per-node=$gpus)"
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    dapt_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) run $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on ${SLURM_JOB_NODELIST}:" \
             "${SLURM_NTASKS:-1} tasks, ${gpus} GPUs/node, ${SLURM_CPUS_PER_TASK:-1} CPUs/task," \
             "master ${MASTER_ADDR}:${MASTER_PORT}, python $(command -v "$DAPT_PYTHON")"
}

_DAPT_PID=
_dapt_forward() {  # a stop signal reached the batch shell: the tasks checkpoint and exit 75
    if [[ -n $_DAPT_PID ]] && kill -0 "$_DAPT_PID" 2>/dev/null; then
        dapt_log "got SIG$1: forwarding SIGUSR1 to the tasks (they save a checkpoint and exit $EXIT_REQUEUE)"
        kill -USR1 "$_DAPT_PID" 2>/dev/null || true  # srun passes it on to every task on every node
    fi
}

# dapt_launch SCRIPT [ARGS...]: run `python SCRIPT ARGS` as one srun task per GPU/slot and handle preemption
dapt_launch() {
    local cmd rc
    # Not --kill-on-bad-exit: when the ranks exit 75 together, one still shutting down would get SIGTERM
    # (Python restores the default handler at exit) and the job would end 143 instead of "requeue me".
    # --wait bounds instead how long the others may run on once a rank has ended (crash or end).
    # --cpus-per-task again: since Slurm 22.05, srun no longer takes it from the job.
    cmd=(srun --kill-on-bad-exit=0 --wait=60 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
    if [[ -n ${DAPT_SRUN_ARGS:-} ]]; then
        local extra; read -r -a extra <<<"$DAPT_SRUN_ARGS"; cmd+=("${extra[@]}")
    fi
    # exec: the signal reaches python itself, not a shell around it
    local task_env='export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID'
    task_env+=' LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-$SLURM_NTASKS}; exec "$@"'
    cmd+=(bash -c "$task_env" dapt-task "$DAPT_PYTHON" "$@")
    dapt_log "running: $(printf '%q ' "${cmd[@]}")"
    trap '_dapt_forward USR1' USR1
    trap '_dapt_forward TERM' TERM
    "${cmd[@]}" &
    _DAPT_PID=$!
    set +e
    while kill -0 "$_DAPT_PID" 2>/dev/null; do wait "$_DAPT_PID"; done  # a trapped signal interrupts wait
    wait "$_DAPT_PID"; rc=$?
    set -e
    _DAPT_PID=
    trap - USR1 TERM
    if [[ $rc == "$EXIT_REQUEUE" ]]; then
        if [[ $DAPT_REQUEUE == 1 ]]; then
            dapt_log "exit $rc: checkpoint saved; requeueing job $SLURM_JOB_ID (the next run resumes from it)"
            if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
            # refused: already requeued (scontrol requeue, preemption), cancelled, or not requeueable
            dapt_log "scontrol requeue refused: exit $rc (resubmit the same job to resume)"
            exit "$rc"
        fi
        dapt_log "exit $rc: checkpoint saved; DAPT_REQUEUE=0, so resubmit the same job to resume"
    elif [[ $rc != 0 ]]; then
        dapt_log "failed with exit code $rc"
    else
        dapt_log "finished"
    fi
    exit "$rc"
}
