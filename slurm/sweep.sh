#!/bin/bash
# A fine-tuning sweep over seeds (x learning rates) as ONE Slurm job array, then one summary job.
#
#   DAPT_SEEDS="1 2 3" DAPT_LEARNING_RATES="2e-5 3e-5" DAPT_MODEL=runs/imdb/mlm slurm/sweep.sh [sbatch options...]
#   DAPT_SEEDS="1 2 3 4 5" DAPT_OUTPUT_DIR=runs/seeds slurm/sweep.sh --partition=gpu --account=proj42
#
# Run it on a login node (not with sbatch): it submits itself as the array (--array=0-(N-1)%K, N = seeds x
# learning rates, K = DAPT_SWEEP_CONCURRENCY) and a summary job (--dependency=afterok:<array>), and prints
# `array=ID summarize=ID`. Task i takes learning rate i / n_seeds and seed i % n_seeds (learning rates outer,
# as dapt pipeline --seeds --learning_rates), fine-tunes DAPT_MODEL with --seed S --learning_rate LR into
# $DAPT_OUTPUT_DIR/runs/lr<LR>-seed<S>/finetune (dapt/layout.py SweepLayout: the local sweep's names) and
# evaluates it into .../eval. A stop signal (USR1 300 s before the time limit, a preemption) makes the
# fine-tune save a checkpoint and exit 75, and the task requeues itself; its next run resumes there (a finished
# fine-tune is not redone; an evaluation that was stopped runs again). The summary job runs
# `python -m dapt summarize $DAPT_OUTPUT_DIR`: sweep_results.json, sweep.md, sweep.png.
#
# Variables: DAPT_SEEDS (required: integers >= 0), DAPT_LEARNING_RATES (default: the recipe's fine-tune
# learning rate), DAPT_SWEEP_CONCURRENCY (tasks running at once, default 4), DAPT_OUTPUT_DIR (default
# runs/sweep), DAPT_MODEL (the MLM run or model to fine-tune, default runs/mlm), DAPT_GPUS_PER_NODE (as
# slurm/pipeline.sh), DAPT_FINETUNE_ARGS, DAPT_EVAL_ARGS (extra flags, split on spaces; the sweep sets
# --seed, --learning_rate, --output_dir and --model_name_or_path itself), DAPT_WANDB_GROUP (default: one
# group per sweep), DAPT_CONFIG (default imdb-bert-base), DAPT_DS_CONFIG and the helper's
# (slurm/launch.sh). Logs: logs/dapt-sweep-<array id>_<task>.out and logs/dapt-sweep-summary-<id>.out.
#SBATCH --job-name=dapt-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail
# Submitting: the checkout is beside this file. In a job (a copy of this file) the submitter exported DAPT_ROOT.
if [[ -z ${DAPT_SWEEP_ROLE:-} ]]; then
    _here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    DAPT_ROOT=${DAPT_ROOT:-$_here/..}
fi
source "${DAPT_ROOT:?}/slurm/launch.sh" 2>/dev/null \
    || { echo "dapt-slurm: error: slurm/launch.sh not found; set DAPT_ROOT to the folder holding slurm/" >&2; exit 2; }
export DAPT_ROOT

DAPT_CONFIG=${DAPT_CONFIG-imdb-bert-base}
read -r -a ft_args <<<"${DAPT_FINETUNE_ARGS:-}"
read -r -a eval_args <<<"${DAPT_EVAL_ARGS:-}"
read -r -a seeds <<<"${DAPT_SEEDS:-}"
read -r -a rates <<<"${DAPT_LEARNING_RATES:-}"

dapt_py() {  # the jobs' python and dapt (dapt_env: a checkout's dapt first on PYTHONPATH)
    "$DAPT_PYTHON" "$@"
}

# --- the summary job -----------------------------------------------------------------------------------
if [[ ${DAPT_SWEEP_ROLE:-} == summarize ]]; then
    dapt_init
    dapt_log "summarizing the sweep in $DAPT_OUTPUT_DIR"
    exec "$DAPT_PYTHON" -m dapt summarize "$DAPT_OUTPUT_DIR"
fi

# --- one array task: fine-tune then evaluate combination SLURM_ARRAY_TASK_ID --------------------------
if [[ ${DAPT_SWEEP_ROLE:-} == task ]]; then
    dapt_init
    i=${SLURM_ARRAY_TASK_ID:?not an array task}
    seed=${seeds[i % ${#seeds[@]}]}
    lr=${rates[i / ${#seeds[@]}]:-}
    if [[ -z $lr ]]; then  # no DAPT_LEARNING_RATES: the recipe's (with DAPT_FINETUNE_ARGS), as the stage reads it
        lr=$(dapt_py -c 'import sys; from dapt.config import FinetuneConfig, parse_config
print(repr(parse_config(FinetuneConfig, "finetune", sys.argv[1:]).learning_rate))' \
             ${DAPT_CONFIG:+--config "$DAPT_CONFIG"} --output_dir - "${ft_args[@]}") \
            || dapt_die "could not read the learning rate of DAPT_CONFIG=$DAPT_CONFIG"
    fi
    # the run's directories, from dapt/layout.py (the local sweep's names): lines run=, finetune=, eval=
    paths=$(dapt_py -m dapt.layout "$DAPT_OUTPUT_DIR" "$lr" "$seed") \
        || dapt_die "no run directory for learning rate $lr, seed $seed"
    run=$(sed -n 's/^run=//p' <<<"$paths")
    finetune=$(sed -n 's/^finetune=//p' <<<"$paths")
    eval_dir=$(sed -n 's/^eval=//p' <<<"$paths")
    name=${run##*/}
    dapt_log "sweep task $i of array ${SLURM_ARRAY_JOB_ID:-?}: learning rate $lr, seed $seed -> $run"
    dapt_run -m dapt finetune \
        ${DAPT_CONFIG:+--config "$DAPT_CONFIG"} ${DAPT_DS_CONFIG:+--ds_config "$DAPT_DS_CONFIG"} \
        --model_name_or_path "$DAPT_MODEL" --output_dir "$finetune" --seed "$seed" --learning_rate "$lr" \
        --wandb_name "finetune-$name" "${ft_args[@]}"
    [[ $DAPT_RC == 0 ]] || dapt_finish "$DAPT_RC"  # 75: checkpoint saved, requeue; else the task failed
    # between the stages dapt_run's traps are off: note a stop signal instead of dying of it
    trap '_DAPT_STOPPED=SIGUSR1' USR1
    trap '_DAPT_STOPPED=SIGTERM' TERM
    if [[ -n $_DAPT_STOPPED ]]; then
        dapt_log "got $_DAPT_STOPPED after the fine-tune: requeueing before the evaluation"
        dapt_finish "$EXIT_REQUEUE"
    fi
    dapt_run -m dapt evaluate ${DAPT_CONFIG:+--config "$DAPT_CONFIG"} \
        --model_name_or_path "$finetune" --output_dir "$eval_dir" --wandb_name "evaluate-$name" "${eval_args[@]}"
    if [[ $DAPT_RC != 0 && -n $_DAPT_STOPPED ]]; then
        # evaluation keeps no checkpoint: it was cut short by the stop signal, so the requeued task runs it again
        dapt_log "evaluation stopped by $_DAPT_STOPPED (exit $DAPT_RC): requeueing to run it again"
        DAPT_RC=$EXIT_REQUEUE
    fi
    dapt_finish "$DAPT_RC"
fi

# --- submitting (login node) ---------------------------------------------------------------------------
command -v sbatch >/dev/null || dapt_die "sbatch not found: run this on a Slurm login node"
(( ${#seeds[@]} )) || dapt_die "DAPT_SEEDS is empty: list the fine-tune seeds, e.g. DAPT_SEEDS=\"1 2 3\""
norm=()
for s in "${seeds[@]}"; do
    [[ $s =~ ^[0-9]+$ ]] && (( ${#s} <= 10 && 10#$s < 4294967296 )) \
        || dapt_die "DAPT_SEEDS=$DAPT_SEEDS: '$s' is not a seed (an integer in [0, 2^32))"
    s=$((10#$s))
    [[ " ${norm[*]} " != *" $s "* ]] || dapt_die "DAPT_SEEDS=$DAPT_SEEDS: seed $s is listed twice"
    norm+=("$s")
done
seeds=("${norm[@]}")
names=()
for lr in "${rates[@]}"; do
    [[ $lr =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
        || dapt_die "DAPT_LEARNING_RATES=$DAPT_LEARNING_RATES: '$lr' is not a number"
    name=$(LC_ALL=C printf '%g' "$lr")  # as dapt/layout.py run_name spells it
    [[ $name != 0 ]] || dapt_die "DAPT_LEARNING_RATES=$DAPT_LEARNING_RATES: learning rates must be > 0, got $lr"
    [[ " ${names[*]} " != *" $name "* ]] || dapt_die "DAPT_LEARNING_RATES=$DAPT_LEARNING_RATES: $lr is listed twice"
    names+=("$name")
done
for flag in "${ft_args[@]}"; do
    case ${flag%%=*} in --seed|--learning_rate|--output_dir|--model_name_or_path)
        dapt_die "DAPT_FINETUNE_ARGS sets ${flag%%=*}: the sweep sets it per task" \
                 "(DAPT_SEEDS, DAPT_LEARNING_RATES, DAPT_OUTPUT_DIR, DAPT_MODEL)" ;;
    esac
done
concurrency=${DAPT_SWEEP_CONCURRENCY:-4}
[[ $concurrency =~ ^[1-9][0-9]*$ ]] \
    || dapt_die "DAPT_SWEEP_CONCURRENCY=$concurrency: expected a number of tasks running at once (>= 1)"
out=${DAPT_OUTPUT_DIR:-runs/sweep}
[[ $out == /* ]] || out=$PWD/$out  # the jobs run in this directory too; absolute for clarity in the logs
model=${DAPT_MODEL:-runs/mlm}
[[ $model == /* || ! -e $model ]] || model=$PWD/$model
_dapt_file DAPT_CONFIG recipe  # a file here or in the checkout, or a packaged name (absolute for the jobs)
_dapt_file DAPT_DS_CONFIG ds

dapt_sbatch_opts "$@"
opts=("${DAPT_OPTS[@]}")
mkdir -p logs

n=$(( ${#seeds[@]} * (${#rates[@]} > 0 ? ${#rates[@]} : 1) ))
# what the jobs read (sbatch passes this environment on): the checked lists, one W&B group for the sweep
export DAPT_SEEDS="${seeds[*]}" DAPT_LEARNING_RATES="${rates[*]}" DAPT_OUTPUT_DIR=$out DAPT_MODEL=$model \
       DAPT_CONFIG DAPT_DS_CONFIG
export DAPT_WANDB_GROUP=${DAPT_WANDB_GROUP:-${out##*/}-$(date +%Y%m%d-%H%M%S)}
submit() {  # prints the job id
    local id
    id=$(sbatch --parsable "$@") || dapt_die "sbatch failed: sbatch $*"
    echo "${id%%;*}"  # --parsable prints "id[;cluster]"
}
self=$DAPT_ROOT/slurm/sweep.sh
array=$(DAPT_SWEEP_ROLE=task submit --array=0-$((n - 1))%$concurrency "${opts[@]}" "$self")
# The summary is one process without GPUs: these come after the options for the array, so they win.
summary=$(DAPT_SWEEP_ROLE=summarize submit --dependency=afterok:$array --kill-on-invalid-dep=yes "$@" \
          --job-name=dapt-sweep-summary --output=logs/%x-%j.out --gres=none --nodes=1 --ntasks=1 \
          --ntasks-per-node=1 --cpus-per-task=1 --time=00:30:00 --no-requeue "$self")
echo "array=$array summarize=$summary"
echo "$n runs (learning rates: ${DAPT_LEARNING_RATES:-from the recipe}; seeds: $DAPT_SEEDS) in $out/runs/," \
     "summary: $out/sweep.md   logs: $PWD/logs/   watch: squeue -j $array,$summary" >&2
