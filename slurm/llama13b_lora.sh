#!/bin/bash
# LoRA on LLaMA-13B, the LLM-Adapters math recipe: r 32, alpha 64, dropout 0.05 on q,k,v,up,down; lr 3e-4; global
# batch 16 (micro-batch up to 4); 3 epochs; cutoff 256; 120 validation examples; validation loss and checkpoint
# every 80 steps. ZeRO-3, one task (rank) per GPU. Requeues itself after a checkpoint on SIGUSR1 (120 s before the
# time limit, or preemption), then submits slurm/eval.sh to run once it has ended successfully.
#
#   MODEL=/models/llama-13b-hf DATA=/data/math_10k.json EVAL_DATA=/data/math_eval \
#   OUTPUT=/scratch/$USER/llama13b-lora \
#       sbatch --partition=gpu --account=myproject slurm/llama13b_lora.sh
#
# Allocation (sbatch flags override the #SBATCH lines below; keep --ntasks-per-node = --gpus-per-node):
#   sbatch --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 --time=08:00:00 slurm/llama13b_lora.sh
#   partition, account, QOS: sbatch --partition=P --account=A --qos=Q (or SBATCH_PARTITION, SBATCH_ACCOUNT, ...)
#   CPU mode (no GPU; the tests): sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 ...
# Environment (all optional):
#   MODEL             base model folder or HF hub id in the local cache (default yahma/llama-13b-hf)
#   DATA              training JSON/JSONL of {instruction,input,output} (default ft-training_set/math_10k.json)
#   OUTPUT            run folder: adapter/ checkpoints/ tensorboard/ train_log.jsonl eval/ (default runs/<job name>)
#   DS_CONFIG         DeepSpeed config (default ds_configs/zero3.json)
#   BATCH_SIZE        global batch (default 16);  MICRO_BATCH_SIZE  per rank, reduced to fit the ranks (default 4)
#   CONFIG            a recipe file (YAML/JSON, e.g. slurm/recipes/llama13b_lora.yaml, or a run's train_args.json)
#                     in place of the recipe flags below; the settings here still override it
#   EXTRA_ARGS        more launcher/train.py flags, whitespace-separated, overriding the recipe's ("--max_steps 100")
#   PYTHON            interpreter with adapters_ds installed (default python3 on PATH)
#   GPUS_PER_NODE     ranks per node, one per GPU (default: GPUs allocated per node; 0 = CPU mode)
#   EVAL_DATA         folder of <name>/test.json for the chained evaluation (default dataset/); CHAIN_EVAL=0 skips it
#   EVAL_DATASETS, EVAL_ARGS, EVAL_SBATCH_ARGS   the evaluation's data sets, evaluate.py flags, sbatch flags
#                     (added to this job's allocation shape, which the evaluation gets; its log: OUTPUT/eval/)
#   TORCH_EXTENSIONS_DIR, MASTER_PORT, MAX_REQUEUES, HF_HUB_OFFLINE: see slurm/launch.sh
# Submit from anywhere; the checkout is found through the submitted path (or set REPO).
#
#SBATCH --job-name=llama13b-lora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue

REPO=${REPO:-$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/slurm/[^/]*$|\1|p')}
# shellcheck source-path=SCRIPTDIR source=launch.sh
source "${REPO:=${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh"

MODEL=${MODEL:-yahma/llama-13b-hf}
BATCH_SIZE=${BATCH_SIZE:-16}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
RECIPE_ARGS=(
    --adapter lora --lora_r 32 --lora_alpha 64 --lora_dropout 0.05
    --target_modules "q_proj,k_proj,v_proj,up_proj,down_proj"
    --learning_rate 3e-4 --num_epochs 3 --cutoff_len 256 --val_set_size 120 --eval_steps 80 --save_steps 80
)
train_main
