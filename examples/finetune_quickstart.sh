#!/usr/bin/env bash
# Instruction fine-tuning of the quickstart model, end to end on CPU (gloo) or GPUs (nccl):
# runs examples/quickstart.sh first when its checkpoint is missing, preprocesses the built-in
# instruction set (megatron_ext/data/instruct/builtin_instructions.jsonl, ShareGPT format, multi-turn)
# with the Llama-2 chat template into packed samples with an answer-only loss mask, then
# fine-tunes with --load ... --finetune on TP=2 x PP=2 (+ sequence parallelism), the
# conversations of a packed sample attending only to themselves (variable-length attention).
# "lm loss" is the loss of the answers alone (assistant turns and their end tokens).
# Ends with one chat turn with the fine-tuned model (generate_gpt.py --prompt-type llama2).
#
# LORA=1: LoRA instead (MindSpeed-LLM's flags): adapters r 16 on linear_qkv linear_proj
# linear_fc1 linear_fc2, the quickstart model frozen as the base (--load), adapter-only
# checkpoints in FT_DIR (default runs/finetune_lora); the chat turn loads base + adapters
# (generate_gpt.py --load BASE --lora-load FT_DIR/checkpoints, at TP=1 PP=1: resharded).
#
# Environment overrides: WORK_DIR (the quickstart's), FT_DIR, TRAIN_ITERS, NPROC_PER_NODE,
# MASTER_PORT, LORA=1, SKIP_INSTALL=1 (passed to quickstart.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK_DIR=${WORK_DIR:-runs/quickstart}
LORA=${LORA:-0}
if [ "$LORA" = 1 ]; then FT_DIR=${FT_DIR:-runs/finetune_lora}; else FT_DIR=${FT_DIR:-runs/finetune}; fi
TRAIN_ITERS=${TRAIN_ITERS:-60}
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
MASTER_PORT=${MASTER_PORT:-29500}
PRETRAINED=$WORK_DIR/checkpoints
TOKENIZER_MODEL=$WORK_DIR/data/tokenizer.model
SEQ_LENGTH=128  # the packed sample length; tiny_llama_model.sh reads it
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -f "$PRETRAINED/latest_checkpointed_iteration.txt" ]; then
    echo "no pretrained checkpoint in $PRETRAINED: running examples/quickstart.sh first"
    WORK_DIR=$WORK_DIR MASTER_PORT=$MASTER_PORT bash examples/quickstart.sh
fi

# Conversations -> token ids + loss mask, packed into samples of SEQ_LENGTH + 1 tokens.
python preprocess_data.py \
    --input megatron_ext/data/instruct/builtin_instructions.jsonl \
    --output-prefix "$FT_DIR/data/builtin" \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --handler-name SharegptStyleInstructionHandler --prompt-type llama2 \
    --pack --seq-length "$SEQ_LENGTH" --workers 2

DISTRIBUTED_ARGS=(
    --nproc_per_node "$NPROC_PER_NODE" --nnodes 1 --node_rank 0
    --master_addr 127.0.0.1 --master_port "$MASTER_PORT"
)
source examples/tiny_llama_model.sh
if [ "$LORA" = 1 ]; then
    # --load is the frozen base (weights only); the adapters train alone, at a higher rate.
    TUNED_ARGS=(--load "$PRETRAINED" --lr 4e-3 --min-lr 4e-4
                --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
                --lora-r 16 --lora-alpha 32)
    GENERATE_LOAD=(--load "$PRETRAINED" --lora-load "$FT_DIR/checkpoints")
else
    TUNED_ARGS=(--load "$PRETRAINED" --finetune --lr 1e-3 --min-lr 1e-4)
    GENERATE_LOAD=(--load "$FT_DIR/checkpoints")
fi
FINETUNE_ARGS=(
    "${TUNED_ARGS[@]}"
    --micro-batch-size 4 --global-batch-size 16 --train-iters "$TRAIN_ITERS"
    --lr-decay-style cosine --lr-warmup-iters 5
    --weight-decay 0.0 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234
    --calculate-per-token-loss  # each answer token weighs the same, whatever its conversation
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel
)
DATA_ARGS=(
    --is-instruction-dataset --data-path "$FT_DIR/data/builtin" --split 90,10,0
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
)
EVAL_AND_LOGGING_ARGS=(
    --log-interval 5 --eval-interval 10 --eval-iters 2
    --save "$FT_DIR/checkpoints" --ckpt-format torch_dist
)

python -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py \
    "${GPT_MODEL_ARGS[@]}" "${FINETUNE_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "$@"
QUESTION="What is 12 + 30?"
echo "one chat turn with the fine-tuned model (llama2 template, greedy): $QUESTION"
echo "$QUESTION" | python generate_gpt.py "${GENERATE_LOAD[@]}" \
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --interactive --prompt-type llama2 --max-new-tokens 48 2>"$FT_DIR/generate.log"
echo "finetune done: checkpoint in $FT_DIR/checkpoints"
