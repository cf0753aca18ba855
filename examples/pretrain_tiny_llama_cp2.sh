#!/usr/bin/env bash
# The tiny Llama-style model with context parallelism: each 1024-token sequence split over
# CP=2 ranks (x TP=2 with sequence parallelism: 4 ranks), packed documents with variable-length
# attention across the chunk boundaries (docs/context-parallel.md). Runs on CPU (gloo) and
# unchanged on GPUs (nccl); CP is not part of the checkpoint layout, so its checkpoints also
# resume with --context-parallel-size 1 (same TP/PP).
#   DATA_PATH=PREFIX_text_document TOKENIZER_MODEL=tokenizer.model bash examples/pretrain_tiny_llama_cp2.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC_PER_NODE=${NPROC_PER_NODE:-4}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
: "${DATA_PATH:?set DATA_PATH to a PREFIX_text_document written by preprocess_data.py}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the SentencePiece .model}"
CHECKPOINT_DIR=${CHECKPOINT_DIR:-runs/tiny-llama-cp2/checkpoints}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-runs/tiny-llama-cp2/tensorboard}
TRAIN_ITERS=${TRAIN_ITERS:-300}
export SEQ_LENGTH=${SEQ_LENGTH:-1024}  # a multiple of 2 x CP x TP = 8
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

DISTRIBUTED_ARGS=(
    --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
)
source examples/tiny_llama_model.sh
TRAINING_ARGS=(
    --micro-batch-size 2 --global-batch-size 8 --train-iters "$TRAIN_ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234
    --calculate-per-token-loss  # every unmasked token weighs the same (packed documents)
)
MODEL_PARALLEL_ARGS=(
    --context-parallel-size 2 --cp-comm-type allgather
    --tensor-model-parallel-size 2 --sequence-parallel
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
