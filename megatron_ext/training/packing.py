"""Document boundaries of packed samples, from EOD tokens: the contract the training loop calls.

A packed micro-batch ``tokens[b, s]`` holds documents back to back, each ended by the EOD token
(``--append-eod`` at preprocessing). With ``--reset-position-ids`` / ``--reset-attention-mask``
every document must attend only to itself, exactly as if it were trained alone.

Conventions (MindSpeed-LLM's ``actual_seq_len``, flattened in (b, s) order):
- A document ends at (and includes) each EOD; the EOD belongs to the document it ends.
- Two EODs in a row give a document of length 1 that holds only the second EOD.
- The tail after a row's last EOD is a document of its own; a row always ends a document at
  its end, so no document spans two rows. A row that ends exactly on an EOD has no extra
  (empty) tail document.
- Row ``r`` is offset by ``r * s``: the ends index the (b, s)-flattened batch, which is what
  the model sees as one THD sequence of ``b * s`` tokens (``tokens.reshape(1, b * s)``).

From tokens every document therefore has length >= 1. A zero-length entry (the same end
twice, as in ``[2, 4, 4, 6, 8]`` from lengths ``[2, 2, 0, 2, 2]``) arises only when a caller
builds the ends from an explicit list of document lengths that contains a 0, e.g. a loader
that keeps a fixed number of document slots per row: ``cumulative_seq_len`` accepts it,
and every attention backend treats such a document as absent.

Everything here is vectorized over tokens; the only host synchronization is ``max_seqlen``,
which kernels need as a Python int.
"""

import torch
from megatron.core.packed_seq_params import PackedSeqParams

__all__ = [
    "actual_seq_len",
    "cumulative_seq_len",
    "cu_seqlens_from_actual_seq_len",
    "packed_seq_params",
    "packed_seq_params_from_actual_seq_len",
    "reset_position_ids",
]


def _check_tokens(tokens: torch.Tensor) -> None:
    if tokens.dim() != 2:
        raise ValueError(
            f"tokens must be [micro_batch, seq_length], got shape {tuple(tokens.shape)}")
    if tokens.size(1) == 0:
        raise ValueError("tokens has no columns (seq_length 0)")


def document_ends(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Bool ``[b, s]``: True where a document ends (an EOD, or the last column of a row)."""
    _check_tokens(tokens)
    ends = tokens == eod
    ends[:, -1] = True
    return ends


def actual_seq_len(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Cumulative document ends over the (b, s)-flattened batch, without a leading 0 (int64).

    ``tokens = [[a, E, b, b], [E, E, c, E]]`` (E = eod) -> ``[2, 4, 5, 6, 8]``.
    """
    return document_ends(tokens, eod).flatten().nonzero().squeeze(1) + 1


def cumulative_seq_len(lengths) -> torch.Tensor:
    """``actual_seq_len`` from document lengths, with zeros: [2, 2, 0, 2, 2] -> [2, 4, 4, 6, 8]"""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if lengths.dim() != 1 or (lengths < 0).any():
        raise ValueError(
            f"document lengths must be a 1-D list of counts >= 0, got {lengths.tolist()}")
    return lengths.cumsum(0)


def cu_seqlens_from_actual_seq_len(ends: torch.Tensor) -> torch.Tensor:
    """flash-attn style ``cu_seqlens``: int32, leading 0, on the ends' device."""
    ends = torch.as_tensor(ends)
    return torch.cat([ends.new_zeros(1), ends]).to(torch.int32)


def packed_seq_params_from_actual_seq_len(ends: torch.Tensor) -> PackedSeqParams:
    """``PackedSeqParams(qkv_format="thd")``: self-attention over documents ending at ``ends``."""
    cu_seqlens = cu_seqlens_from_actual_seq_len(ends)
    if cu_seqlens.numel() < 2:
        raise ValueError("no documents: actual_seq_len is empty")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if (lengths < 0).any():
        raise ValueError(f"actual_seq_len must be non-decreasing, got {ends.tolist()}")
    max_seqlen = int(lengths.max().item())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def packed_seq_params(tokens: torch.Tensor, eod: int) -> PackedSeqParams:
    """The ``packed_seq_params`` for ``GPTModel.forward`` on ``tokens.reshape(1, b * s)``."""
    return packed_seq_params_from_actual_seq_len(actual_seq_len(tokens, eod))


def reset_position_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """``[b, s]`` positions that restart at 0 after every EOD (and at the start of each row)."""
    _check_tokens(tokens)
    b, s = tokens.shape
    arange = torch.arange(s, device=tokens.device).expand(b, s)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eod
    doc_start = torch.where(starts, arange, torch.zeros_like(arange)).cummax(dim=1).values
    return arange - doc_start
