#!/bin/bash
# A tiny Llama launched the way MindSpeed-LLM's examples/mcore/llama2/pretrain_llama2_13b_pack_ptd.sh
# launches its 13B: the same flags, written as it writes them (flag strings expanded unquoted,
# `python -m torch.distributed.launch`, which passes --local-rank), sizes and paths shrunk.
# Not as theirs: --distributed-backend gloo (nccl needs a GPU here) and no `| tee` of the log.
#   CKPT_LOAD_DIR=HF_MODEL CKPT_SAVE_DIR=... DATA_PATH=... TOKENIZER_MODEL=HF_TOKENIZER \
#       bash pretrain_tiny_llama2_mindspeed_style.sh
export HCCL_CONNECT_TIMEOUT=3600
export HCCL_EXEC_TIMEOUT=3600
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTORCH_NPU_ALLOC_CONF=expandable_segments:True

NPUS_PER_NODE=2
MASTER_ADDR=localhost
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=1
NODE_RANK=0
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

CKPT_SAVE_DIR=${CKPT_SAVE_DIR:?}
DATA_PATH=${DATA_PATH:?}
TOKENIZER_MODEL=${TOKENIZER_MODEL:?}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:?}

TP=1
PP=2

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --use-mcore-models \
    --reuse-fp32-param \
    --recompute-activation-function \
    --recompute-granularity full \
    --recompute-method block \
    --recompute-num-layers 1 \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --sequence-parallel \
    --num-layers 4 \
    --hidden-size 64 \
    --ffn-hidden-size 160 \
    --num-attention-heads 4 \
    --group-query-attention \
    --num-query-groups 2 \
    --rotary-base 50000 \
    --norm-epsilon 1e-6 \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_MODEL} \
    --seq-length 32 \
    --max-position-embeddings 32 \
    --micro-batch-size 1 \
    --global-batch-size 4 \
    --make-vocab-size-divisible-by 1 \
    --lr 1e-3 \
    --train-iters 3 \
    --lr-decay-style cosine \
    --untie-embeddings-and-output-weights \
    --disable-bias-linear \
    --attention-dropout 0.0 \
    --init-method-std 0.01 \
    --hidden-dropout 0.0 \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-flash-attn \
    --reset-attention-mask \
    --no-masked-softmax-fusion \
    --attention-softmax-in-fp32 \
    --min-lr 1e-8 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.01 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --initial-loss-scale 4096 \
    --adam-beta2 0.95 \
    --load ${CKPT_LOAD_DIR}  \
    --no-load-optim \
    --no-load-rng \
    --use-fused-swiglu \
    --use-fused-rotary-pos-emb \
    --use-distributed-optimizer \
    --bf16 \
    --ckpt-format torch
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --handler-name GeneralPretrainHandler \
    --split 949,50,1
"

CKPT_ARGS="
    --enable-hf2mg-convert \
    --model-type-hf llama2
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 10000 \
    --eval-interval 1000 \
    --eval-iters 1 \
"

python -m torch.distributed.launch $DISTRIBUTED_ARGS pretrain_gpt.py \
    $GPT_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    $CKPT_ARGS \
    --distributed-backend gloo \
    --save $CKPT_SAVE_DIR \
    --log-throughput \
    --transformer-impl local
