# The tiny Llama-style model of the quickstart, sourced by the scripts that train it
# (pretrain_tiny_llama_tp2_pp2.sh, finetune_quickstart.sh) so their checkpoints always fit.
SEQ_LENGTH=${SEQ_LENGTH:-128}
GPT_MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4
    --group-query-attention --num-query-groups 2
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --position-embedding-type rope --rotary-base 10000
    --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
    --untie-embeddings-and-output-weights --disable-bias-linear
    --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
)
