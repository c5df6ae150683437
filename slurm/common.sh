# Shared by the sbatch scripts of slurm/ (sourced, not run). Variables: slurm/README.md.
#
#   pararnn_setup                       REPO, PYTHON, environment (ENV_SETUP), RUNS_ROOT
#   pararnn_train RUN_DIR OVERRIDES...  one rank per GPU through srun, preemption-safe, requeue on USR1
#                                       (RUN_DIR: the default; a run_dir=... override or $RUN_DIR wins)
#   pararnn_run CMD...                  print CMD (DRY_RUN=1) or run it
#   pararnn_job_id                      SLURM_JOB_ID; "<job id>" in a dry run outside a job; else an error
#
# Launching: srun starts one task per GPU (--ntasks-per-node = GPUs per node); slurm/task.sh turns
# SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS into RANK / LOCAL_RANK / WORLD_SIZE and execs train.py,
# which rendezvouses at MASTER_ADDR:MASTER_PORT (first node of the job, a port derived from the job
# id). No torchrun or accelerate launcher sits between srun and the ranks, so a signal srun forwards
# reaches the ranks themselves (torchrun would die of SIGUSR1, or SIGKILL its workers 30 s after a
# SIGTERM).
#
# Preemption: #SBATCH --signal=B:USR1@300 signals this batch shell 5 minutes before the time limit;
# the trap forwards USR1 to srun (which forwards it to every rank); the ranks finish their step, write
# a checkpoint and exit 75 (training/preemption.py); the script then requeues the job
# (scontrol requeue; #SBATCH --requeue), which restarts with the same job id, hence the same run_dir,
# and resumes from that checkpoint. A scheduler preemption (SIGTERM to all) stops the same way; the
# scheduler requeues by itself where PreemptMode=REQUEUE. Exit 75 without a USR1 (scancel) is not
# requeued: the script exits 75 (the job did not finish; --dependency=afterok jobs do not start).
#
# Outside a job, DRY_RUN=1 prints the command with the script's #SBATCH defaults and <placeholders>;
# tests/fake_slurm.py runs these scripts unchanged on one machine (emulated sbatch, srun, scontrol).

EXIT_REQUEUE=75

pararnn_setup() {
    # sbatch runs a spooled copy of the script: find the repository from the submit directory.
    REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
    if [[ ! -f "$REPO/train.py" ]]; then
        echo "error: $REPO has no train.py: submit from the repository root or set REPO=/path/to/repo" >&2
        exit 2
    fi
    REPO="$(cd "$REPO" && pwd)"
    if [[ -n "${ENV_SETUP:-}" ]]; then
        eval "$ENV_SETUP"   # e.g. 'module load cuda/12.4; source ~/venvs/pararnn/bin/activate'
    fi
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x "$REPO/.venv/bin/python" && -z "${CONTAINER_IMAGE:-}" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
    fi
    RUNS_ROOT="${RUNS_ROOT:-$REPO/runs}"
    export TOKENIZERS_PARALLELISM=false
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}"
}

# The value of KEY=... among the Hydra overrides "$@" (the last one), or nothing.
pararnn_override() {
    local key="$1" value="" arg
    shift
    for arg in "$@"; do
        [[ "$arg" == "$key="* ]] && value="${arg#"$key="}"
    done
    printf '%s' "$value"
}

# The value of "#SBATCH --KEY=VALUE" in the running script: what sbatch uses when no flag overrides it.
pararnn_sbatch_default() {
    sed -n "s/^#SBATCH --$1=\([^ ]*\).*/\1/p" "$0" | head -n 1
}

# The job id, or a placeholder in a dry run outside a job (anything else outside a job is an error).
pararnn_job_id() {
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        printf '%s' "$SLURM_JOB_ID"
    elif [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '<job id>'
    else
        echo "error: not inside a SLURM job (SLURM_JOB_ID is unset): submit with sbatch, or set DRY_RUN=1 to print the launch command" >&2
        exit 2
    fi
}

# Ranks per node: --ntasks-per-node, else the GPUs per node (--gpus-per-node=[type:]G), else the first
# count of SLURM_TASKS_PER_NODE ("8(x2)" -> 8), which SLURM always sets.
pararnn_tasks_per_node() {
    local n="${SLURM_NTASKS_PER_NODE:-}"
    if [[ -z "$n" ]]; then n="${SLURM_GPUS_PER_NODE:-}"; n="${n##*:}"; fi
    [[ -n "$n" ]] || n="${SLURM_TASKS_PER_NODE:-1}"
    printf '%s' "${n%%[(,]*}"
}

pararnn_master_addr() {
    if [[ -n "${MASTER_ADDR:-}" ]]; then
        printf '%s' "$MASTER_ADDR"
    elif command -v scontrol >/dev/null 2>&1; then
        local hosts  # no pipe into head: under pipefail a SIGPIPE'd scontrol would fail the script
        hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
        printf '%s' "${hosts%%$'\n'*}"
    else  # no scontrol (dry runs off the cluster): "gpu-[07-08,11]" -> "gpu-07", "a,b" -> "a"
        local list="${SLURM_JOB_NODELIST:?}" prefix first
        if [[ "$list" == *"["* ]]; then
            prefix="${list%%\[*}"; first="${list#*\[}"; first="${first%%[],-]*}"
            printf '%s%s' "$prefix" "$first"
        else
            printf '%s' "${list%%,*}"
        fi
    fi
}

pararnn_run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"; printf '\n'
        return 0
    fi
    "$@"
}

pararnn_train() {
    local run_dir="${RUN_DIR:-$1}"
    shift
    local given
    given="$(pararnn_override run_dir "$@")"
    local -a overrides=("$@")
    if [[ -n "$given" ]]; then run_dir="$given"; else overrides+=("run_dir=$run_dir"); fi
    local job nodes per_node cpus master port
    job="$(pararnn_job_id)"
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
        per_node="$(pararnn_tasks_per_node)"
        cpus="${SLURM_CPUS_PER_TASK:-}"
        master="$(pararnn_master_addr)"
        port="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    else  # a dry run outside a job: the script's #SBATCH values; SLURM fills in the rest
        nodes="$(pararnn_sbatch_default nodes)"; nodes="${nodes:-1}"
        per_node="$(pararnn_sbatch_default ntasks-per-node)"; per_node="${per_node:-1}"
        cpus="$(pararnn_sbatch_default cpus-per-task)"
        master="${MASTER_ADDR:-<first node of the job>}"
        port="${MASTER_PORT:-<20000 + job id % 20000>}"
        echo "# not inside a SLURM job: nodes, ranks per node and CPUs are the script's #SBATCH defaults (sbatch flags override them); <...> is filled in by SLURM" >&2
    fi
    local -a srun_opts=(--kill-on-bad-exit=1 --nodes="$nodes" --ntasks-per-node="$per_node")
    # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05): without it every rank gets one core.
    if [[ -n "$cpus" ]]; then srun_opts+=(--cpus-per-task="$cpus"); fi
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then  # pyxis / enroot
        srun_opts+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO"
                    --container-mounts="${CONTAINER_MOUNTS:-$REPO:$REPO}")
    fi
    local -a cmd=(env "MASTER_ADDR=$master" "MASTER_PORT=$port" srun "${srun_opts[@]}"
                  ${SRUN_ARGS:-} bash "$REPO/slurm/task.sh" "$PYTHON" "$REPO/train.py" "${overrides[@]}")
    echo "# job $job (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $per_node rank(s), rendezvous $master:$port, run_dir $run_dir" >&2
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        pararnn_run "${cmd[@]}"
        return 0
    fi

    local requeue=0 interrupted=0 pid rc=0
    trap 'echo "USR1: time limit near, the ranks checkpoint and stop" >&2; requeue=1; interrupted=1; kill -USR1 "$pid" 2>/dev/null || true' USR1
    trap 'interrupted=1; kill -TERM "$pid" 2>/dev/null || true' TERM
    "${cmd[@]}" &
    pid=$!
    while :; do  # a trapped signal interrupts wait (status > 128): wait again for srun itself
        interrupted=0 rc=0
        wait "$pid" || rc=$?
        (( interrupted && rc > 128 )) || break
    done
    trap - USR1 TERM
    # After USR1 the ranks checkpoint and exit 75. srun --kill-on-bad-exit ends the step at the first
    # rank that exits 75, and a rank still shutting down may then die of the SIGTERM: srun reports
    # 128 + 15. The checkpoint is complete either way (written atomically before any rank exits).
    if (( requeue && (rc == EXIT_REQUEUE || rc > 128) )); then
        echo "the ranks stopped (srun exit $rc); requeueing job $SLURM_JOB_ID (it resumes from $run_dir)" >&2
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            echo "error: scontrol requeue $SLURM_JOB_ID failed; resubmit with RUN_DIR=$run_dir to resume" >&2
            return "$EXIT_REQUEUE"
        fi
        return 0
    fi
    if (( rc == EXIT_REQUEUE )); then
        echo "stopped by a signal after a checkpoint; resubmit with RUN_DIR=$run_dir to resume" >&2
    fi
    return "$rc"
}

# The Hydra overrides "$@", with trainer=$TRAINER (default ddp) first unless one is given: the
# config's default trainer is the CPU one.
pararnn_with_trainer() {
    if [[ -z "$(pararnn_override trainer "$@")" ]]; then
        printf '%s\0' "trainer=${TRAINER:-ddp}"
    fi
    if (( $# )); then printf '%s\0' "$@"; fi
}
