"""GPT (Llama-style) model on megatron-core: our layer spec and the model factory.

Model code carries no parallel plumbing: the spec swaps in our norm (sequence-parallel aware)
and our core attention (document-aware); megatron-core's GPTModel does the rest.
"""

import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.checkpoint.args import padded_vocab_size
from megatron_ext.config import Config
from megatron_ext.model.attention import core_attention_spec
from megatron_ext.model.norm import Norm


def transformer_config(config: Config) -> TransformerConfig:
    m, p = config.model, config.parallel
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        layernorm_epsilon=m.norm_epsilon,
        layernorm_zero_centered_gamma=m.apply_layernorm_1p,
        normalization=m.normalization,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=not m.disable_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=m.params_dtype,
        pipeline_dtype=m.params_dtype,
        bf16=m.bf16,
        fp16=m.fp16,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        # Full-size weights are drawn on the CPU and then split, so a layer's initial values do
        # not depend on the TP size (and no CUDA RNG is needed).
        use_cpu_initialization=True,
        # Every micro-batch has one shape ([s, b, h], or [b*s, 1, h] when packed), known to all
        # stages: no shape exchange between pipeline stages is needed.
        variable_seq_lengths=False,
        # The loss function returns (loss sum, token count). With --calculate-per-token-loss
        # megatron-core divides the gradients by the global token count; without it, each
        # micro-batch's sum by its own count, then by micro-batches and DP ranks (Megatron-LM).
        calculate_per_token_loss=config.training.calculate_per_token_loss,
        cross_entropy_loss_fusion=m.cross_entropy_loss_fusion,
    )


def layer_spec(config: Config) -> TransformerBlockSubmodules:
    spec = get_gpt_layer_local_spec(normalization=config.model.normalization)
    spec.submodules.input_layernorm = Norm
    spec.submodules.pre_mlp_layernorm = Norm
    spec.submodules.self_attention.submodules.core_attention = core_attention_spec(
        config.model.attention_backend
    )
    return TransformerBlockSubmodules(
        layer_specs=[spec] * (config.model.num_layers // config.parallel.pipeline_model_parallel_size),
        layer_norm=Norm,
    )


def build_model(config: Config, vocab_size: int, pre_process=None, post_process=None) -> GPTModel:
    """The model chunk of this pipeline stage (the whole model without PP)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    m = config.model
    model = GPTModel(
        config=transformer_config(config),
        transformer_layer_spec=layer_spec(config),
        vocab_size=padded_vocab_size(
            vocab_size, m.make_vocab_size_divisible_by, config.parallel.tensor_model_parallel_size
        ),
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        rope_scaling=m.use_rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
    )
    # 16-bit: every weight in params_dtype, as Megatron-LM's Float16Module casts the model
    # (megatron-core builds the learned position table as a plain fp32 torch Embedding).
    return model.to(m.params_dtype) if m.bf16 or m.fp16 else model
