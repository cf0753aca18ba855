"""Padded vocabulary rows never count: megatron-core's vocab-parallel cross-entropy over masked
logits equals the cross-entropy over the real vocabulary alone, at TP=2, in every precision."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.model.vocab import mask_padded_logits_
from tests.launcher import launch

VOCAB, PADDED = 300, 512  # the second TP rank's partition (256..511) holds 212 padded rows


def _logits():
    gen = torch.Generator().manual_seed(0)
    return 3 * torch.randn(6, 2, PADDED, generator=gen), torch.randint(0, VOCAB, (6, 2), generator=gen)


def _rank_loss(dtype):
    """On each TP rank: its vocab partition of the logits, masked, through megatron-core."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_ext import platform

    platform.apply()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    logits, labels = _logits()
    part = logits.to(dtype)[..., rank * PADDED // 2:(rank + 1) * PADDED // 2].clone()
    part.requires_grad_(True)
    masked = mask_padded_logits_(part.clone(), VOCAB, first_row=rank * PADDED // 2)
    loss = tensor_parallel.vocab_parallel_cross_entropy(masked, labels)
    loss.sum().backward()
    parallel_state.destroy_model_parallel()
    return loss.detach().float(), part.grad.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_vocab_parallel_loss_is_the_real_vocabulary_loss(dtype):
    logits, labels = _logits()
    real = logits.to(dtype).float()[..., :VOCAB].requires_grad_(True)
    expected = F.cross_entropy(real.transpose(1, 2), labels, reduction="none")
    expected.sum().backward()
    results = launch(_rank_loss, 2, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    grads = torch.cat([grad for _, grad in results], dim=-1)
    for loss, _ in results:
        torch.testing.assert_close(loss, expected.detach(), **tol)
    torch.testing.assert_close(grads[..., :VOCAB], real.grad, **tol)
    assert torch.count_nonzero(grads[..., VOCAB:]) == 0  # padded rows get no gradient
    # The control: without the mask the 212 padded logits take part in the softmax.
    unmasked = F.cross_entropy(logits.to(dtype).float().transpose(1, 2), labels, reduction="none")
    assert not torch.allclose(unmasked, expected.detach(), **tol)


def test_mask_covers_only_rows_past_the_vocabulary():
    logits = torch.zeros(2, 8)
    mask_padded_logits_(logits, vocab_size=7, first_row=4)  # rows 4..11: 4..6 real, 7..11 padded
    assert logits.tolist() == [[0, 0, 0] + [float("-inf")] * 5] * 2
    untouched = torch.zeros(2, 8)
    mask_padded_logits_(untouched, vocab_size=300, first_row=0)
    assert torch.count_nonzero(untouched) == 0
