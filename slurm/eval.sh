#!/bin/bash
# Exact distributed evaluation of the fine-tuned model: every test example scored once across all
# ranks; rank 0 writes eval_results.json to the output directory.
#
#   sbatch slurm/eval.sh [dapt evaluate flags...]                 # e.g. --data_files /shared/imdb/test.parquet
#   DAPT_MODEL=runs/imdb/finetune DAPT_OUTPUT_DIR=runs/imdb/eval sbatch slurm/eval.sh
#
# Variables: DAPT_MODEL (the fine-tune run or model folder, default runs/finetune), DAPT_CONFIG (default
# imdb-bert-base: a recipe file or a packaged name), DAPT_OUTPUT_DIR (default runs/eval), and the
# helper's (slurm/launch.sh).
# Evaluation keeps no checkpoint: a preempted or requeued evaluation simply runs again. The ranks leave
# together, after rank 0 has written the results, the model card and the W&B run (srun --wait cannot cut
# it short; DAPT_SRUN_WAIT in slurm/launch.sh).
#SBATCH --job-name=dapt-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail
# Slurm runs a copy of this file: load the helper from the slurm/ folder the job was submitted from.
_self=$(scontrol show job "${SLURM_JOB_ID:?submit with sbatch}" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
source "${DAPT_ROOT:-$(dirname "${_self:-$PWD/slurm/-}")/..}/slurm/launch.sh" \
    || { echo "dapt-slurm: error: slurm/launch.sh not found; set DAPT_ROOT to the folder holding slurm/" >&2; exit 2; }

DAPT_CONFIG=${DAPT_CONFIG-imdb-bert-base}
[[ -z ${DAPT_DS_CONFIG:-} ]] || dapt_log "DAPT_DS_CONFIG is not used by evaluation (precision: --precision)"
dapt_init
dapt_launch -m dapt evaluate ${DAPT_CONFIG:+--config "$DAPT_CONFIG"} \
    --model_name_or_path "${DAPT_MODEL:-runs/finetune}" --output_dir "${DAPT_OUTPUT_DIR:-runs/eval}" "$@"
