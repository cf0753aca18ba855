#!/usr/bin/env bash
#SBATCH --job-name=megatron-ext
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
# Multi-node training under SLURM, the way Megatron-LM jobs are launched: one srun task per
# node, each running torchrun (inside TRAIN_SCRIPT) for that node's GPUs; the first node of the
# allocation hosts the rendezvous. Submit from the repository root:
#   DATA_PATH=/shared/corpus_text_document TOKENIZER_MODEL=/shared/tok.model \
#       sbatch examples/slurm_pretrain.sh [more pretrain_gpt.py flags]
# TRAIN_SCRIPT (default: the tiny Llama TP=2 x PP=2 example) reads NNODES, NODE_RANK,
# NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT. Put --data-cache-path (and the data) on a
# filesystem every node mounts: rank 0 alone writes the dataset indices (docs/multinode.md).
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run under SLURM: sbatch examples/slurm_pretrain.sh (or bash it inside salloc)}"
REPO=${MEGATRON_EXT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
export TRAIN_SCRIPT=${TRAIN_SCRIPT:-$REPO/examples/pretrain_tiny_llama_tp2_pp2.sh}

export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-29500}
export NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?}}
export NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}

# NODE_RANK differs per task, so SLURM_NODEID is read inside each task (single quotes).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'NODE_RANK=$SLURM_NODEID exec bash "$TRAIN_SCRIPT" "$@"' slurm-task "$@"
