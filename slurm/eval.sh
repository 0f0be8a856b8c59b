#!/bin/bash
# Math evaluation of a base model plus a trained adapter (launcher/evaluate.py): each rank (one task per GPU)
# generates a share of the batches; rank 0 writes EVAL_OUTPUT/summary.json and summary.md. The training templates
# submit it themselves when training has ended (sbatch --dependency=afterok:<training job>) with the training job's
# allocation shape, writing results and log to OUTPUT/eval. By hand:
#
#   MODEL=/models/llama-13b-hf ADAPTER_DIR=/scratch/$USER/llama13b-lora/adapter EVAL_DATA=/data/math_eval \
#       sbatch --partition=gpu --account=myproject slurm/eval.sh
#   ... or after a running training job:  sbatch --dependency=afterok:<job id> ... slurm/eval.sh
#
# Allocation: sbatch flags override the #SBATCH lines below (keep --ntasks-per-node = --gpus-per-node);
#   CPU mode: sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 ...
#   a model larger than one GPU (LLaMA-70B in bf16, 140 GB): the ranks form tensor-parallel groups, each group one
#   copy of the model sharded over its GPUs, the groups sharing the questions; TENSOR_PARALLEL=auto (the default)
#   picks the group size, or set it: one group of 8 GPUs per node, two nodes evaluating side by side:
#     TENSOR_PARALLEL=8 sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/eval.sh
# Environment:
#   MODEL             base model folder or HF hub id in the local cache (required)
#   ADAPTER_DIR       adapter folder written by training (OUTPUT/adapter); unset: the base model alone
#   EVAL_DATA         folder of <name>/test.json, LLM-Adapters format (default dataset/)
#   EVAL_DATASETS     comma-separated names (default AddSub,MultiArith,SingleEq,gsm8k,AQuA,SVAMP)
#   EVAL_OUTPUT       where the results go (default: eval/ beside ADAPTER_DIR)
#   EVAL_ARGS         more launcher/evaluate.py flags, whitespace-separated ("--batch_size 16 --limit 100")
#   TRAIN_DATA        training file: the summary counts test questions that occur in it
#   TENSOR_PARALLEL   ranks per model copy (--tensor_parallel): a number dividing the ranks, within a node or whole
#                     nodes, or auto (default): the smallest whose shard fits a GPU (see slurm/launch.sh)
#   PYTHON, GPUS_PER_NODE, TORCH_EXTENSIONS_DIR, MASTER_PORT, HF_HUB_OFFLINE: see slurm/launch.sh
# A killed evaluation keeps the rows it wrote; the requeued (or resubmitted) job generates only the rest.
#
#SBATCH --job-name=adapters-eval
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

eval_main
