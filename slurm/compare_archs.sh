#!/bin/bash
# Submit the four-architecture array (slurm/train_array.sbatch) and an eval job that starts when all
# four have finished. Variables as train_array.sbatch (SIZE, TOKENS, GLOBAL_BATCH, SEQ_LEN, RUNS_ROOT);
# EVAL_ARGS: overrides of the eval job (default: tasks=paper perplexity=true). Run from the repo root:
#   SIZE=400m TOKENS=8000000000 slurm/compare_archs.sh data=fineweb_edu trainer=fsdp2
#   DRY_RUN=1 slurm/compare_archs.sh data=fineweb_edu            # print both sbatch commands
# On one machine the same comparison is `python -m eval.compare size=$SIZE tokens=$TOKENS batch_size=$GLOBAL_BATCH
# seq_len=$SEQ_LEN ...` (same train.py overrides), which also writes the report; here, once the eval job is done:
#   python -m eval.report $RUNS_ROOT/*_$SIZE-<array job id> --out $RUNS_ROOT/report-<array job id>
set -euo pipefail

source "${REPO:-$PWD}/slurm/common.sh"
pararnn_setup
SIZE="${SIZE:-400m}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    pararnn_run sbatch --parsable --export=ALL "$REPO/slurm/train_array.sbatch" "$@"
    job='<array job id>'
else
    job="$(sbatch --parsable --export=ALL "$REPO/slurm/train_array.sbatch" "$@")"
    job="${job%%;*}"
fi
dirs=""
for arch in paragru paralstm mamba2 transformer; do dirs+="$RUNS_ROOT/${arch}_${SIZE}-$job "; done
read -r -a eval_args <<< "${EVAL_ARGS:-tasks=paper perplexity=true}"
pararnn_run env RUN_DIRS="${dirs% }" sbatch --dependency="afterok:$job" --export=ALL "$REPO/slurm/eval.sbatch" "${eval_args[@]}"
