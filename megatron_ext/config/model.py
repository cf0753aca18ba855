"""Model flags (Megatron-LM's ``network size``, ``regularization``, ``initialization``,
``mixed precision``, ``transformer-engine`` and ``moe`` groups)."""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.config.flags import NO_OP, REFUSED, flag

# Megatron-LM's --attention-backend names, onto ours (megatron_ext/model/attention_backends.py). fused
# and flash are fused kernels (the fastest here that runs, or flash-attn itself); unfused and
# local are the plain math path.
MEGATRON_ATTENTION_BACKENDS = {"fused": "auto", "unfused": "sdpa", "local": "sdpa"}
_FP8 = dict(group="transformer-engine", status=REFUSED,
            note="needs Transformer Engine and a GPU with FP8 (Hopper or newer); drop the "
            "--fp8-* flags to train in --bf16")
_MOE = dict(group="moe", status=REFUSED, note="MoE is not supported yet: dense models only")


@dataclass
class ModelConfig:
    GROUP = "network size"

    num_layers: int = flag(2, "Number of transformer layers.")
    hidden_size: int = flag(64, "Transformer hidden size.")
    ffn_hidden_size: Optional[int] = flag(
        None, "MLP hidden size; unset: 4 x --hidden-size, or 2/3 of that rounded down to a "
        "multiple of 64 with --swiglu.")
    num_attention_heads: int = flag(4, "Number of attention heads.")
    group_query_attention: bool = flag(False, "Grouped-query attention (with "
                                       "--num-query-groups).")
    num_query_groups: Optional[int] = flag(None, "Number of key/value head groups.")
    kv_channels: Optional[int] = flag(None, "Head dimension; unset: --hidden-size / "
                                      "--num-attention-heads.")
    seq_length: int = flag(128, "Sequence length of a sample.")
    max_position_embeddings: Optional[int] = flag(
        None, "Size of the learned position table; unset: --seq-length.")
    position_embedding_type: str = flag("learned_absolute", "Position embedding.",
                                        choices=["rope", "learned_absolute"])
    add_position_embedding: bool = flag(
        True, "Deprecated in Megatron-LM: accepted with --position-embedding-type rope only.",
        name="--no-position-embedding", action="store_false", status=NO_OP,
        note="with rope (what it means there); otherwise an error naming "
        "--position-embedding-type, as in Megatron-LM")
    use_rotary_position_embeddings: bool = flag(
        False, "Old Megatron-LM spelling of --position-embedding-type rope.",
        note="rope, as --position-embedding-type rope (which the scripts also pass)")
    rotary_base: int = flag(10000, "Base of the rotary embedding frequencies.")
    rotary_percent: float = flag(1.0, "Fraction of each head's dimensions that RoPE rotates.")
    use_rope_scaling: bool = flag(False, "Llama 3.1 RoPE frequency scaling.")
    rope_scaling_factor: float = flag(8.0, "Llama 3.1 RoPE scaling factor.")
    normalization: str = flag("LayerNorm", "Normalization layer.",
                              choices=["RMSNorm", "LayerNorm"])
    norm_epsilon: float = flag(1e-5, "Epsilon of the normalization layers.")
    apply_layernorm_1p: bool = flag(
        False, "Zero-centred norm weights: the layer scales by (1 + weight), weight "
        "initialized to 0.")
    swiglu: bool = flag(False, "SwiGLU MLP (gated SiLU).")
    untie_embeddings_and_output_weights: bool = flag(
        False, "Separate input embedding and output layer weights.")
    disable_bias_linear: bool = flag(False, "No biases in linear layers.")
    add_qkv_bias: bool = flag(False, "Biases in the QKV projection only (Qwen2).")
    make_vocab_size_divisible_by: int = flag(
        128, "Pad the vocabulary to a multiple of this (times the TP size).")
    attention_backend: str = flag(
        "auto", "Core attention kernel. Ours: auto, flash, te, torch, sdpa (see "
        "docs/varlen.md); Megatron-LM's names map onto them: fused -> auto, unfused and local "
        "-> sdpa (logged).", group="training",
        choices=["auto", "flash", "te", "torch", "sdpa", "fused", "unfused", "local"],
        note="Megatron-LM's names map onto ours (fused -> auto, unfused/local -> sdpa), logged")
    use_mcore_models: bool = flag(
        False, "Deprecated in Megatron-LM; megatron-core models are the only ones here.",
        group="training", status=NO_OP, note="megatron-core models are the only ones here")
    masked_softmax_fusion: bool = flag(
        True, "Disable the fused scale-mask-softmax kernel.", group="training",
        name="--no-masked-softmax-fusion", action="store_false", status=NO_OP,
        note="our core attention has no masked-softmax kernel to disable")
    attention_softmax_in_fp32: bool = flag(
        False, "Compute the attention softmax in fp32: always so here.", group="training",
        status=NO_OP, note="our kernels (flash-attn, torch varlen, SDPA) keep the softmax in fp32")
    gradient_accumulation_fusion: bool = flag(
        True, "Disable the fused weight-gradient accumulation.", group="training",
        name="--no-gradient-accumulation-fusion", action="store_false", status=NO_OP,
        note="the fused kernel needs APEX/Transformer Engine: never used here")
    transformer_impl: str = flag(
        "local", "Layer implementation: local (megatron-core's own layers, the only one here); "
        "transformer_engine runs as local, said once.", group="transformer-engine",
        choices=["local", "transformer_engine"],
        note="local honoured (our default; Megatron-LM's is transformer_engine, which runs as "
        "local, said once: Transformer Engine is not wired yet)")
    cross_entropy_loss_fusion: bool = flag(
        False, "megatron-core's fused vocab-parallel cross entropy.", group="training",
        note="fused with a GPU; on CPU the unfused cross entropy (same result), said once")

    attention_dropout: float = flag(0.1, "Dropout on the attention probabilities.",
                                    group="regularization")
    hidden_dropout: float = flag(0.1, "Dropout on the hidden states.", group="regularization")
    init_method_std: float = flag(0.02, "Standard deviation of the normal weight init.",
                                  group="initialization")
    recompute_granularity: Optional[str] = flag(
        None, "Activation recomputation: full layers or selective (attention core).",
        group="training", choices=["full", "selective"])
    recompute_method: Optional[str] = flag(
        None, "With full recomputation: uniform chunks or the first layers of each stage "
        "(block).", group="training", choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = flag(
        None, "Layers per recomputed chunk (uniform) or recomputed per stage (block).",
        group="training")
    bf16: bool = flag(False, "Train in bfloat16 (fp32 main weights and gradients).",
                      group="mixed precision")
    fp16: bool = flag(False, "Train in float16 with dynamic loss scaling.",
                      group="mixed precision")

    fp8_format: Optional[str] = flag(None, "FP8 format.", choices=["e4m3", "hybrid"], **_FP8)
    fp8_amax_history_len: int = flag(1, "FP8 amax history length.", **_FP8)
    fp8_amax_compute_algo: str = flag("most_recent", "FP8 amax algorithm.",
                                      choices=["most_recent", "max"], **_FP8)
    fp8_param_gather: bool = flag(False, "Keep FP8 parameters for the all-gather.", **_FP8)

    num_experts: Optional[int] = flag(None, "Number of experts (MoE).", **_MOE)
    moe_router_topk: int = flag(2, "Experts per token.", **_MOE)
    moe_router_load_balancing_type: str = flag("aux_loss", "Router load balancing.", **_MOE)
    moe_aux_loss_coeff: float = flag(0.0, "Auxiliary loss coefficient.", **_MOE)
    moe_grouped_gemm: bool = flag(False, "Grouped GEMM for experts.", **_MOE)
    moe_token_dispatcher_type: str = flag("allgather", "Token dispatcher.", **_MOE)

    @property
    def params_dtype(self):
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32
