"""Normalization for the layer spec, usable with sequence parallelism.

megatron-core's local spec wraps ``torch.nn.LayerNorm``/``RMSNorm`` in ``WrappedTorchNorm``,
which refuses ``sequence_parallel=True``. With SP every TP rank normalizes a different slice of
the sequence, so the norm weights receive partial gradients; megatron-core's
``finalize_model_grads`` all-reduces exactly the parameters marked ``sequence_parallel``. This
factory builds the torch norm and sets that mark.
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}


class Norm:
    """Spec entry that builds ``torch.nn.RMSNorm``/``LayerNorm`` per ``config.normalization``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization not in _NORMS:
            raise ValueError(
                f"--normalization {config.normalization} is not supported; use RMSNorm or LayerNorm"
            )
        norm = _NORMS[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
