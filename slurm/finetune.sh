#!/bin/bash
# Stage 2: fine-tune the MLM model for sentiment classification, one task per GPU.
#
#   sbatch slurm/finetune.sh [dapt finetune flags...]
#   DAPT_MODEL=runs/imdb/mlm DAPT_OUTPUT_DIR=runs/imdb/finetune sbatch slurm/finetune.sh
#
# Variables: DAPT_MODEL (the MLM run or model folder, default runs/mlm), DAPT_CONFIG (default
# imdb-bert-base: a recipe file or a packaged name), DAPT_DS_CONFIG, DAPT_OUTPUT_DIR (default
# runs/finetune), and the helper's (slurm/launch.sh). Preemption as in slurm/mlm.sh.
#SBATCH --job-name=dapt-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
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
dapt_launch -m dapt finetune \
    ${DAPT_CONFIG:+--config "$DAPT_CONFIG"} ${DAPT_DS_CONFIG:+--ds_config "$DAPT_DS_CONFIG"} \
    --model_name_or_path "${DAPT_MODEL:-runs/mlm}" --output_dir "${DAPT_OUTPUT_DIR:-runs/finetune}" "$@"
