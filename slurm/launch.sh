# Shared launch helper for slurm/*.sh (sourced, not submitted). Sourcing it only defines things and
# sets strict mode, so scripts outside a job (pipeline.sh on a login node, hostfile.sh) use its helpers
# too. Three layers:
#   helpers      dapt_die, dapt_log, _dapt_file, dapt_hosts: usable anywhere
#   dapt_env     the environment: DAPT_ENV_SETUP, the virtualenv, DAPT_PYTHON (inside a job or not)
#   dapt_init / dapt_launch   inside a job: checks, thread/NCCL defaults, one srun task per GPU (or CPU
#                slot) running "$DAPT_PYTHON" directly, stop signals forwarded to the tasks, and a
#                requeue when training exits 75 ("checkpoint saved, requeue me"); dapt_run + dapt_finish
#                are its two halves, for a job that runs several stages in a row (slurm/sweep.sh)
# Ranks, MASTER_ADDR and MASTER_PORT are NOT computed here: every task derives them from its SLURM_*
# variables in dapt/distributed.py (the same code serves a bare `srun python -m dapt ...`), and rank 0
# logs them ("dapt: launcher srun: N ranks ..., master ADDR:PORT").
#
# Which dapt: the tasks run `"$DAPT_PYTHON" -m dapt <stage>`. In a checkout (DAPT_ROOT holds dapt/), its
# dapt goes first on PYTHONPATH; otherwise the one installed for DAPT_PYTHON (pip install dapt-*.whl):
# then slurm/ is all you need of the checkout (copy it anywhere). Recipes and DeepSpeed configs are files
# or the names of the configs packaged with dapt (DAPT_CONFIG=imdb-bert-base, DAPT_DS_CONFIG=zero2_bf16).
#
# Environment variables (all optional; the stage scripts add DAPT_CONFIG, DAPT_DS_CONFIG, DAPT_OUTPUT_DIR,
# DAPT_MODEL, see README "Running on Slurm"):
#   DAPT_ROOT        the folder holding slurm/ (a dapt checkout, or a copy of slurm/ beside an installed dapt),
#                    when the scripts are submitted from a copy outside it
#   DAPT_ENV_SETUP   shell code run first, e.g. "module load cuda/12.4; source ~/envs/dapt/bin/activate"
#   DAPT_VENV        virtualenv to activate (default: $DAPT_ROOT/.venv when it exists; "none" to skip)
#   DAPT_PYTHON      interpreter (default: python3 after the two steps above)
#   DAPT_SRUN_ARGS   extra srun flags, e.g. "--mpi=pmix" or "--gpu-bind=none"
#   DAPT_SRUN_WAIT   seconds srun lets the other tasks run on once the first one has exited (srun --wait;
#                    default 60; 0: no limit). The ranks end together (every job waits for rank 0's
#                    results, model card and W&B run in a barrier), so this bounds only the aftermath of a
#                    rank that crashed while the others wait in a collective.
#   DAPT_REQUEUE     1 (default): on exit 75 run `scontrol requeue $SLURM_JOB_ID`; 0: just exit 75
#   DAPT_MASTER_ADDR rendezvous address, read by the tasks (default: the step's first node, or its NodeAddr)
#   DAPT_MASTER_PORT rendezvous port 1-65535, read by the tasks (default: derived from the job and step ids)
# RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and other launchers' rank
# variables) exported by the submitting shell are cleared: sbatch passes its environment on, and stale
# values would override what each task derives.
#
# Per task, set only when unset (a value of yours is kept):
#   OMP_NUM_THREADS        the task's CPUs (SLURM_CPUS_PER_TASK; 1 without it): ranks do not fight for cores
#   TOKENIZERS_PARALLELISM false (tokenizer threads would fight torch for the same cores)
#   TORCH_EXTENSIONS_DIR   node-local ${TMPDIR:-/tmp}/dapt-$USER-<job id>.<restart count>/torch_extensions, and
#   TRITON_CACHE_DIR       .../triton beside it: DeepSpeed JIT-builds its ops into TORCH_EXTENSIONS_DIR (default
#                          ~/.cache/torch_extensions) and Triton caches kernels in ~/.triton; on a shared home
#                          every rank of every node waits on one build lock there, and a build killed by a
#                          preemption leaves a stale lock that hangs every later run (DeepSpeed #6540, #6912,
#                          #5205). Node-local and one directory per job run: the ranks of a node share one
#                          build and no run inherits another's lock. dapt's default optimizer needs no build;
#                          ops built into the install (DS_BUILD_OPS=1) need none either. To reuse JIT builds
#                          across jobs, set TORCH_EXTENSIONS_DIR yourself (a node-local path is safest).
#
# GPUs: one task per GPU. Each task uses GPU LOCAL_RANK % (the GPUs it sees) (dapt/distributed.py): with
# `--gres=gpu:N --ntasks-per-node=N` (the scripts' default) every task sees all N GPUs, so task i takes GPU i
# and NCCL sees its peers directly (P2P/NVLink); with per-task binding (a job with `--gpus-per-task=1` in
# place of the scripts' `--gres=gpu:N` line, DAPT_SRUN_ARGS="--gpu-bind=single:1", or a site default) each
# task sees one GPU and takes it. Either way the node must have as many GPUs as tasks (checked: more GPUs
# than tasks would leave some idle, fewer would put two ranks on one GPU), and `--gpus-per-task` must be 1.
#
# NCCL (GPUs; nothing here is needed on CPU, where the backend is gloo). Defaults set only when unset:
#   NCCL_DEBUG=WARN                       INFO to debug a hang
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1     a failed rank aborts the others instead of hanging until timeout
# and left to the cluster (set them in DAPT_ENV_SETUP or before sbatch, sbatch exports the environment):
#   NCCL_SOCKET_IFNAME  interface for bootstrap/sockets (e.g. ib0, ^lo,docker)  NCCL_IB_HCA / NCCL_IB_DISABLE
#   NCCL_NET_GDR_LEVEL, NCCL_CROSS_NIC    InfiniBand/GPUDirect tuning from your site's documentation

set -euo pipefail

DAPT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXIT_REQUEUE=75  # dapt/errors.py: a stop signal saved a checkpoint

# --- helpers (anywhere) -----------------------------------------------------------------------------

dapt_die() { echo "dapt-slurm: error: $*" >&2; exit 2; }
dapt_log() { echo "dapt-slurm: $*"; }

# dapt_hosts: the job's host names, one a line
dapt_hosts() { scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}"; }

# dapt_sbatch_opts ARGS...: DAPT_OPTS = the given sbatch options, preceded by DAPT_GPUS_PER_NODE's
# (N: --gres=gpu:N --ntasks-per-node=N; 0: CPU mode, --gres=none; unset: the scripts' #SBATCH defaults)
dapt_sbatch_opts() {
    DAPT_OPTS=("$@")
    case ${DAPT_GPUS_PER_NODE-unset} in
        unset) ;;
        0) DAPT_OPTS=(--gres=none "$@") ;;
        *[!0-9]*|'') dapt_die "DAPT_GPUS_PER_NODE=$DAPT_GPUS_PER_NODE: expected a number of GPUs (0 = CPU only)" ;;
        *) DAPT_OPTS=(--gres=gpu:$DAPT_GPUS_PER_NODE --ntasks-per-node=$DAPT_GPUS_PER_NODE "$@") ;;
    esac
}

# _dapt_file NAME KIND: a set variable must name a file, here or in the checkout (then made absolute), or a
# config packaged with dapt (KIND ds or recipe: DAPT_DS_CONFIG=zero2_bf16, DAPT_CONFIG=imdb-bert-base), then
# made the absolute path of that file. Names are resolved by DAPT_PYTHON's dapt; where it has none (a login
# node before the environment set-up) they are left for the job, whose dapt_env checks them.
_dapt_file() {
    local value=${!1:-} py=${DAPT_PYTHON:-python3} path
    [[ -z $value || -f $value ]] && return
    if [[ $value != /* && -f $DAPT_ROOT/$value ]]; then printf -v "$1" '%s' "$DAPT_ROOT/$value"; return; fi
    [[ $value != /* ]] || dapt_die "$1=$value: no such file"
    _dapt_pythonpath
    "$py" -c 'import dapt.configs' 2>/dev/null || return 0
    path=$("$py" -m dapt.configs "$2" "$value" 2>&1) || dapt_die "$1=$value: ${path##*$'\n'}"
    printf -v "$1" '%s' "$path"
}

# _dapt_pythonpath: a checkout's dapt first on PYTHONPATH (the jobs import the code of the scripts they run)
_dapt_pythonpath() {
    if [[ -f $DAPT_ROOT/dapt/__init__.py && :${PYTHONPATH:-}: != *:$DAPT_ROOT:* ]]; then
        export PYTHONPATH=$DAPT_ROOT${PYTHONPATH:+:$PYTHONPATH}
    fi
}

# --- the environment (inside a job or not) -----------------------------------------------------------

# dapt_env: run DAPT_ENV_SETUP, activate the virtualenv, find DAPT_PYTHON and a dapt it imports (a
# checkout's or an installed one), check the config files or names, and clear launcher variables inherited
# from the submitting shell
dapt_env() {
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
    _dapt_pythonpath
    "$DAPT_PYTHON" -c 'import dapt' 2>/dev/null || dapt_die "DAPT_PYTHON=$DAPT_PYTHON cannot import dapt: install" \
        "it there (pip install dapt-*.whl, or pip install -e <checkout>), or set DAPT_VENV, DAPT_ENV_SETUP or DAPT_ROOT"
    _dapt_file DAPT_CONFIG recipe
    _dapt_file DAPT_DS_CONFIG ds
    # dapt/distributed.py takes RANK (and MASTER_*) as "a launcher set these": never from the login shell
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE MASTER_ADDR MASTER_PORT \
          OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_LOCAL_RANK OMPI_COMM_WORLD_LOCAL_SIZE \
          PMI_RANK PMI_SIZE PMIX_RANK
}

# dapt_node_local_caches: TORCH_EXTENSIONS_DIR and TRITON_CACHE_DIR on node-local disk, one directory per
# job run, unless set (see the header); the same path on every node (each node creates its own)
dapt_node_local_caches() {
    local base
    base=${TMPDIR:-/tmp}/dapt-${USER:-$(id -un)}-${SLURM_JOB_ID:-$$}.${SLURM_RESTART_COUNT:-0}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$base/torch_extensions}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$base/triton}
}

# --- inside a job --------------------------------------------------------------------------------------

# dapt_init: checks and environment; call once at the top of a stage script
dapt_init() {
    [[ -n ${SLURM_JOB_ID:-} ]] || dapt_die "not inside a Slurm job: submit with sbatch (or run inside salloc)"
    case ${DAPT_REQUEUE:=1} in 0|1) ;; *) dapt_die "DAPT_REQUEUE=$DAPT_REQUEUE: expected 0 or 1" ;; esac
    dapt_env
    [[ ${DAPT_SRUN_WAIT:=60} =~ ^[0-9]+$ ]] \
        || dapt_die "DAPT_SRUN_WAIT=$DAPT_SRUN_WAIT: expected seconds (srun --wait; 0 = no limit)"
    DAPT_SRUN_WAIT=$((10#$DAPT_SRUN_WAIT))
    local tasks_per_node gpus per_task
    # One task per GPU; each uses GPU LOCAL_RANK % (the GPUs it sees): all of the node's (--gres=gpu:N) or,
    # with per-task binding (--gpus-per-task=1, --gpu-bind=single:1), its own one. See the header.
    gpus=${SLURM_GPUS_ON_NODE:-0}
    # this node's tasks: --ntasks-per-node, else the first entry of SLURM_TASKS_PER_NODE ("8(x2)", "8,4")
    tasks_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}
    tasks_per_node=${tasks_per_node%%[(,]*}
    per_task=${SLURM_GPUS_PER_TASK:-}
    per_task=${per_task##*:}  # "a100:1" -> 1
    if [[ -n $per_task && $per_task != 1 ]]; then
        dapt_die "--gpus-per-task=${SLURM_GPUS_PER_TASK}: each rank uses one GPU; use --gpus-per-task=1" \
                 "(or --gres=gpu:N --ntasks-per-node=N)"
    fi
    if [[ $gpus != 0 && -n $tasks_per_node && $gpus != "$tasks_per_node" ]]; then
        dapt_die "$gpus GPUs per node but $tasks_per_node tasks per node: run one task per GPU" \
                 "(sbatch --ntasks-per-node=$gpus, or --gpus-per-task=1 --ntasks-per-node=<GPUs per node>)"
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    dapt_node_local_caches
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    dapt_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) run $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on ${SLURM_JOB_NODELIST}:" \
             "${SLURM_NTASKS:-1} tasks, ${gpus} GPUs/node, ${SLURM_CPUS_PER_TASK:-1} CPUs/task," \
             "python $(command -v "$DAPT_PYTHON")"
    dapt_log "JIT build caches: TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR TRITON_CACHE_DIR=$TRITON_CACHE_DIR"
}

_DAPT_PID=
_DAPT_STOPPED=  # SIGUSR1/SIGTERM once a stop signal reached the batch shell during dapt_run
_dapt_forward() {  # a stop signal reached the batch shell: the tasks checkpoint and exit 75
    _DAPT_STOPPED=SIG$1
    if [[ -n $_DAPT_PID ]] && kill -0 "$_DAPT_PID" 2>/dev/null; then
        dapt_log "got SIG$1: forwarding SIGUSR1 to the tasks (they save a checkpoint and exit $EXIT_REQUEUE)"
        kill -USR1 "$_DAPT_PID" 2>/dev/null || true  # srun passes it on to every task on every node
    fi
}

# dapt_launch ARGS...: run `python ARGS` (`-m dapt mlm ...`) as one srun task per GPU/slot and handle
# preemption (requeue on exit 75); ends the job with the tasks' exit code
dapt_launch() {
    dapt_run "$@"
    dapt_finish "$DAPT_RC"
}

# dapt_run ARGS...: the same srun, stop signals forwarded, but it returns, with the tasks' exit
# code in DAPT_RC (not as its status: under `set -e` a failed stage must not end the script unseen)
dapt_run() {
    local cmd
    # Not --kill-on-bad-exit: when the ranks exit 75 together, one still shutting down would get SIGTERM
    # (Python restores the default handler at exit) and the job would end 143 instead of "requeue me".
    # --wait bounds instead how long the others may run on once a rank has ended (a crash: the ranks of a
    # run that ends normally leave together, after rank 0's last write). DAPT_SRUN_WAIT, default 60.
    # --cpus-per-task again: since Slurm 22.05, srun no longer takes it from the job.
    cmd=(srun --kill-on-bad-exit=0 --wait="${DAPT_SRUN_WAIT:-60}" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
    if [[ -n ${DAPT_SRUN_ARGS:-} ]]; then
        local extra; read -r -a extra <<<"$DAPT_SRUN_ARGS"; cmd+=("${extra[@]}")
    fi
    # python itself is the task (no shell around it), so srun's signals reach it; each task finds its
    # rank, world and rendezvous in its SLURM_* variables (dapt/distributed.py)
    cmd+=("$DAPT_PYTHON" "$@")
    dapt_log "running: $(printf '%q ' "${cmd[@]}")"
    trap '_dapt_forward USR1' USR1
    trap '_dapt_forward TERM' TERM
    "${cmd[@]}" &
    _DAPT_PID=$!
    set +e
    while kill -0 "$_DAPT_PID" 2>/dev/null; do wait "$_DAPT_PID"; done  # a trapped signal interrupts wait
    wait "$_DAPT_PID"; DAPT_RC=$?
    set -e
    _DAPT_PID=
    trap - USR1 TERM
}

# dapt_finish RC: end the job as dapt_launch does: 75 -> `scontrol requeue` (or exit 75 with DAPT_REQUEUE=0)
dapt_finish() {
    local rc=$1
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
