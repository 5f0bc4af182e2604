#!/usr/bin/env bash
# One node's part of a multi-node run under Slurm: DeepSpeed's per-node launcher
# (deepspeed.launcher.launch, what the deepspeed runner starts on every node over pdsh),
# started once per node by run/train.sbatch (srun --ntasks-per-node=1). It starts this
# node's ranks; its arguments go to run/train.py.
#
# Environment (Slurm sets the first two):
#   SLURM_JOB_NODELIST  the job's nodes; expanded with `scontrol show hostnames`; node i holds
#                       global ranks [i * RANKS_PER_NODE, (i + 1) * RANKS_PER_NODE)
#   SLURM_NODEID        this node's index in that list (DeepSpeed's --node_rank)
#   RANKS_PER_NODE      ranks on every node (default: SLURM_GPUS_ON_NODE, else this node's GPUs)
#   MASTER_ADDR         rank 0's address (default: the first node of the job)
#   MASTER_PORT         rank 0's port (default 29500); the same on every node
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source run/env.sh
: "${SLURM_JOB_NODELIST:?run/slurm_node.sh runs inside a Slurm job (srun); see run/train.sbatch}"
: "${SLURM_NODEID:?run/slurm_node.sh runs inside a Slurm job (srun); see run/train.sbatch}"

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
ranks="${RANKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
if [ -z "$ranks" ]; then
  ranks="$(nvidia-smi -L 2>/dev/null | wc -l)"
fi
if [ "${#hosts[@]}" -lt 1 ] || [ "$ranks" -lt 1 ]; then
  echo "error: run/slurm_node.sh: ${#hosts[@]} node(s) in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST and $ranks rank(s)" \
       "per node; set RANKS_PER_NODE on a node without GPUs" >&2
  exit 2
fi
# DeepSpeed's --world_info: base64 of {"host": [local ranks]} in node order, as the runner builds it.
world_info="$(.venv/bin/python -c 'import base64, json, sys
n = int(sys.argv[1])
print(base64.urlsafe_b64encode(json.dumps({h: list(range(n)) for h in sys.argv[2:]}).encode()).decode())' \
  "$ranks" "${hosts[@]}")"
echo "[slurm_node] node ${SLURM_NODEID} of ${#hosts[@]} (${hosts[$SLURM_NODEID]}): $ranks rank(s), master" \
     "${MASTER_ADDR:-${hosts[0]}}:${MASTER_PORT:-29500}"
exec .venv/bin/python -u -m deepspeed.launcher.launch --world_info="$world_info" --node_rank="$SLURM_NODEID" \
  --master_addr="${MASTER_ADDR:-${hosts[0]}}" --master_port="${MASTER_PORT:-29500}" run/train.py "$@"
