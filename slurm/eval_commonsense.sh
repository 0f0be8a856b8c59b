#!/bin/bash
# Commonsense evaluation (the reference project's second suite: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c,
# OBQA) of a base model plus a trained adapter with launcher/evaluate.py: each rank (one task per GPU) takes a share
# of the batches; rank 0 writes EVAL_OUTPUT/summary.json and summary.md. The label sets are read from each record's
# "Answer format:" line; by default both scoring modes run (generation, 32 new tokens as in the reference, and
# label log-likelihood ranking) and the summary reports both accuracies and their agreement. By hand:
#
#   MODEL=/models/llama-13b-hf ADAPTER_DIR=/scratch/$USER/llama13b-lora/adapter EVAL_DATA=/data/commonsense \
#       sbatch --partition=gpu --account=myproject slurm/eval_commonsense.sh
#   ... or after a running training job:  sbatch --dependency=afterok:<job id> ... slurm/eval_commonsense.sh
#
# It is slurm/eval.sh with commonsense defaults (the same eval_main of slurm/launch.sh). A training template chains
# eval.sh itself; to chain a commonsense evaluation from one, give the training job these settings instead:
#   EVAL_DATA=/data/commonsense EVAL_DATASETS=boolq,piqa,... EVAL_ARGS="--max_new_tokens 32 --compare_label_scoring"
#
# Allocation: sbatch flags override the #SBATCH lines below (keep --ntasks-per-node = --gpus-per-node);
#   CPU mode: sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 ...
# Environment:
#   MODEL             base model folder or HF hub id in the local cache (required)
#   ADAPTER_DIR       adapter folder written by training (OUTPUT/adapter); unset: the base model alone
#   EVAL_DATA         folder of <name>/test.json, LLM-Adapters format (default dataset/)
#   EVAL_DATASETS     comma-separated names (default boolq,piqa,social_i_qa,hellaswag,winogrande,ARC-Challenge,
#                     ARC-Easy,openbookqa: the reference project's folder names)
#   EVAL_OUTPUT       where the results go (default: eval_commonsense/ beside ADAPTER_DIR, apart from the math eval/)
#   LABEL_SCORING     compare (default: generation and label scoring), on (label scoring only: fastest), off
#   EVAL_ARGS         more launcher/evaluate.py flags, whitespace-separated, after the defaults ("--batch_size 16")
#   TRAIN_DATA        training file (the commonsense mix): the summary counts test questions that occur in it
#   PYTHON, GPUS_PER_NODE, TORCH_EXTENSIONS_DIR, MASTER_PORT, HF_HUB_OFFLINE: see slurm/launch.sh
# A killed evaluation keeps the rows it wrote; the requeued (or resubmitted) job makes only the rest.
#
#SBATCH --job-name=adapters-eval-commonsense
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue

REPO=${REPO:-$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/slurm/[^/]*$|\1|p')}
# shellcheck source-path=SCRIPTDIR source=launch.sh
source "${REPO:=${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh"

EVAL_DATASETS=${EVAL_DATASETS:-boolq,piqa,social_i_qa,hellaswag,winogrande,ARC-Challenge,ARC-Easy,openbookqa}
if [[ -n ${ADAPTER_DIR:-} ]]; then
    EVAL_OUTPUT=${EVAL_OUTPUT:-$(dirname "$ADAPTER_DIR")/eval_commonsense}
fi
case ${LABEL_SCORING:=compare} in
compare) scoring=--compare_label_scoring ;;
on) scoring=--label_scoring ;;
off) scoring= ;;
*) die "LABEL_SCORING=$LABEL_SCORING: expected compare, on or off" ;;
esac
EVAL_ARGS="--max_new_tokens 32 $scoring ${EVAL_ARGS:-}" # the user's flags come last and win

eval_main
