#!/bin/bash
# Prepare one stage's data once, on a CPU partition, into a directory on the shared filesystem;
# training and evaluation jobs then read it with --prepared_dir and never touch the network.
#
#   sbatch --partition=cpu slurm/prepare.sh --stage finetune --output_dir /shared/prep/imdb-finetune
#   DAPT_CONFIG=recipes/my.yaml sbatch slurm/prepare.sh --stage mlm --data_files /shared/imdb/unsup.parquet \
#          --output_dir /shared/prep/imdb-mlm
#   bash slurm/prepare.sh --stage evaluate ...     # directly, e.g. on a login node with internet
#
# Hub data needs a node with internet (or run this script directly on a login node); local data
# (--data_files: parquet, CSV, TSV, JSONL, an aclImdb tree or its .tar.gz) works anywhere.
# Variables: DAPT_CONFIG (recipe: a file or a packaged name, default imdb-bert-base as for the stage
# scripts, so the prepared data matches their settings; empty: none) and the helper's environment set-up
# (slurm/launch.sh: DAPT_ROOT, DAPT_ENV_SETUP, DAPT_VENV, DAPT_PYTHON). One process (`python -m dapt
# prepare`) with one tokenising worker per allocated CPU (a later --num_proc wins); no srun. Relative paths are relative to the directory sbatch was called
# from (or the current one). Output: logs/%x-%j.out (create logs/ first: Slurm does not).
#SBATCH --job-name=dapt-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail
# Run directly: the helper beside this file. Under sbatch, Slurm runs a copy of this file: load the helper
# from the slurm/ folder the job was submitted from.
_dir=$(dirname "${BASH_SOURCE[0]}")
if [[ -z ${DAPT_ROOT:-} && ! -f $_dir/launch.sh && -n ${SLURM_JOB_ID:-} ]]; then
    _self=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
    _dir=$(dirname "${_self:-$PWD/slurm/-}")
fi
source "${DAPT_ROOT:-$_dir/..}/slurm/launch.sh" \
    || { echo "dapt-slurm: error: slurm/launch.sh not found; set DAPT_ROOT to the folder holding slurm/" >&2; exit 2; }

DAPT_CONFIG=${DAPT_CONFIG-imdb-bert-base}
dapt_env
# One tokenising process per allocated core; a later --num_proc on the command line wins.
num_proc=${SLURM_CPUS_PER_TASK:-$(nproc)}
# Keep the datasets cache off a small home quota when the cluster has a scratch filesystem.
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-${SCRATCH:-$HOME/.cache}/huggingface/datasets}
cmd=("$DAPT_PYTHON" -m dapt prepare --num_proc "$num_proc" ${DAPT_CONFIG:+--config "$DAPT_CONFIG"} "$@")
[[ -z ${SLURM_JOB_ID:-} ]] || dapt_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) on ${SLURM_JOB_NODELIST:-?}:" \
                                       "${num_proc} CPUs, python $(command -v "$DAPT_PYTHON")"
dapt_log "running: $(printf '%q ' "${cmd[@]}")"
exec "${cmd[@]}"
