"""GPT (Llama-style) model on megatron-core: our layer spec and the model factory.

Model code carries no parallel plumbing: the spec swaps in our norm (sequence-parallel aware)
and our core attention (document-aware), and with --lora-target-modules the LoRA linears
(model/lora.py); megatron-core's GPTModel does the rest, with two
hooks of ours: the loss excludes the padded vocabulary rows (model/vocab.py) and the initial
weights do not depend on the layout (model/init.py).
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel as CoreGPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext import platform
from megatron_ext.checkpoint.args import padded_vocab_size
from megatron_ext.config import Config
from megatron_ext.model import lora
from megatron_ext.model.attention import core_attention_spec
from megatron_ext.model.context_parallel import ContextParallelParams, rotary_embedding
from megatron_ext.model.init import initialize_parameters
from megatron_ext.model.norm import Norm
from megatron_ext.model.vocab import mask_padded_logits_


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
        num_layers_in_first_pipeline_stage=p.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=p.decoder_last_pipeline_num_layers,
        # The interleaved schedule (config/validate_pipeline.py): Megatron-LM batches the
        # stages' sends and receives only where it does not overlap them.
        virtual_pipeline_model_parallel_size=p.num_virtual_stages_per_pipeline_rank,
        microbatch_group_size_per_vp_stage=p.microbatch_group_size_per_virtual_pipeline_stage,
        overlap_p2p_comm=p.overlap_p2p_comm,
        batch_p2p_comm=not p.overlap_p2p_comm,
        context_parallel_size=p.context_parallel_size,
        hierarchical_context_parallel_sizes=p.hierarchical_context_parallel_sizes,
        sequence_parallel=p.sequence_parallel,
        params_dtype=m.params_dtype,
        pipeline_dtype=m.params_dtype,
        bf16=m.bf16,
        fp16=m.fp16,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        # build_model initializes the weights (model/init.py); parameters are allocated on the
        # device where there is one.
        perform_initialization=False,
        use_cpu_initialization=not platform.cuda_available(),
        # Every micro-batch has one shape ([s, b, h], or [b*s, 1, h] when packed), known to all
        # stages: no shape exchange between pipeline stages is needed.
        variable_seq_lengths=False,
        # The loss function returns (loss sum, token count). With --calculate-per-token-loss
        # megatron-core divides the gradients by the global token count; without it, each
        # micro-batch's sum by its own count, then by micro-batches and DP ranks (Megatron-LM).
        calculate_per_token_loss=config.training.calculate_per_token_loss,
        cross_entropy_loss_fusion=m.cross_entropy_loss_fusion,
    )


def layer_spec(config: Config, core_config: TransformerConfig,
               vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage's model chunk ``vp_stage`` (as many as
    megatron-core's split of ``core_config`` gives it, --decoder-first/last-pipeline-num-layers
    and virtual stages included)."""
    spec = get_gpt_layer_local_spec(normalization=config.model.normalization)
    spec.submodules.input_layernorm = Norm
    spec.submodules.pre_mlp_layernorm = Norm
    # --cp-comm-type goes to our core attention, not to TransformerConfig.cp_comm_type: a
    # per-layer list there is indexed by megatron-core's 1-based layer number (0.16: layer i
    # would get value i + 1, the last layer none).
    spec.submodules.self_attention.submodules.core_attention = core_attention_spec(
        config.model.attention_backend, config.parallel.cp_comm_type
    )
    if config.lora.enabled:
        lora.apply_to_spec(spec, config.lora, config.model.swiglu)
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(core_config, vp_stage=vp_stage),
        layer_norm=Norm,
    )


_ONE_POSITION = PackedSeqParams(qkv_format="thd", max_seqlen_q=1, max_seqlen_kv=1)


class GPTModel(CoreGPTModel):
    """megatron-core's GPTModel whose loss ignores the padded vocabulary rows, and whose RoPE
    under context parallelism gives each local token the angle of its global position."""

    def __init__(self, *args, unpadded_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.unpadded_vocab_size = unpadded_vocab_size

    def _preprocess(self, *args, **kwargs):
        # megatron-core would slice its rotary table for its own CP layouts (Transformer
        # Engine's per-document split); ours (model/context_parallel.py) carries each token's
        # position instead. megatron-core reads packed_seq_params here only for that table
        # (0.16 through 0.19, passed by keyword): a one-position THD stand-in keeps it from
        # slicing, and the tuple's second entry, the rotary embedding, is replaced.
        params = kwargs.get("packed_seq_params")
        if not isinstance(params, ContextParallelParams):
            return super()._preprocess(*args, **kwargs)
        kwargs["packed_seq_params"] = _ONE_POSITION
        output = super()._preprocess(*args, **kwargs)
        if output[1] is None:  # learned_absolute: the embedding took the local position ids
            return output
        if self.position_embedding_type != "rope":
            raise ValueError(f"--position-embedding-type {self.position_embedding_type} with "
                             f"context parallelism: only rope and learned_absolute")
        emb = rotary_embedding(self.rotary_pos_emb, params.rotary_positions)
        return (output[0], emb, *output[2:])

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # logits: [s, b, padded vocab / TP], this TP rank's vocab partition.
        first_row = self.pg_collection.tp.rank() * logits.size(-1)
        mask_padded_logits_(logits, self.unpadded_vocab_size, first_row)
        return super().compute_language_model_loss(labels, logits)


def build_model_chunks(config: Config, vocab_size: int) -> List[GPTModel]:
    """This pipeline stage's model chunks: one, or one per virtual stage (the interleaved
    schedule), the embedding on chunk 0 of the first stage and the loss on the last chunk of
    the last stage."""
    chunks = config.parallel.virtual_stages
    return [build_model(config, vocab_size, vp_stage=stage if chunks > 1 else None)
            for stage in range(chunks)]


def build_model(config: Config, vocab_size: int, pre_process=None, post_process=None,
                vp_stage: Optional[int] = None) -> GPTModel:
    """The model chunk ``vp_stage`` of this pipeline stage (the whole model without PP),
    initialized from ``--seed`` alike in every layout."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    m, p = config.model, config.parallel
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by,
                               p.tensor_model_parallel_size)
    tied = not m.untie_embeddings_and_output_weights
    core_config = transformer_config(config)
    model = GPTModel(
        config=core_config,
        transformer_layer_spec=layer_spec(config, core_config, vp_stage),
        vocab_size=padded,
        unpadded_vocab_size=vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=tied,
        position_embedding_type=m.position_embedding_type,
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        rope_scaling=m.use_rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
        vp_stage=vp_stage,
    )
    initialize_parameters(
        model, model.config, seed=config.training.seed, vocab_size=vocab_size,
        padded_vocab_size=padded, tied_embeddings=tied,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=p.tensor_model_parallel_size,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=p.pipeline_model_parallel_size,
        vp_stage=vp_stage or 0,
    )
    # 16-bit: every weight in params_dtype, as Megatron-LM's Float16Module casts the model
    # (megatron-core builds the learned position table as a plain fp32 torch Embedding).
    return model.to(m.params_dtype) if m.bf16 or m.fp16 else model
