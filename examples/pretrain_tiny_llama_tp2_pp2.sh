#!/usr/bin/env bash
# A tiny Llama-style model with TP=2 x PP=2, sequence parallelism and packed documents with
# variable-length attention. Runs on CPU (gloo) in minutes and unchanged on GPUs (nccl).
#   DATA_PATH=PREFIX_text_document TOKENIZER_MODEL=tokenizer.model bash examples/pretrain_tiny_llama_tp2_pp2.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC_PER_NODE=${NPROC_PER_NODE:-4}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
: "${DATA_PATH:?set DATA_PATH to a PREFIX_text_document written by preprocess_data.py}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the SentencePiece .model}"
CHECKPOINT_DIR=${CHECKPOINT_DIR:-runs/tiny-llama/checkpoints}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-runs/tiny-llama/tensorboard}
TRAIN_ITERS=${TRAIN_ITERS:-300}
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

DISTRIBUTED_ARGS=(
    --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
)
source examples/tiny_llama_model.sh
TRAINING_ARGS=(
    --micro-batch-size 4 --global-batch-size 16 --train-iters "$TRAIN_ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel
)
DATA_ARGS=(
    --data-path "$DATA_PATH" --split 98,2,0
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
    --reset-position-ids --eod-mask-loss
)
EVAL_AND_LOGGING_ARGS=(
    --log-interval 10 --eval-interval 100 --eval-iters 5
    --save "$CHECKPOINT_DIR" --save-interval 100 --ckpt-format torch_dist
    --tensorboard-dir "$TENSORBOARD_DIR"
)

python -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py \
    "${GPT_MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "$@"
