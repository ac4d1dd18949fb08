#!/bin/bash
# Prepare one stage's data once, on a CPU partition, into a directory on the shared filesystem;
# training and evaluation jobs then read it with --prepared_dir and never touch the network.
#
#   sbatch --partition=cpu slurm/prepare.sh --stage finetune --config recipes/imdb-bert-base.yaml \
#          --output_dir /shared/prep/imdb-finetune
#
# Hub data needs a node with internet (or run this script directly on a login node: bash slurm/prepare.sh ...);
# local data (--data_files: parquet, CSV, TSV, JSONL, an aclImdb tree or its .tar.gz) works anywhere.
#SBATCH --job-name=dapt-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}
# One tokenising process per allocated core; a later --num_proc on the command line wins.
NUM_PROC=${SLURM_CPUS_PER_TASK:-$(nproc)}
# Keep the datasets cache off a small home quota when the cluster has a scratch filesystem.
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-${SCRATCH:-$HOME/.cache}/huggingface/datasets}

exec "$PYTHON" launch/prepare.py --num_proc "$NUM_PROC" "$@"
