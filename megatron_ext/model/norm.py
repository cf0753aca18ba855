"""Normalization for the layer spec, usable with sequence parallelism.

megatron-core's local spec wraps ``torch.nn.LayerNorm``/``RMSNorm`` in ``WrappedTorchNorm``,
which refuses ``sequence_parallel=True``. With SP every TP rank normalizes a different slice of
the sequence, so the norm weights receive partial gradients; megatron-core's
``finalize_model_grads`` all-reduces exactly the parameters marked ``sequence_parallel``. This
factory builds the torch norm and sets that mark.

``--apply-layernorm-1p`` (megatron-core's ``layernorm_zero_centered_gamma``) stores the scale as
``weight - 1``: initialized to 0 and applied as ``1 + weight``, so weight decay pulls the scale
towards 1 rather than 0.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class _ZeroCenteredWeight:
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.elementwise_affine:
            torch.nn.init.zeros_(self.weight)


class _LayerNorm1p(_ZeroCenteredWeight, torch.nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class _RMSNorm1p(_ZeroCenteredWeight, torch.nn.RMSNorm):
    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)


_NORMS = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
_NORMS_1P = {"RMSNorm": _RMSNorm1p, "LayerNorm": _LayerNorm1p}


class Norm:
    """Spec entry that builds ``torch.nn.RMSNorm``/``LayerNorm`` per ``config.normalization``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization not in _NORMS:
            raise ValueError(
                f"--normalization {config.normalization} is not supported; use RMSNorm or LayerNorm"
            )
        norms = _NORMS_1P if config.layernorm_zero_centered_gamma else _NORMS
        norm = norms[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
