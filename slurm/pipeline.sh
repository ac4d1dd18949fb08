#!/bin/bash
# Submit the whole chain as three dependent jobs: MLM -> fine-tune (afterok) -> eval (afterok).
# Each job starts only when the previous one finished successfully (a requeued MLM job keeps its
# dependents waiting); a failed one cancels the rest. Prints the three job ids.
#
#   slurm/pipeline.sh [sbatch options for all three jobs...]
#   DAPT_OUTPUT_DIR=runs/imdb slurm/pipeline.sh --partition=gpu --account=proj42
#   DAPT_GPUS_PER_NODE=0 slurm/pipeline.sh --ntasks-per-node=2 --cpus-per-task=4    # CPU-only cluster
#
# Variables: DAPT_OUTPUT_DIR (default runs/pipeline; the stages write <dir>/mlm, <dir>/finetune and
# <dir>/eval/eval_results.json), DAPT_GPUS_PER_NODE (N: --gres=gpu:N --ntasks-per-node=N; 0: CPU
# mode, --gres=none; unset: the scripts' #SBATCH defaults), DAPT_MLM_ARGS, DAPT_FINETUNE_ARGS,
# DAPT_EVAL_ARGS (extra flags of each stage, split on spaces), DAPT_MODEL (the MLM start model),
# DAPT_CONFIG, DAPT_DS_CONFIG and the helper's (slurm/launch.sh); the jobs inherit this environment.
# Logs go to logs/ under the current directory (created here; Slurm does not create it).
set -euo pipefail
# The helpers of slurm/launch.sh (dapt_die, _dapt_file); sourcing it needs no job. DAPT_ROOT: the folder
# holding slurm/ (a checkout), when this script is a copy outside it; the jobs run its stage scripts.
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "${DAPT_ROOT:-$_here/..}/slurm/launch.sh" 2>/dev/null \
    || { echo "dapt-slurm: error: slurm/launch.sh not found; set DAPT_ROOT to the folder holding slurm/" >&2; exit 2; }
export DAPT_ROOT  # launch.sh set it to its checkout; the jobs load the same one

command -v sbatch >/dev/null || dapt_die "sbatch not found: run this on a Slurm login node"
out=${DAPT_OUTPUT_DIR:-runs/pipeline}
[[ $out == /* ]] || out=$PWD/$out  # the jobs run in this directory too; absolute for clarity in the logs
_dapt_file DAPT_CONFIG recipe  # a file here or in the checkout, or a packaged name (absolute for the jobs)
_dapt_file DAPT_DS_CONFIG ds

dapt_sbatch_opts "$@"
opts=("${DAPT_OPTS[@]}")
read -r -a mlm_args <<<"${DAPT_MLM_ARGS:-}"
read -r -a ft_args <<<"${DAPT_FINETUNE_ARGS:-}"
read -r -a eval_args <<<"${DAPT_EVAL_ARGS:-}"
mkdir -p logs

submit() {  # prints the job id
    local id
    id=$(sbatch --parsable "$@") || dapt_die "sbatch failed: sbatch $*"
    echo "${id%%;*}"  # --parsable prints "id[;cluster]"
}
stages=$DAPT_ROOT/slurm
mlm=$(DAPT_OUTPUT_DIR=$out/mlm submit "${opts[@]}" "$stages/mlm.sh" "${mlm_args[@]}")
ft=$(DAPT_OUTPUT_DIR=$out/finetune DAPT_MODEL=$out/mlm submit --dependency=afterok:$mlm --kill-on-invalid-dep=yes \
     "${opts[@]}" "$stages/finetune.sh" "${ft_args[@]}")
ev=$(DAPT_OUTPUT_DIR=$out/eval DAPT_MODEL=$out/finetune submit --dependency=afterok:$ft --kill-on-invalid-dep=yes \
     "${opts[@]}" "$stages/eval.sh" "${eval_args[@]}")
echo "mlm=$mlm finetune=$ft eval=$ev"
echo "results: $out/eval/eval_results.json   logs: $PWD/logs/   watch: squeue -j $mlm,$ft,$ev" >&2
