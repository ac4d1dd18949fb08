#!/bin/bash
# Write a DeepSpeed hostfile ("host slots=N" per node) for the current Slurm allocation: the
# `deepspeed` launcher as the alternative to srun (it starts the ranks itself over pdsh/ssh, so it
# needs pdsh and passwordless ssh between the nodes). Run it inside the job, then start the launcher
# once, on the first node:
#
#   #SBATCH --nodes=2 --ntasks-per-node=1 --gres=gpu:8 --cpus-per-task=64
#   hostfile=$(slurm/hostfile.sh)                 # or: slurm/hostfile.sh path/to/hostfile
#   deepspeed --hostfile "$hostfile" --master_addr "$(head -n1 "$hostfile" | cut -d' ' -f1)" \
#             --master_port 29500 launch/mlm.py --config ... --output_dir ...
#
# Slots per node: DAPT_GPUS_PER_NODE, else the GPUs Slurm allocated per node, else the tasks per node.
# Prints the hostfile's path.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
out=${1:-${TMPDIR:-/tmp}/dapt-hostfile-${SLURM_JOB_ID:?not inside a Slurm job}}
slots=${DAPT_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
[[ $slots =~ ^[1-9][0-9]*$ ]] || dapt_die "slots per node = '$slots': set DAPT_GPUS_PER_NODE to a number"
dapt_hosts | sed "s/$/ slots=$slots/" > "$out"  # names, as pdsh/ssh use them
echo "$out"
