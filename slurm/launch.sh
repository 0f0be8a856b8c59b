# shellcheck shell=bash
# The launch logic shared by the SLURM templates of this folder. Never submitted itself: llama13b_*.sh and eval.sh
# set their recipe, source this file and call `train_main` or `eval_main`. See slurm/README.md.
#
# Layout: one SLURM task per GPU. `srun` starts every rank (RANKS_PER_NODE per node, one per GPU); no per-task GPU
# binding, every rank sees its node's GPUs and picks LOCAL_RANK, as torchrun and the deepspeed runner do. Each rank
# maps SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS to RANK / LOCAL_RANK / WORLD_SIZE itself
# (adapters_ds/distributed.py); MASTER_ADDR (the job's first node) and MASTER_PORT (from the job id, the formula
# of distributed.py) are set here so the logged command shows them.
#
# Settings read from the environment (the recipe files list their defaults):
#   PYTHON                 interpreter with adapters_ds installed (default: python3 on PATH)
#   GPUS_PER_NODE          ranks per node, one per GPU (default: the GPUs allocated per node). 0 = CPU mode: one
#                          rank per allocated task on DeepSpeed's CPU accelerator (gloo)
#   TORCH_EXTENSIONS_DIR   DeepSpeed's JIT-compiled ops, on a file system every node sees
#                          (default: $HOME/.cache/adapters_ds/torch_extensions): compiled once, not once per rank
#   HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE
#                          1 unless set: compute nodes read models and data from local paths or the HF cache
#   MASTER_PORT            rendezvous port (default: 15000 + job id % 20000)
#   MAX_REQUEUES           stop requeueing a job after this many restarts (default: 20)

set -euo pipefail

EXIT_PREEMPTED=75 # the trainer's exit code after a checkpoint on SIGUSR1/SIGTERM (sysexits' EX_TEMPFAIL)

log() { printf '[%s %s] %s\n' "$(date '+%F %T')" "${SLURM_JOB_ID:-?}" "$*"; }
# The words of a command, shell-quoted only where needed: it reads like a typed command and pastes back as one.
quote() {
    local plain='^[A-Za-z0-9_./:,=@%+-]+$' word words=()
    for word in "$@"; do
        if [[ $word =~ $plain ]]; then words+=("$word"); else words+=("$(printf '%q' "$word")"); fi
    done
    echo "${words[*]}"
}
die() {
    log "error: $*" >&2
    exit 2
}

# ------------------------------------------------------------------------------------------------------ signals
# SLURM signals the ranks directly (`--signal=USR1@120`, `scancel --signal=USR1 JOB`): the trainer checkpoints at
# the next step boundary and exits 75. A signal aimed at the batch shell (`--signal=B:USR1@...`,
# `scancel --batch` or `--full`) would kill bash, so it is trapped: USR1 is relayed to the ranks through srun, and
# TERM (scancel, preemption, time limit: SLURM sends it to the ranks as well) marks the job as ending, so that
# a run that checkpoints because of it is not requeued against the user's scancel.
STEP_PID=
SIGNALLED=
TERMINATING=
REQUEUEING=

on_signal() {
    SIGNALLED=1
    case $1 in
    USR1)
        log "batch shell got SIGUSR1: relaying it to the ranks"
        if [[ -n $STEP_PID ]]; then kill -USR1 "$STEP_PID" 2>/dev/null || true; fi
        ;;
    TERM)
        if [[ -n $REQUEUEING ]]; then return 0; fi # SLURM ends this run of a job we requeued ourselves
        TERMINATING=1
        log "batch shell got SIGTERM: SLURM is ending the job (scancel, preemption or time limit)"
        ;;
    esac
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# ------------------------------------------------------------------------------------------------------ layout

# Tasks per node of this run: from SLURM_TASKS_PER_NODE ("2(x3),1" = 2 on three nodes, 1 on the fourth), which must
# name one count for every node; outside a started job, from the submission's variables.
tasks_per_node() {
    local spec=${SLURM_TASKS_PER_NODE:-} entry count=
    if [[ -z $spec ]]; then
        echo "${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-1} / NODES))}"
        return
    fi
    local entries
    IFS=, read -r -a entries <<<"$spec"
    for entry in "${entries[@]}"; do
        [[ -z $count || ${entry%%(*} == "$count" ]] || die "the nodes got different numbers of tasks" \
            "(SLURM_TASKS_PER_NODE=$spec): ask for --ntasks-per-node"
        count=${entry%%(*}
    done
    echo "$count"
}

setup_job() {
    [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM job: submit with sbatch (see slurm/README.md)"
    REPO=$(cd "$REPO" && pwd)
    PYTHON=${PYTHON:-python3}
    command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found (activate the environment or set PYTHON)"
    MAX_REQUEUES=${MAX_REQUEUES:-20}

    # The allocation as this run of the job got it. A requeued job may come back with another shape (scontrol
    # update of a held job, a node range): SLURM_JOB_NUM_NODES, SLURM_TASKS_PER_NODE ("4(x2)") and
    # SLURM_GPUS_ON_NODE are set when the run starts, while SLURM_NTASKS, SLURM_NTASKS_PER_NODE and
    # SLURM_GPUS_PER_NODE keep the values of the submission.
    NODES=${SLURM_JOB_NUM_NODES:-1}
    TASKS_PER_NODE=$(tasks_per_node) || exit 2 # die in the subshell: its message is out, its code here
    # the GPUs per node as sbatch takes them ("a100:4" keeps its type while the count still holds)
    JOB_GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
    if [[ -n ${SLURM_GPUS_PER_NODE:-} && ${SLURM_GPUS_PER_NODE##*:} == "${JOB_GPUS##*:}" ]]; then
        JOB_GPUS=$SLURM_GPUS_PER_NODE
    fi
    local gpus=${GPUS_PER_NODE:-$JOB_GPUS}
    gpus=${gpus##*:} # "a100:8" → 8
    [[ $gpus =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE must be a number, found '$gpus'"
    CPU_MODE=
    if ((gpus > 0)); then
        RANKS_PER_NODE=$gpus
        ((RANKS_PER_NODE <= TASKS_PER_NODE)) || die "one task per GPU: $gpus GPUs per node need" \
            "--ntasks-per-node=$gpus, the allocation has $TASKS_PER_NODE task(s) per node"
    else
        CPU_MODE=1
        RANKS_PER_NODE=$TASKS_PER_NODE
    fi
    WORLD=$((NODES * RANKS_PER_NODE))
    CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}

    local hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST") # not `| head -1`: SIGPIPE under pipefail
    [[ ${#hosts[@]} -gt 0 ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
    # Everything the ranks need beyond the submitting environment: passed to srun, so it shows in the logged command
    # and does not leak into jobs submitted from this shell (the chained evaluation).
    RANK_ENV=(
        "MASTER_ADDR=${hosts[0]}"
        "MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"
        "TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/adapters_ds/torch_extensions}"
        "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}"
        "HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}"
        "TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}"
        "TOKENIZERS_PARALLELISM=false"
        "OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}"
        "PYTHONUNBUFFERED=1"
    )
    [[ -z $CPU_MODE ]] || RANK_ENV+=("DS_ACCELERATOR=cpu")

    log "job ${SLURM_JOB_NAME:-?} $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
        "$NODES node(s) × $RANKS_PER_NODE rank(s) = $WORLD, ${gpus} GPU(s) per node${CPU_MODE:+ (CPU mode)}," \
        "$CPUS_PER_TASK CPU(s) per rank; repository $REPO"
}

# The step's command, run on every rank by srun. Logged exactly (shell-quoted) and written to $1/command.sh.
# Not --kill-on-bad-exit: after a checkpoint the ranks exit 75 one after the other, and srun would SIGTERM the
# slower ones while they exit (seen: exit 143 instead of 75). --wait ends the other ranks 120 s after the first
# one exits instead, so a crashed rank does not leave its peers blocked in a collective until its timeout.
run_ranks() {
    local record=$1
    shift
    local export_list
    export_list=$(IFS=,; echo "ALL,${RANK_ENV[*]}")
    # --ntasks too: srun would take the submission's SLURM_NTASKS, stale in a requeued job of another shape
    local cmd=(srun --nodes="$NODES" --ntasks-per-node="$RANKS_PER_NODE" --ntasks="$WORLD"
        --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=0 --wait=120 --export="$export_list" "$@")
    mkdir -p "$record"
    quote "${cmd[@]}" >"$record/command.sh"
    log "command: $(cat "$record/command.sh")"
    "${cmd[@]}" &
    STEP_PID=$!
    local rc
    while :; do
        SIGNALLED=
        rc=0
        wait "$STEP_PID" || rc=$?
        # a trapped signal interrupts `wait` (status > 128) while srun runs on: wait again
        if [[ -z $SIGNALLED ]] || ((rc <= 128)); then break; fi
    done
    STEP_PID=
    log "ranks exited with code $rc"
    return "$rc"
}

# Exit code 75 means "checkpoint saved, continue later": put the job back in the queue, where it resumes with
# `--resume auto`. Not when SLURM itself is ending the job: a user's scancel must stay a cancel, and a preempting
# SLURM requeues on its own. Returns only on success (0).
requeue_or_exit() {
    local rc=$1
    ((rc == 0)) && return 0
    ((rc == EXIT_PREEMPTED)) || die "the ranks failed (exit code $rc)"
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [[ -n $TERMINATING ]]; then
        log "checkpoint saved while SLURM ends the job: not requeueing (resubmit the same command to continue)"
    elif ((restarts >= MAX_REQUEUES)); then
        log "error: checkpoint saved, but the job was requeued $restarts times already (MAX_REQUEUES=$MAX_REQUEUES)"
    else
        log "checkpoint saved (exit $rc): requeueing job $SLURM_JOB_ID; the next run resumes with --resume auto"
        REQUEUEING=1
        scontrol requeue "$SLURM_JOB_ID" || log "error: scontrol requeue failed: resubmit the same command to continue"
    fi
    exit "$EXIT_PREEMPTED"
}

# MICRO: the largest micro-batch ≤ MICRO_BATCH_SIZE that splits the global BATCH_SIZE evenly over the ranks. The
# global batch is the hyperparameter (the trainer's loss is a mean over the global batch), the micro-batch only
# trades memory for speed.
fit_micro_batch() {
    ((BATCH_SIZE % WORLD == 0)) || die "BATCH_SIZE=$BATCH_SIZE is not a multiple of the $WORLD ranks"
    MICRO=$MICRO_BATCH_SIZE
    while ((MICRO > 1 && BATCH_SIZE % (MICRO * WORLD) != 0)); do MICRO=$((MICRO - 1)); done
    if ((MICRO != MICRO_BATCH_SIZE)); then
        log "micro-batch $MICRO per rank: MICRO_BATCH_SIZE=$MICRO_BATCH_SIZE × $WORLD ranks does not divide" \
            "BATCH_SIZE=$BATCH_SIZE (the global batch is unchanged)"
    fi
}

# A copy of DS_CONFIG whose TensorBoard section writes to OUTPUT/tensorboard/<job name>-<job id>: one run per
# job in `tensorboard --logdir OUTPUT/tensorboard`, continued by the job's requeued runs.
job_ds_config() {
    local dest=$1
    "$PYTHON" - "$DS_CONFIG" "$dest" "$OUTPUT/tensorboard" "${SLURM_JOB_NAME:-train}-$SLURM_JOB_ID" <<'EOF'
import json
import sys

source, dest, output_path, job_name = sys.argv[1:]
with open(source) as f:
    config = json.load(f)
config["tensorboard"] = {"enabled": True, **config.get("tensorboard", {}), "output_path": output_path,
                         "job_name": job_name}
with open(dest, "w") as f:
    json.dump(config, f, indent=2)
EOF
}

# ------------------------------------------------------------------------------------------------------ training
# The recipe sets RECIPE_ARGS (its trainer flags), BATCH_SIZE, MICRO_BATCH_SIZE and defaults for MODEL.
# CONFIG=FILE (a YAML/JSON recipe, slurm/recipes/, or a run's train_args.json) replaces RECIPE_ARGS with
# `--config FILE`; MODEL, DATA, OUTPUT, DS_CONFIG, the batch sizes and EXTRA_ARGS still come after it and win.

train_main() {
    setup_job
    DATA=${DATA:-$REPO/ft-training_set/math_10k.json}
    OUTPUT=${OUTPUT:-$REPO/runs/${SLURM_JOB_NAME:-run}}
    DS_CONFIG=${DS_CONFIG:-$REPO/ds_configs/zero3.json}
    CHAIN_EVAL=${CHAIN_EVAL:-1}
    [[ -f $DS_CONFIG ]] || die "DS_CONFIG=$DS_CONFIG does not exist"
    if [[ $DATA == *.json || $DATA == *.jsonl ]]; then # else a Hugging Face dataset name
        [[ -f $DATA ]] || die "DATA=$DATA does not exist"
    fi
    if [[ $CHAIN_EVAL == 1 ]]; then
        # checked now, not after hours of training
        EVAL_DATA=${EVAL_DATA:-$REPO/dataset}
        [[ -d $EVAL_DATA ]] || die "EVAL_DATA=$EVAL_DATA is not a folder of <name>/test.json (or set CHAIN_EVAL=0)"
    fi
    if [[ -n ${CONFIG:-} ]]; then # a recipe file replaces the template's recipe flags
        [[ -f $CONFIG ]] || die "CONFIG=$CONFIG does not exist"
        RECIPE_ARGS=(--config "$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")")
    fi
    local extra
    read -r -a extra <<<"${EXTRA_ARGS:-}"

    mkdir -p "$OUTPUT"
    OUTPUT=$(cd "$OUTPUT" && pwd)
    local record="$OUTPUT/slurm/job-$SLURM_JOB_ID"
    mkdir -p "$record"
    job_ds_config "$record/ds_config.json"
    fit_micro_batch

    # EXTRA_ARGS come after the recipe's flags, so they override them; --resume auto comes last, so every run of
    # the job (first or requeued) continues from the newest complete checkpoint in OUTPUT.
    local rc=0
    run_ranks "$record" "$PYTHON" "$REPO/launcher/train.py" --ds_config "$record/ds_config.json" \
        --base_model "$MODEL" --data_path "$DATA" --output_dir "$OUTPUT" "${RECIPE_ARGS[@]}" \
        --batch_size "$BATCH_SIZE" --micro_batch_size "$MICRO" "${extra[@]}" --resume auto || rc=$?
    requeue_or_exit "$rc"
    log "training done: adapter in $OUTPUT/adapter, TensorBoard in $OUTPUT/tensorboard"
    chain_eval "$record"
}

# Submit eval.sh to start once this job has ended successfully (afterok on our own id: the job is running now and
# completes right after this function). Once per job: a requeued run of a job that already submitted its
# evaluation (recorded in OUTPUT/slurm/job-<id>/eval_job) does not submit it again. The evaluation gets this job's
# allocation shape (nodes, tasks and GPUs per node, CPUs per task, partition, account) rather than eval.sh's
# #SBATCH defaults, which need not fit this cluster (4 GPUs per node on a CPU-only one); EVAL_SBATCH_ARGS come after
# them and win (for sbatch the last occurrence of an option counts). Its log goes beside its results, OUTPUT/eval/.
chain_eval() {
    local record=$1
    if [[ $CHAIN_EVAL != 1 ]]; then
        log "CHAIN_EVAL=$CHAIN_EVAL: evaluation not submitted"
        return 0
    fi
    if [[ -s $record/eval_job ]]; then
        log "evaluation job $(cat "$record/eval_job") was submitted by an earlier run of this job: not again"
        return 0
    fi
    mkdir -p "$OUTPUT/eval" # sbatch does not create the folder of --output
    local args=(--parsable --dependency="afterok:$SLURM_JOB_ID" --kill-on-invalid-dep=yes
        --job-name="${SLURM_JOB_NAME:-train}-eval" --chdir="${SLURM_SUBMIT_DIR:-$PWD}" --output="$OUTPUT/eval/%x-%j.out"
        --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --gpus-per-node="$JOB_GPUS"
        --cpus-per-task="$CPUS_PER_TASK")
    if [[ -n ${SLURM_JOB_PARTITION:-} ]]; then args+=(--partition="$SLURM_JOB_PARTITION"); fi
    if [[ -n ${SLURM_JOB_ACCOUNT:-} ]]; then args+=(--account="$SLURM_JOB_ACCOUNT"); fi
    local more
    read -r -a more <<<"${EVAL_SBATCH_ARGS:-}"
    args+=("${more[@]}" "$REPO/slurm/eval.sh")
    local eval_env=(REPO="$REPO" PYTHON="$PYTHON" MODEL="$MODEL" ADAPTER_DIR="$OUTPUT/adapter"
        EVAL_OUTPUT="$OUTPUT/eval" EVAL_DATA="$EVAL_DATA" TRAIN_DATA="$DATA")
    log "submitting the evaluation: $(quote "${eval_env[@]}" sbatch "${args[@]}")"
    local eval_id
    # the new job must not inherit this job's SLURM_* variables (sizes, node list), only the configuration file
    eval_id=$(
        while read -r name; do [[ $name == SLURM_CONF ]] || unset "$name"; done < <(compgen -e | grep '^SLURM_')
        unset SRUN_CPUS_PER_TASK
        env "${eval_env[@]}" sbatch "${args[@]}"
    ) || die "could not submit the evaluation job"
    echo "${eval_id%%;*}" >"$record/eval_job"
    log "evaluation job ${eval_id%%;*} submitted: it starts when job $SLURM_JOB_ID ends successfully and writes" \
        "$OUTPUT/eval/summary.md (its log beside it)"
}

# ------------------------------------------------------------------------------------------------------ evaluation

# TENSOR_PARALLEL: ranks per copy of the model (launcher/evaluate.py --tensor_parallel). N: groups of N consecutive
# ranks each hold the model sharded N ways and the groups share the questions; it must divide the ranks, and a group
# must lie within one node or span whole nodes (consecutive ranks fill a node first), so its all-reduces stay on the
# node's fast links. auto (the default): the smallest N whose shard fits a GPU (a CPU rank: its share of the node's
# memory), decided by launcher/evaluate.py; a 70B model in bf16 on 80 GB GPUs gets 4, a 13B one 1.
eval_tensor_parallel() {
    TENSOR_PARALLEL=${TENSOR_PARALLEL:-auto}
    [[ $TENSOR_PARALLEL == auto ]] && return 0
    [[ $TENSOR_PARALLEL =~ ^[1-9][0-9]*$ ]] ||
        die "TENSOR_PARALLEL must be a positive number or auto, found '$TENSOR_PARALLEL'"
    ((WORLD % TENSOR_PARALLEL == 0)) || die "TENSOR_PARALLEL=$TENSOR_PARALLEL does not divide the $WORLD ranks" \
        "($NODES node(s) × $RANKS_PER_NODE)"
    local misfit
    if ((TENSOR_PARALLEL <= RANKS_PER_NODE)); then
        misfit=$((RANKS_PER_NODE % TENSOR_PARALLEL))
    else
        misfit=$((TENSOR_PARALLEL % RANKS_PER_NODE))
    fi
    ((misfit == 0)) || die "TENSOR_PARALLEL=$TENSOR_PARALLEL: a group of ranks must lie within one node or span" \
        "whole nodes of $RANKS_PER_NODE ranks"
}

eval_main() {
    setup_job
    eval_tensor_parallel
    # the ranks per node, for --tensor_parallel auto (a CPU rank's share of the node's memory, groups within nodes)
    RANK_ENV+=("LOCAL_WORLD_SIZE=$RANKS_PER_NODE")
    [[ -n ${MODEL:-} ]] || die "MODEL (the base model) is not set"
    EVAL_DATA=${EVAL_DATA:-$REPO/dataset}
    [[ -d $EVAL_DATA ]] || die "EVAL_DATA=$EVAL_DATA is not a folder of <name>/test.json"
    EVAL_DATASETS=${EVAL_DATASETS:-AddSub,MultiArith,SingleEq,gsm8k,AQuA,SVAMP}
    if [[ -n ${ADAPTER_DIR:-} ]]; then
        EVAL_OUTPUT=${EVAL_OUTPUT:-$(dirname "$ADAPTER_DIR")/eval}
    fi
    [[ -n ${EVAL_OUTPUT:-} ]] || die "EVAL_OUTPUT is not set (it defaults to the folder beside ADAPTER_DIR)"
    local extra
    read -r -a extra <<<"${EVAL_ARGS:-}"
    local args=(--base_model "$MODEL" --datasets "$EVAL_DATASETS" --data_dir "$EVAL_DATA" --output_dir "$EVAL_OUTPUT")
    if [[ -n ${ADAPTER_DIR:-} ]]; then args+=(--adapter_dir "$ADAPTER_DIR"); fi
    if [[ -f ${TRAIN_DATA:-} ]]; then args+=(--train_data "$TRAIN_DATA"); fi # counts test questions seen in training
    args+=(--tensor_parallel "$TENSOR_PARALLEL")

    mkdir -p "$EVAL_OUTPUT"
    local rc=0
    run_ranks "$EVAL_OUTPUT/slurm/job-$SLURM_JOB_ID" "$PYTHON" "$REPO/launcher/evaluate.py" "${args[@]}" \
        "${extra[@]}" || rc=$?
    requeue_or_exit "$rc"
    log "evaluation done: $EVAL_OUTPUT/summary.md"
}
