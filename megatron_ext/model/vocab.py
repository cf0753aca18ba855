"""The padded vocabulary rows never count: their logits are excluded before any softmax.

Megatron pads the vocabulary to a multiple of ``--make-vocab-size-divisible-by`` x TP (the rule
is kept: shapes stay those of Megatron-LM's checkpoints). megatron-core's vocab-parallel
cross-entropy takes every row of the padded output layer into its softmax, so the loss of the
same weights changes with TP (vocabulary 8000: 8064 rows at TP=1, 8192 at TP=2, about
log(8192/8064) = 1.6e-2 nats at initialization), and a converted HF model's loss is not the HF
model's loss. Setting the padded rows' logits to -inf makes them contribute exp(-inf) = 0 to
the softmax and receive zero gradient, in every layout and precision.

``mask_padded_logits_`` is the one place that knows which logits are padding: the loss uses
it, and so must anything that samples or ranks tokens from the model's logits.
"""

import torch


def mask_padded_logits_(logits: torch.Tensor, vocab_size: int, first_row: int = 0) -> torch.Tensor:
    """Set to -inf, in place, the logits of vocabulary rows >= ``vocab_size`` (the padding).

    ``logits[..., j]`` is the logit of row ``first_row + j``: ``first_row`` is 0 for gathered
    logits and ``tp_rank * logits.size(-1)`` for a TP rank's vocab partition. In place so that
    no second copy of the (large) logits exists; autograd records it (the masked logits get a
    zero gradient). Returns ``logits``.
    """
    real = min(max(vocab_size - first_row, 0), logits.size(-1))
    if real < logits.size(-1):
        logits[..., real:] = float("-inf")
    return logits
