#!/bin/bash
# Write a DeepSpeed hostfile ("host slots=N" per node) for the current Slurm allocation, and the DeepSpeed
# environment file that carries the job's settings to the ranks on the other nodes: the `deepspeed`
# launcher as the alternative to srun (it starts the ranks itself over pdsh/ssh, or mpirun with
# `--launcher openmpi`, so it needs pdsh and passwordless ssh between the nodes). Run it inside the job,
# then start the launcher once, on the first node:
#
#   #SBATCH --nodes=2 --ntasks-per-node=1 --gres=gpu:8 --cpus-per-task=64
#   hostfile=$(slurm/hostfile.sh)                 # or: slurm/hostfile.sh path/to/hostfile
#   DS_ENV_FILE=$hostfile.env deepspeed --hostfile "$hostfile" \
#             --master_addr "$(head -n1 "$hostfile" | cut -d' ' -f1)" --master_port 29500 \
#             --module dapt mlm --config ... --output_dir ...
#
# Slots per node: DAPT_GPUS_PER_NODE, else the GPUs Slurm allocated per node, else the tasks per node.
# Prints the hostfile's path on stdout; what it wrote and how to use it go to stderr.
#
# The environment file. The launcher gives the ranks on other nodes only some variable families of its own
# environment (NCCL, PYTHON*, UCX, MV2, MLFLOW and the accelerator's): HF_HOME, HF_HUB_OFFLINE, WANDB_MODE,
# DAPT_DIST_TIMEOUT_MINUTES, OMP_NUM_THREADS, ... never arrive unless a DeepSpeed env file lists them
# (KEY=VALUE lines, read on the first node by the launcher: ~/.deepspeed_env and ./.deepspeed_env, or, with
# DS_ENV_FILE=PATH, that file instead). hostfile.sh writes one (mode 600) at DAPT_DS_ENV_FILE (default
# <hostfile>.env; "none": no file) with these exported variables:
#   HF_*, HUGGINGFACE_*, TRANSFORMERS_*, WANDB_*, DAPT_* (not the scripts' own: DAPT_ENV_SETUP, DAPT_*_ARGS,
#   DAPT_SEEDS, ...), TOKENIZERS_PARALLELISM, OMP_NUM_THREADS (default: the node's CPUs / slots, as srun's
#   per-task value), TORCH_EXTENSIONS_DIR and TRITON_CACHE_DIR (default: node-local, one directory per job
#   run, as slurm/launch.sh sets them), PATH, VIRTUAL_ENV, LD_LIBRARY_PATH, CUDA_HOME, and the names in
#   DAPT_DS_ENV_VARS (space-separated: NAME, or PREFIX* for a family).
# Left out, each named on stderr:
#   - names that look like secrets (*_TOKEN, *_KEY, *SECRET*, *PASSWORD*): the launcher puts every variable
#     on its command line (`mpirun -x K=V`, pdsh's remote `export K=V`), visible to `ps` on every node; log
#     in on the shared home instead (`huggingface-cli login`, `wandb login`), or name them in DAPT_DS_ENV_VARS;
#   - values with spaces or shell characters: DeepSpeed wraps them in double quotes, which pdsh's shell
#     removes but `mpirun -x` keeps as part of the value. Only [A-Za-z0-9_@%+=:,./-] arrives intact everywhere.
# Your own files are kept: a ~/.deepspeed_env or ./.deepspeed_env (or the files your DS_ENV_FILE names) is
# never modified; since DeepSpeed stops reading them once DS_ENV_FILE points elsewhere, their lines are
# copied into the new file first, and their values win over the job's. An existing DAPT_DS_ENV_FILE that
# hostfile.sh did not write is not overwritten (error, exit 2).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
out=${1:-${TMPDIR:-/tmp}/dapt-hostfile-${SLURM_JOB_ID:?not inside a Slurm job}}
slots=${DAPT_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
[[ $slots =~ ^[1-9][0-9]*$ ]] || dapt_die "slots per node = '$slots': set DAPT_GPUS_PER_NODE to a number"
note() { echo "dapt-slurm: $*" >&2; }
MARK=DAPT_DS_ENV_WRITTEN_BY=slurm/hostfile.sh  # the first line of a file written here
ours() { [[ -f $1 ]] && [[ $(head -n1 "$1") == "$MARK" ]]; }

env_file=${DAPT_DS_ENV_FILE:-$out.env}
[[ $env_file == none || $env_file == /* ]] || env_file=$PWD/$env_file
if [[ $env_file != none && -e $env_file ]] && ! ours "$env_file"; then
    dapt_die "DAPT_DS_ENV_FILE=$env_file exists and was not written by slurm/hostfile.sh: not overwriting" \
             "it (name another file, or move yours)"
fi

dapt_hosts | sed "s/$/ slots=$slots/" > "$out"  # names, as pdsh/ssh use them

if [[ $env_file != none ]]; then
    # the defaults the srun path sets per task (slurm/launch.sh)
    dapt_node_local_caches
    if [[ -z ${OMP_NUM_THREADS:-} && -n ${SLURM_CPUS_ON_NODE:-} ]]; then
        export OMP_NUM_THREADS=$(( SLURM_CPUS_ON_NODE / slots > 0 ? SLURM_CPUS_ON_NODE / slots : 1 ))
    fi
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

    # the user's files DeepSpeed would read without DS_ENV_FILE pointing here (never one of ours)
    lines=() theirs=() from=()
    for dir in "${HOME:-}" "$PWD"; do
        [[ -n $dir ]] || continue
        f=${DS_ENV_FILE:-.deepspeed_env}
        [[ $f == /* ]] || f=$dir/$f
        [[ -f $f && $f != "$env_file" ]] && ! ours "$f" || continue
        [[ " ${from[*]} " != *" $f "* ]] || continue
        from+=("$f")
        while IFS= read -r line || [[ -n $line ]]; do
            if [[ $line != *=* ]]; then
                note "warning: $f: skipped a line without '=' (DeepSpeed's parser fails on it): '$line'"
                continue
            fi
            key=${line%%=*}; key=${key//[[:space:]]/}
            lines+=("$line") theirs+=("$key")
        done < "$f"
    done

    read -r -a extra <<<"${DAPT_DS_ENV_VARS:-}"
    wanted() {  # NAME: 0 = carry it; 1 = not; 2 = a family's member (unless it looks like a secret)
        local name=$1 e
        for e in "${extra[@]}"; do
            [[ $name == "$e" || ( $e == *'*' && $name == "${e%\*}"* ) ]] && return 0
        done
        case $name in
            OMP_NUM_THREADS|TOKENIZERS_PARALLELISM|TORCH_EXTENSIONS_DIR|TRITON_CACHE_DIR|PATH|VIRTUAL_ENV \
            |LD_LIBRARY_PATH|CUDA_HOME) return 0 ;;
            DAPT_ENV_SETUP|DAPT_SRUN_ARGS|DAPT_MLM_ARGS|DAPT_FINETUNE_ARGS|DAPT_EVAL_ARGS|DAPT_SEEDS \
            |DAPT_LEARNING_RATES|DAPT_SWEEP_*|DAPT_DS_ENV_*|DAPT_OPTS|DAPT_PID|DAPT_RC|DAPT_STOPPED)
                return 1 ;;  # the scripts' own (shell words), not read by the ranks
            HF_*|HUGGINGFACE_*|HUGGING_FACE_*|TRANSFORMERS_*|WANDB_*|DAPT_*) return 2 ;;
        esac
        return 1
    }
    secret_name() {  # HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY, ..._SECRET, ..._PASSWORD
        local n=${1^^}
        [[ $n == *_TOKEN || $n == *_TOKEN_* || $n == *_KEY || $n == *_KEY_* || $n == *SECRET* \
           || $n == *PASSWORD* || $n == *PASSWD* ]]
    }
    written=() secret=() unsafe=() kept=()
    while IFS= read -r name; do
        rc=0; wanted "$name" || rc=$?
        (( rc != 1 )) || continue
        if [[ " ${theirs[*]} " == *" $name "* ]]; then kept+=("$name"); continue; fi
        if (( rc == 2 )) && secret_name "$name"; then secret+=("$name"); continue; fi
        value=${!name}
        if ! [[ $value =~ ^[A-Za-z0-9_@%+=:,./-]*$ ]]; then unsafe+=("$name"); continue; fi
        lines+=("$name=$value") written+=("$name")
    done < <(compgen -e | LC_ALL=C sort)

    tmp=$(mktemp "$env_file.XXXXXX")  # mode 600; renamed into place whole
    printf '%s\n' "$MARK" "${lines[@]}" > "$tmp"
    mv -f "$tmp" "$env_file"
    note "hostfile $out: $(wc -l < "$out") node(s) x $slots slot(s)"
    note "DeepSpeed env file $env_file: ${#written[@]} variable(s) of this job for the ranks on every node" \
         "(${written[*]})"
    (( ${#from[@]} == 0 )) || note "  with your ${from[*]} copied in first (yours win: ${kept[*]:-no overlap})"
    (( ${#secret[@]} == 0 )) || note "  left out (secrets would show on the launcher's command line):" \
                                     "${secret[*]}; name them in DAPT_DS_ENV_VARS to send them anyway"
    (( ${#unsafe[@]} == 0 )) || note "  left out (spaces or shell characters do not survive every launcher):" \
                                     "${unsafe[*]}"
    note "start the launcher with it: DS_ENV_FILE=$env_file deepspeed --hostfile $out ..."
    if [[ $(wc -l < "$out") == 1 ]]; then
        note "  (one node: deepspeed runs the ranks locally with its own environment and reads the file only" \
             "with --force_multi)"
    fi
fi
echo "$out"
