"""The language-model loss of one micro-batch, as megatron-core's schedules take it.

``masked_loss`` returns Megatron-LM's triple: the summed per-token loss, the token count, and
``{"lm loss": [sum, count]}`` for logging (the trainer adds these over micro-batches, DP and CP
ranks, so every trained token counts once in the logged mean).

With ``--calculate-per-token-loss`` megatron-core keeps the sum, all-reduces the token count
over DP x CP (``finalize_model_grads``) and divides the gradients by it: the global per-token
mean, whatever the layout. Without it (the default) megatron-core divides each micro-batch's sum
by the count this rank returned, and DDP averages gradients over DP x CP ranks. Under context
parallelism a rank holds only its chunks of each sequence, so that would be the mean over the
rank's own tokens, whose counts differ between CP ranks (documents, masked prompts): not the
sequence's mean. ``masked_loss`` rescales the sum so that, after megatron-core's division and
DDP's average over CP ranks, each micro-batch contributes ``sum over its CP ranks / all its
tokens``, exactly as the same micro-batch on one rank: ``CP x local count / sequence count``.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def sequence_share(num_tokens: torch.Tensor, per_token_loss: bool) -> torch.Tensor | float:
    """The factor for this rank's loss sum: ``CP x max(local, 1) / max(all CP ranks', 1)``
    (megatron-core divides by ``max(local, 1)``); 1 without CP or with per-token loss."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1 or per_token_loss:
        return 1.0
    total = num_tokens.detach().clone()
    dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
    return cp * num_tokens.clamp(min=1).float() / total.clamp(min=1).float()


def masked_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor, per_token_loss: bool):
    """(loss for megatron-core, token count, {"lm loss": [sum, count]}) of one micro-batch."""
    loss_mask = loss_mask.float()
    loss_sum = torch.sum(output_tensor.float() * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum * sequence_share(num_tokens, per_token_loss), num_tokens, {"lm loss": report}
