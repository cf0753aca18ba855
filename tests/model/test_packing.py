"""Hand-worked document boundaries of packed samples (megatron_ext.training.packing)."""

import torch

from megatron_ext.training.packing import (
    actual_seq_len,
    cumulative_seq_len,
    packed_seq_params,
    packed_seq_params_from_actual_seq_len,
    reset_position_ids,
)

E = 9  # EOD; documents use ids 1..8


def _t(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_one_row_length1_document_consecutive_eods_and_tail():
    # [1 2 E] [3 E] [E] [4 5]: a length-1 document (the second of two EODs) and a tail w/o EOD.
    tokens = _t([[1, 2, E, 3, E, E, 4, 5]])
    assert actual_seq_len(tokens, E).tolist() == [3, 5, 6, 8]
    params = packed_seq_params(tokens, E)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 8]
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == 3
    assert type(params.max_seqlen_q) is int
    assert reset_position_ids(tokens, E).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_micro_batch_rows_are_offset_and_never_share_a_document():
    tokens = _t([
        [1, E, 2, E],   # ends exactly on an EOD: no empty tail document
        [E, 3, 4, 5],   # a length-1 document first, then a tail with no EOD
        [6, 7, 8, E],   # one document filling the row
    ])
    assert actual_seq_len(tokens, E).tolist() == [2, 4, 5, 8, 12]
    params = packed_seq_params(tokens, E)
    assert params.cu_seqlens_q.tolist() == [0, 2, 4, 5, 8, 12]
    assert params.max_seqlen_q == 4
    assert reset_position_ids(tokens, E).tolist() == [[0, 1, 0, 1], [0, 0, 1, 2], [0, 1, 2, 3]]


def test_row_without_eod_and_row_of_only_eods():
    tokens = _t([[1, 2, 3], [E, E, E]])
    assert actual_seq_len(tokens, E).tolist() == [3, 4, 5, 6]
    assert packed_seq_params(tokens, E).max_seqlen_q == 3
    assert reset_position_ids(tokens, E).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_cumulative_from_lengths_keeps_zero_length_documents():
    # The example: lengths [2, 2, 0, 2, 2] -> [2, 4, 4, 6, 8]. From tokens a document is
    # never empty; a 0 comes only from explicit length lists (e.g. fixed document slots).
    ends = cumulative_seq_len([2, 2, 0, 2, 2])
    assert ends.tolist() == [2, 4, 4, 6, 8]
    params = packed_seq_params_from_actual_seq_len(ends)
    assert params.cu_seqlens_q.tolist() == [0, 2, 4, 4, 6, 8]
    assert params.max_seqlen_q == 2


def _slow_reference(tokens, eod):
    """Per-token loops, straight from the definitions."""
    b, s = tokens.shape
    ends, positions = [], []
    for r in range(b):
        pos, row = 0, []
        for c in range(s):
            row.append(pos)
            pos += 1
            if tokens[r, c] == eod or c == s - 1:
                ends.append(r * s + c + 1)
                pos = 0
        positions.append(row)
    return ends, positions


def test_vectorized_matches_per_token_definition_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for b, s, p_eod in [(1, 1, 0.5), (1, 17, 0.2), (3, 16, 0.3), (4, 33, 0.6), (2, 50, 0.0)]:
        tokens = torch.randint(1, E, (b, s), generator=g)
        tokens[torch.rand(b, s, generator=g) < p_eod] = E
        ends, positions = _slow_reference(tokens, E)
        assert actual_seq_len(tokens, E).tolist() == ends
        assert reset_position_ids(tokens, E).tolist() == positions
        params = packed_seq_params(tokens, E)
        lengths = torch.diff(torch.tensor([0] + ends))
        assert params.cu_seqlens_q.tolist() == [0] + ends
        assert params.max_seqlen_q == int(lengths.max())
