#!/usr/bin/env bash
# The main job end to end on the embedded default, on a fresh machine (CPU or GPU):
# install, build a corpus and a SentencePiece tokenizer from this machine's Python standard
# library, preprocess it into Megatron shards with EOD, then pretrain a small Llama-style model
# with TP=2 x PP=2 and sequence parallelism on 4 ranks, evaluate, save a checkpoint, draw
# the loss curves (WORK_DIR/curves.png, from the TensorBoard scalars) and print what the
# trained model writes for two prompts (generate_gpt.py, greedy).
#
# Environment overrides: WORK_DIR, TRAIN_ITERS, NPROC_PER_NODE, MASTER_PORT, SKIP_INSTALL=1.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK_DIR=${WORK_DIR:-runs/quickstart}
TRAIN_ITERS=${TRAIN_ITERS:-300}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    # The CPU wheel first: a later "torch>=2.6" requirement is then already met and no CUDA
    # wheels are pulled. On a GPU machine keep the installed CUDA build.
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        python -m pip install -q torch==2.13.0
    fi
    python -m pip install -q -e ".[plot]"  # plot: matplotlib, for the curves at the end
fi

DATA_DIR=$WORK_DIR/data
python -m megatron_ext.data.default_corpus --output-dir "$DATA_DIR"
if [ ! -f "$DATA_DIR/stdlib_text_document.idx" ]; then
    python preprocess_data.py \
        --input "$DATA_DIR/corpus.jsonl" \
        --output-prefix "$DATA_DIR/stdlib" \
        --tokenizer-type GPTSentencePieceTokenizer \
        --tokenizer-model "$DATA_DIR/tokenizer.model" \
        --append-eod --workers 2
fi

rm -rf "$WORK_DIR/checkpoints" "$WORK_DIR/tensorboard"
DATA_PATH=$DATA_DIR/stdlib_text_document \
TOKENIZER_MODEL=$DATA_DIR/tokenizer.model \
CHECKPOINT_DIR=$WORK_DIR/checkpoints \
TENSORBOARD_DIR=$WORK_DIR/tensorboard \
TRAIN_ITERS=$TRAIN_ITERS \
    bash examples/pretrain_tiny_llama_tp2_pp2.sh
python -m megatron_ext.plot "$WORK_DIR/tensorboard" -o "$WORK_DIR/curves.png"
# The torch_dist checkpoint loads at any TP/PP: one process is enough for this model.
echo "what the model writes (greedy, 32 tokens) after 'def __init__(self' and 'Return the number of':"
python generate_gpt.py --load "$WORK_DIR/checkpoints" \
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$DATA_DIR/tokenizer.model" \
    --prompt "def __init__(self" --prompt "Return the number of" --max-new-tokens 32 \
    2>"$WORK_DIR/generate.log"
echo "quickstart done: checkpoint in $WORK_DIR/checkpoints, TensorBoard scalars in" \
    "$WORK_DIR/tensorboard, loss curves in $WORK_DIR/curves.png"
