#!/bin/bash
# Stage 2: fine-tune the MLM model for sentiment classification, one task per GPU.
#
#   sbatch slurm/finetune.sh [launch/finetune.py flags...]
#   DAPT_MODEL=runs/imdb/mlm DAPT_OUTPUT_DIR=runs/imdb/finetune sbatch slurm/finetune.sh
#
# Variables: DAPT_MODEL (the MLM run or model folder, default runs/mlm), DAPT_CONFIG (default
# recipes/imdb-bert-base.yaml), DAPT_DS_CONFIG, DAPT_OUTPUT_DIR (default runs/finetune), and the
# helper's (slurm/launch.sh). Preemption as in slurm/mlm.sh.
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
# Slurm runs a copy of this file: load the helper from the checkout the job was submitted from.
_self=$(scontrol show job "${SLURM_JOB_ID:?submit with sbatch}" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
source "${DAPT_ROOT:-$(dirname "${_self:-$PWD/slurm/-}")/..}/slurm/launch.sh" \
    || { echo "dapt-slurm: error: slurm/launch.sh not found; set DAPT_ROOT to the dapt checkout" >&2; exit 2; }

DAPT_CONFIG=${DAPT_CONFIG-$DAPT_ROOT/recipes/imdb-bert-base.yaml}
dapt_init
dapt_launch "$DAPT_ROOT/launch/finetune.py" \
    ${DAPT_CONFIG:+--config "$DAPT_CONFIG"} ${DAPT_DS_CONFIG:+--ds_config "$DAPT_DS_CONFIG"} \
    --model_name_or_path "${DAPT_MODEL:-runs/mlm}" --output_dir "${DAPT_OUTPUT_DIR:-runs/finetune}" "$@"
