#!/usr/bin/env bash
# A tiny model launched the way Megatron-LM's example scripts launch theirs (flag arrays
# expanded unquoted, quoted values inside them, the same flag set as
# examples/llama/train_llama3_8b_h100_fp8.sh and examples/gpt3/train_gpt3_175b_distributed.sh
# minus FP8, context parallelism and torch_dist): it must train, evaluate, save and resume here.
#   bash train_tiny_llama_megatron_style.sh CHECKPOINT_PATH TENSORBOARD_LOGS_PATH [extra flags]
set -eu
CHECKPOINT_PATH=$1
TENSORBOARD_LOGS_PATH=$2
shift 2
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
MASTER_PORT=${MASTER_PORT:-29500}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-48}

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes 1
    --master_addr 127.0.0.1
    --master_port $MASTER_PORT
)

MODEL_ARGS=(
    --use-mcore-models
    --num-layers 2
    --hidden-size 32
    --ffn-hidden-size 64
    --num-attention-heads 4
    --group-query-attention
    --num-query-groups 2
    --kv-channels 8
    --seq-length 16
    --max-position-embeddings 16
    --position-embedding-type rope
    --rotary-base 1000000
    --rotary-percent 0.5
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --swiglu
    --normalization RMSNorm
    --init-method-std 0.0134
    --attention-backend fused
    --apply-layernorm-1p
    --untie-embeddings-and-output-weights
    --disable-bias-linear
)

TRAINING_ARGS=(
    --micro-batch-size 2
    --global-batch-size 8
    --rampup-batch-size 4 4 8
    --train-samples $TRAIN_SAMPLES
    --lr-decay-samples 44
    --lr-warmup-samples 8
    --lr 0.0015
    --min-lr 0.0001
    --decoupled-lr 5.0e-3
    --decoupled-min-lr 4.5e-4
    --lr-decay-style cosine
    --clip-grad 1.0
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --bf16
    --grad-reduce-in-bf16
    --cross-entropy-loss-fusion
    --calculate-per-token-loss
    --manual-gc
    --empty-unused-memory-level 1
    --exit-duration-in-mins 235
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --context-parallel-size 1
    --sequence-parallel
)

DATA_ARGS_LIST=(
    "--mock-data"
    "--tokenizer-type NullTokenizer"
    "--vocab-size 255"
    "--split '99,1,0'"
    "--no-create-attention-mask-in-dataloader"
    "--no-mmap-bin-files"
    "--num-workers 1"
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 1
    --eval-iters 1
    --eval-interval 3
    --save-interval 3
    --log-throughput
    --profile
    --profile-step-start 1
    --profile-step-end 2
    --profile-ranks 1
    --ckpt-format torch
    --distributed-timeout-minutes 5
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"
    --tensorboard-dir "$TENSORBOARD_LOGS_PATH"
)

python -m torch.distributed.run ${DISTRIBUTED_ARGS[@]} pretrain_gpt.py \
    ${MODEL_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]} \
    ${DATA_ARGS_LIST[@]} \
    ${EVAL_AND_LOGGING_ARGS[@]} "$@"
