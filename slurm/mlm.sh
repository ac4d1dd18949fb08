#!/bin/bash
# Stage 1: MLM (domain-adaptive pretraining), one task per GPU on every allocated node.
#
#   sbatch slurm/mlm.sh [dapt mlm flags...]                       # e.g. --data_files /shared/imdb/unsup.parquet
#   DAPT_OUTPUT_DIR=runs/imdb/mlm sbatch --nodes=4 slurm/mlm.sh    # 4 nodes x 8 GPUs
#   sbatch --gres=none --ntasks-per-node=2 --cpus-per-task=4 slurm/mlm.sh   # CPU-only cluster
#   sbatch --gres=none --cpus-per-task=1 slurm/mlm.sh             # CPU, this script's 8 tasks (as CI runs it)
#
# The recipe's effective batch is kept on any number of ranks: with 8 ranks the reference recipe's micro
# batch 16 becomes 8 (8 x 8 = 64, no accumulation), and rank 0 says so ("dapt: micro_batch_size 16 -> 8").
# Variables: DAPT_CONFIG (recipe: a file or a packaged name, default imdb-bert-base), DAPT_DS_CONFIG
# (DeepSpeed JSON: a file or a packaged name such as zero2_bf16, default the recipe's), DAPT_OUTPUT_DIR
# (default runs/mlm), DAPT_MODEL (start model, default the recipe's), and the helper's (slurm/launch.sh:
# DAPT_ROOT, DAPT_ENV_SETUP, DAPT_VENV, DAPT_PYTHON, DAPT_SRUN_ARGS, DAPT_SRUN_WAIT, DAPT_REQUEUE). Relative
# paths are relative to the directory sbatch was called from. Preemption: the
# batch shell gets SIGUSR1 300 s before the time limit (or SIGTERM), the tasks save a checkpoint and
# exit 75, the job requeues itself and the next run resumes from the checkpoint.
#SBATCH --job-name=dapt-mlm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail
# Slurm runs a copy of this file: load the helper from the slurm/ folder the job was submitted from.
_self=$(scontrol show job "${SLURM_JOB_ID:?submit with sbatch}" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
source "${DAPT_ROOT:-$(dirname "${_self:-$PWD/slurm/-}")/..}/slurm/launch.sh" \
    || { echo "dapt-slurm: error: slurm/launch.sh not found; set DAPT_ROOT to the folder holding slurm/" >&2; exit 2; }

DAPT_CONFIG=${DAPT_CONFIG-imdb-bert-base}
dapt_init
dapt_launch -m dapt mlm \
    ${DAPT_CONFIG:+--config "$DAPT_CONFIG"} ${DAPT_DS_CONFIG:+--ds_config "$DAPT_DS_CONFIG"} \
    ${DAPT_MODEL:+--model_name_or_path "$DAPT_MODEL"} --output_dir "${DAPT_OUTPUT_DIR:-runs/mlm}" "$@"
