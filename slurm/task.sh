#!/bin/bash
# One training rank of an srun job step: the torch.distributed environment from SLURM's per-task
# variables, then exec (so the rank itself is the task srun signals). Used by slurm/common.sh:
#   MASTER_ADDR=host MASTER_PORT=port srun ... bash slurm/task.sh python train.py OVERRIDES...
export RANK="${SLURM_PROCID:?task.sh runs under srun}"
export LOCAL_RANK="${SLURM_LOCALID:?}"
export WORLD_SIZE="${SLURM_NTASKS:?}"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${WORLD_SIZE}}"
export LOCAL_WORLD_SIZE="${LOCAL_WORLD_SIZE%%(*}"   # "4(x2)" -> "4"
export GROUP_RANK="${SLURM_NODEID:-0}"
: "${MASTER_ADDR:?}" "${MASTER_PORT:?}"
exec "$@"
