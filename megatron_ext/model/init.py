"""Layout-invariant initialization: the same ``--seed`` gives the same full model in every layout.

megatron-core draws each rank's weights from that rank's RNG stream (and Megatron-LM seeds
every pipeline stage with ``seed + 100 * stage``), so TP, PP or a distributed optimizer start
from other weights than one process, and the loss curves of two layouts cannot be compared.
Here the model is built with ``perform_initialization=False`` and every parameter is then
drawn, one at a time, at its full (TP=1) size on the parameter's device, from a generator
seeded with ``(seed, the parameter's full-model name)``; the rank keeps its shard by the
checkpoint sharding rules. A parameter's initial value is thus a function of the seed and of
its place in the full model, never of the rank holding it. Start-up memory beyond the model is
one full tensor at a time (at most the embedding or one layer's largest matrix).

Distributions are megatron-core's own (``TransformerConfig``'s init callables): normal(0,
``--init-method-std``) for QKV, fc1, embeddings and the output layer, scaled by
1/sqrt(2 x num_layers) for the residual-branch outputs (linear_proj, linear_fc2); norms 1
(0 with --apply-layernorm-1p, which stores gamma - 1), biases 0; the padded vocabulary rows 0
(they never take part in the loss: model/vocab.py); LoRA's A kaiming-uniform as PEFT's, B 0.
The values are reproducible per device type (CPU and CUDA generators differ).
"""

import hashlib
import math

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.checkpoint.sharding import full_shape, global_name, shard_tensor, tp_split

_EMBEDDINGS = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight")
_SCALED = ("linear_proj.weight", "linear_fc2.weight")
_PLAIN = ("linear_qkv.weight", "linear_fc1.weight", "output_layer.weight")
_NORMS = ("norm.weight",)  # input_layernorm, pre_mlp_layernorm, final_layernorm


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed from ``seed`` and a full-model parameter name (stable across processes,
    unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _init_method(name: str, config: TransformerConfig):
    """megatron-core's init callable for ``name``, or a constant (1 or 0) as a float."""
    if name.endswith(".bias"):
        return 0.0
    if ".lora_A." in name:  # PEFT's LoRA A: nn.Linear's default, over the full [r, in]
        return lambda tensor, generator: torch.nn.init.kaiming_uniform_(
            tensor, a=math.sqrt(5), generator=generator)
    if ".lora_B." in name:  # zero: training starts from the base model
        return 0.0
    if name.endswith(_NORMS):
        # --apply-layernorm-1p stores gamma - 1 (megatron-core's zero-centered gamma).
        return 0.0 if config.layernorm_zero_centered_gamma else 1.0
    if name in _EMBEDDINGS:
        return config.embedding_init_method
    if name.endswith(_SCALED):
        return config.output_layer_init_method
    if name.endswith(_PLAIN):
        return config.init_method
    raise ValueError(f"no initialization rule for parameter {name!r}: add one in "
                     f"megatron_ext/model/init.py")


@torch.no_grad()
def initialize_parameters(model: torch.nn.Module, config: TransformerConfig, *, seed: int,
                          vocab_size: int, padded_vocab_size: int, tied_embeddings: bool,
                          tp_rank: int, tp_size: int, pp_rank: int, pp_size: int,
                          vp_stage: int = 0) -> None:
    """Fill every parameter of ``model`` (rank (tp_rank, pp_rank)'s model chunk ``vp_stage``)
    in place."""
    swiglu = config.gated_linear_unit
    for local, param in model.named_parameters():
        name = global_name(local, config.num_layers, pp_rank, pp_size,
                           config.num_layers_in_first_pipeline_stage,
                           config.num_layers_in_last_pipeline_stage, vp_stage,
                           config.virtual_pipeline_model_parallel_size or 1)
        split = tp_split(name, swiglu)
        if split is not None and not hasattr(param, "tensor_model_parallel"):
            # megatron-core (0.16) marks TP-split weights inside its initialization functions,
            # which perform_initialization=False skips; without the mark, gradient-norm
            # clipping counts these weights on TP rank 0 only.
            set_tensor_model_parallel_attributes(param, True, *split)
        if tied_embeddings and name == "output_layer.weight":
            # megatron-core's copy of the tied embedding on the last stage.
            name = "embedding.word_embeddings.weight"
        method = _init_method(name, config)
        if isinstance(method, float):
            param.fill_(method)
            continue
        # Drawn in float32 as megatron-core's CPU initialization, then cast to params_dtype.
        shape = full_shape(name, param.shape, swiglu=swiglu, tp_size=tp_size, vocab_rows=vocab_size)
        full = torch.empty(shape, dtype=torch.float32, device=param.device)
        generator = torch.Generator(device=param.device).manual_seed(parameter_seed(seed, name))
        method(full, generator=generator)
        param.copy_(shard_tensor(name, full, swiglu=swiglu, tp_rank=tp_rank, tp_size=tp_size,
                                 vocab_rows=padded_vocab_size))
        del full
