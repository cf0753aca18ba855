#!/bin/bash
# A tiny Llama launched the way MindSpeed-LLM's long-sequence examples (their
# examples/mcore/chatglm3/pretrain_chatglm3_6B_64K.sh) launch hybrid context parallelism: the
# same CP flags, written as they write them (CP and CP_ALGO variables, flag strings expanded
# unquoted, `python -m torch.distributed.launch`), sizes and paths shrunk, a Llama's flags for
# the model. Not as theirs: --distributed-backend gloo (nccl needs a GPU here), fp32 (their
# --fp16 rounds differently in the CP and single-rank summation orders), no `| tee` of the log.
# CP and NPUS_PER_NODE may be overridden (CP=1 NPUS_PER_NODE=1: the same run on one rank).
#   CKPT_SAVE_DIR=... DATA_PATH=... TOKENIZER_PATH=HF_TOKENIZER \
#       bash pretrain_tiny_llama2_mindspeed_hybrid_cp.sh
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-4}
MASTER_ADDR=localhost
MASTER_PORT=${MASTER_PORT:-6010}
NNODES=1
NODE_RANK=0
WORLD_SIZE=$((NPUS_PER_NODE*$NNODES))

CKPT_SAVE_DIR=${CKPT_SAVE_DIR:?}
DATA_PATH=${DATA_PATH:?}
TOKENIZER_PATH=${TOKENIZER_PATH:?}

TP=1
PP=1
CP=${CP:-4}
MBS=1
GBS=4
SEQ_LEN=32
CP_ALGO=hybrid_cp_algo

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --use-mcore-models \
    --transformer-impl local \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --num-layers 2 \
    --hidden-size 64 \
    --ffn-hidden-size 160 \
    --num-attention-heads 4 \
    --ulysses-degree-in-cp 2 \
    --seq-length ${SEQ_LEN} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --context-parallel-algo ${CP_ALGO} \
    --context-parallel-size ${CP} \
    --max-position-embeddings ${SEQ_LEN} \
    --make-vocab-size-divisible-by 1 \
    --group-query-attention \
    --num-query-groups 2 \
    --disable-bias-linear \
    --position-embedding-type rope \
    --use-distributed-optimizer \
    --use-flash-attn \
    --use-fused-rmsnorm \
    --use-fused-swiglu \
    --normalization RMSNorm \
    --swiglu \
    --no-create-attention-mask-in-dataloader \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --lr 1e-3 \
    --train-iters 3 \
    --lr-decay-style cosine \
    --untie-embeddings-and-output-weights \
    --attention-dropout 0.0 \
    --init-method-std 0.01 \
    --hidden-dropout 0.0 \
    --no-masked-softmax-fusion \
    --attention-softmax-in-fp32 \
    --min-lr 1e-8 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.01 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --no-gradient-accumulation-fusion \
    --num-workers 1 \
    --no-shared-storage \
    --use-cp-send-recv-overlap \
    --overlap-grad-reduce \
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --split 949,50,1
"
OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 2000 \
    --eval-interval 3 \
    --eval-iters 1 \
    --save $CKPT_SAVE_DIR \
"

python -m torch.distributed.launch $DISTRIBUTED_ARGS pretrain_gpt.py \
    $GPT_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend gloo
