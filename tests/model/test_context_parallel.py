"""Context-parallel attention: re-assembled from the CP ranks, each document is what it gives
when run alone, with every --cp-comm-type (allgather, a2a, p2p, a2a+p2p).

Every CP rank (gloo, forked) takes its chunks of the same global q/k/v (``shard_batch``'s
layout), runs our ``CoreAttention`` and back-propagates a fixed random cotangent; the parent
puts the outputs and the q/k/v gradients back at their global positions and compares them with
the plain masked-softmax math of each document alone (``_reference``, computed here, independent
of the varlen kernels and of ``shard_batch``).
"""

import os
import sys
import types

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext import platform
from megatron_ext.model import attention
from megatron_ext.model import attention_backends
from megatron_ext.model.attention import CoreAttention
from megatron_ext.model.context_parallel import local_columns, shard_batch
from megatron_ext.training.packing import packed_seq_params_from_actual_seq_len
from tests.launcher import launch
from tests.model.test_attention import _reference

S, HEADS, GROUPS, DIM = 32, 4, 2, 8
# Per row of 32 tokens: with CP=4 (chunks of 4) documents cross every chunk boundary in some
# row, start exactly on one (12, 28), are shorter than a chunk (1, 1, 3), and one (row 1,
# 0..19) has tokens on every CP rank. CP=2 (chunks of 8) sees the same rows.
ROWS = [[3, 9, 1, 1, 14, 4], [20, 5, 7]]
# A row of 1-token documents (every other rank's block masked out for it: the block still runs
# for the next row, where it has log-sum-exp -inf and weight 0) beside one document over the
# whole row; a single row of 4 documents that start exactly on CP=4 rank boundaries.
TINY_AND_WHOLE, ON_RANKS = [[1] * S, [S]], [[4, 8, 8, 12]]


def _inputs(seed=0, groups=GROUPS, rows=ROWS):
    g = torch.Generator().manual_seed(seed)
    b = len(rows)
    q, k, v = (torch.randn(S, b, n, DIM, generator=g) for n in (HEADS, groups, groups))
    cotangent = torch.randn(S, b, HEADS * DIM, generator=g)
    return q, k, v, cotangent


def _rank(cp, packed, backend, inputs, scheme="allgather", rows=ROWS, hierarchical=None):
    from megatron.core import parallel_state

    platform.apply()
    torch.distributed.init_process_group("gloo", world_size=cp, rank=int(os.environ["RANK"]))
    parallel_state.initialize_model_parallel(context_parallel_size=cp,
                                             hierarchical_context_parallel_sizes=hierarchical)
    platform.manual_seed(1)
    group = parallel_state.get_context_parallel_group()
    groups = (tuple(parallel_state.get_hierarchical_context_parallel_groups())
              if hierarchical else None)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=inputs[1].size(2), context_parallel_size=cp,
                               hierarchical_context_parallel_sizes=hierarchical,
                               attention_dropout=0.0)
    core = CoreAttention(config, 1, AttnMaskType.causal, "self", cp_comm_type=scheme,
                         backend="sdpa")
    core.backend = backend  # "flash": the fake kernel installed by the test before the fork
    b = len(rows)
    params = None
    if packed:
        ends = torch.tensor([r * S + x for r, row in enumerate(rows) for x in
                             torch.tensor(row).cumsum(0).tolist()])
        params = packed_seq_params_from_actual_seq_len(ends)
    _, cp_params = shard_batch({"tokens": torch.zeros(b, S, dtype=torch.long)}, params, group,
                               groups)
    columns = local_columns(S, cp, group.rank())
    q, k, v, cotangent = inputs
    q, k, v = (x.index_select(0, columns).requires_grad_() for x in (q, k, v))
    out = core(q, k, v, None, packed_seq_params=cp_params)
    out.backward(cotangent.index_select(0, columns))
    return columns, out.detach(), q.grad, k.grad, v.grad


def _assembled(results):
    full = [torch.zeros(S, *x.shape[1:]) for x in results[0][1:]]
    for columns, *tensors in results:
        for whole, part in zip(full, tensors):
            whole[columns] = part
    return full


def _expected(packed, inputs, rows=ROWS):
    """Each document alone (each row alone without packing), by masked-softmax math."""
    q, k, v, cotangent = (x.clone().requires_grad_(i < 3) for i, x in enumerate(inputs))
    outs = []
    for row, lengths in enumerate(rows):
        out = _reference(q[:, row], k[:, row], v[:, row], lengths if packed else [S])
        outs.append(out.reshape(S, -1))
    out = torch.stack(outs, dim=1)
    out.backward(cotangent)
    return out.detach(), q.grad, k.grad, v.grad


def _check(cp, packed, backend="sdpa", scheme="allgather", groups=GROUPS, rows=ROWS,
           hierarchical=None):
    inputs = _inputs(groups=groups, rows=rows)
    actual = _assembled(launch(_rank, cp, cp, packed, backend, inputs, scheme, rows,
                               hierarchical))
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, _expected(packed, inputs, rows)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("packed", [True, False], ids=["documents", "plain-causal"])
def test_context_parallel_attention_equals_each_document_alone(cp, packed):
    _check(cp, packed)


@pytest.mark.parametrize("cp, groups", [(2, GROUPS), (4, HEADS)], ids=["cp2-gqa", "cp4-mha"])
@pytest.mark.parametrize("packed", [True, False], ids=["documents", "plain-causal"])
def test_all_to_all_attention_equals_each_document_alone(packed, cp, groups):
    """--cp-comm-type a2a: at CP=2 2 query heads and 1 KV group per rank (GQA 4/2 halved); at
    CP=4 one head per rank (4 heads, 4 groups)."""
    _check(cp, packed, scheme="a2a", groups=groups)


@pytest.mark.parametrize("sizes, groups", [([2, 2], GROUPS), ([4, 1], HEADS), ([1, 4], GROUPS)],
                         ids=["2x2-gqa", "4x1-mha", "1x4-gqa"])
@pytest.mark.parametrize("packed, rows", [(True, ROWS), (False, ROWS), (True, ON_RANKS)],
                         ids=["documents", "plain-causal", "on-ranks"])
def test_hierarchical_attention_equals_each_document_alone(packed, rows, sizes, groups):
    """--cp-comm-type a2a+p2p at CP=4: 2 x 2, the all-to-all within CP ranks {0, 1} and
    {2, 3} (2 query heads and 1 KV group each), the ring over {0, 2} and {1, 3} passing the
    column sets of chunks 0, 7, 1, 6 and 2, 5, 3, 4; 4 x 1 (all-to-all only, one head per
    rank) and 1 x 4 (the ring only) the degenerate ends."""
    _check(4, packed, scheme="a2a+p2p", groups=groups, rows=rows, hierarchical=sizes)


def _fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                causal=False):
    """flash-attn 2's contract as the CP path must use it; bottom-right causal by plain math."""
    assert causal and dropout_p == 0.0
    assert cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
    assert int(cu_q[-1]) == q.size(0) and int(cu_k[-1]) == k.size(0) == v.size(0)
    q_len, k_len = torch.diff(cu_q), torch.diff(cu_k)
    assert max_q == int(q_len.max()) and max_k == int(k_len.max()) and (k_len >= q_len).all()
    groups = q.size(1) // k.size(1)
    outs = []
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(),
                              cu_k[1:].tolist()):
        kd, vd = (x[ks:ke].repeat_interleave(groups, dim=1) for x in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe], kd) * q.size(-1) ** -0.5
        allowed = torch.ones(qe - qs, ke - ks, dtype=torch.bool).tril(ke - ks - (qe - qs))
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, vd))
    return torch.cat(outs)


def _fake_torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                       scale=None, window_size=(-1, -1), enable_gqa=False):
    assert window_size == (-1, 0) and enable_gqa
    return _fake_flash(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale,
                       causal=True)


@pytest.mark.parametrize("scheme", ["allgather", "a2a"])
@pytest.mark.parametrize("backend", ["flash", "torch"])
def test_gpu_backends_get_the_bottom_right_varlen_contract(monkeypatch, backend, scheme):
    """The GPU kernels' arguments on the CPU: fakes that check them, installed before the fork."""
    monkeypatch.setattr(attention_backends, "_require_gpu_half", lambda q, backend: None)
    if backend == "flash":
        monkeypatch.setattr(attention_backends, "_flash_kernel", lambda: _fake_flash)
    else:
        module = types.ModuleType("torch.nn.attention.varlen")
        module.varlen_attn = _fake_torch_varlen
        monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", module)
        attention_backends._torch_varlen_kernel.cache_clear()
    try:
        _check(2, True, backend=backend, scheme=scheme)
    finally:
        attention_backends._torch_varlen_kernel.cache_clear()


def test_scheme_per_layer_and_the_heads_a2a_splits():
    """--cp-comm-type per layer by the layer's global number (megatron-core's, from 1);
    a2a needs the heads and KV groups divisible by CP."""
    config = TransformerConfig(num_layers=4, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, context_parallel_size=2)
    spec = attention.core_attention_spec("sdpa", ["a2a", "allgather", "allgather", "a2a"])
    assert [spec(config, n, AttnMaskType.causal, "self").cp_scheme for n in (1, 2, 3, 4)] == [
        "a2a", "allgather", "allgather", "a2a"]
    config.context_parallel_size = 4  # 2 KV groups over 4 ranks
    with pytest.raises(ValueError, match=r"--cp-comm-type a2a splits .* --num-query-groups 2 / "
                                         r"--tensor-model-parallel-size 1 = 2 is not divisible by "
                                         r"--context-parallel-size 4.* --cp-comm-type allgather"):
        attention.core_attention_spec("sdpa", ["a2a"])(config, 1, AttnMaskType.causal, "self")
    # a2a+p2p splits the heads over the first of the hierarchical sizes only.
    config.hierarchical_context_parallel_sizes, config.attention_dropout = [2, 2], 0.0
    spec = attention.core_attention_spec("sdpa", ["a2a+p2p"])
    assert spec(config, 1, AttnMaskType.causal, "self").cp_scheme == "a2a+p2p"
    config.hierarchical_context_parallel_sizes = [4, 1]
    with pytest.raises(ValueError, match=r"--cp-comm-type a2a\+p2p splits .* --num-query-groups "
                                         r"2 / --tensor-model-parallel-size 1 = 2 is not "
                                         r"divisible by the all-to-all size 4 \(the first of "
                                         r"--hierarchical-context-parallel-sizes 4 1\)"):
        spec(config, 1, AttnMaskType.causal, "self")
    config.hierarchical_context_parallel_sizes = None
    with pytest.raises(ValueError, match=r"a2a\+p2p needs --hierarchical-context-parallel-sizes "
                                         r"A B with A x B = --context-parallel-size 4, got None"):
        spec(config, 1, AttnMaskType.causal, "self")


class _Rank:
    """The two methods shard_batch asks of a process group, for checks that need no ranks."""

    def __init__(self, size, rank):
        self.size, self.rank = (lambda: size), (lambda: rank)


def test_layout_errors_name_the_flags_and_the_rows():
    with pytest.raises(ValueError, match=r"--seq-length 30 .* 2 x --context-parallel-size \(8\)"):
        local_columns(30, 4, 0)
    across_rows = packed_seq_params_from_actual_seq_len(torch.tensor([20, 48, 64]))
    with pytest.raises(ValueError, match=r"documents across rows \(no boundary at \[32\]\)"):
        shard_batch({"tokens": torch.zeros(2, S, dtype=torch.long)}, across_rows, _Rank(2, 0))


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("packed, rows", [(True, ROWS), (False, ROWS), (True, TINY_AND_WHOLE),
                                          (True, ON_RANKS)],
                         ids=["documents", "plain-causal", "tiny-and-whole", "on-ranks"])
def test_ring_attention_equals_each_document_alone(cp, packed, rows):
    """--cp-comm-type p2p: GQA 4 heads / 2 groups, micro-batch 2 (ON_RANKS: 1)."""
    _check(cp, packed, scheme="p2p", rows=rows)


def test_ring_attention_mha_cp4():
    """p2p with as many KV groups as heads (each query head its own group)."""
    _check(4, True, scheme="p2p", groups=HEADS)


def _ring_blocks(rows, cp, rank):
    params = packed_seq_params_from_actual_seq_len(torch.tensor(
        [r * S + x for r, row in enumerate(rows) for x in torch.tensor(row).cumsum(0).tolist()]))
    tokens = torch.zeros(len(rows), S, dtype=torch.long)
    return shard_batch({"tokens": tokens}, params, _Rank(cp, rank))[1].ring_blocks


def test_ring_computes_only_the_visible_part_of_each_block():
    """One part per (local chunk, source chunk) pair that a query sees: load balancing leaves
    an earlier rank's block two of four parts (its first chunk), a later rank's two (the second
    local chunk), the own block three (the first local chunk sees no future chunk); with
    1-token documents only the diagonal chunks remain, and other ranks' blocks are skipped."""
    c = S // 8
    local = [list(range(c)), list(range(c, 2 * c))]  # the two local chunks' rows/keys

    def pairs(block):
        return [(part[0].tolist(), part[1].tolist()) for part in block]

    blocks = _ring_blocks([[S]], 4, 1)  # rank 1 holds chunks 1 and 6
    assert pairs(blocks[0]) == [(local[0], local[0]), (local[1], local[0])]  # chunks 0, 7
    assert pairs(blocks[2]) == [(local[1], local[0]), (local[1], local[1])]  # chunks 2, 5
    assert pairs(blocks[1]) == [(local[0], local[0]), (local[1], local[0]), (local[1], local[1])]
    tiny = _ring_blocks([[1] * S], 4, 1)
    assert [len(block) for block in tiny] == [0, 2, 0, 0]
    # Documents of 3 and 29 tokens: chunk 1 (columns 4-7) lies inside the second, which began
    # in chunk 0: all of chunk 0's keys but the first document's are seen from chunk 1.
    (rows, cols, *_), _ = _ring_blocks([[3, 29]], 4, 1)[0]
    assert rows.tolist() == local[0] and cols.tolist() == [3]


def test_ring_refuses_attention_dropout():
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               context_parallel_size=2, attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"--cp-comm-type p2p .* --attention-dropout 0 \(now "
                                         r"0.1\)"):
        CoreAttention(config, 1, AttnMaskType.causal, "self", cp_comm_type="p2p", backend="sdpa")


def test_ring_attention_in_bf16():
    """bf16 q/k/v (the GPU training dtype): the K/V blocks travel in bf16, dK/dV in float32,
    outputs and gradients come back in bf16 within its rounding of the float32 reference."""
    inputs = _inputs()
    results = launch(_rank, 2, 2, True, "sdpa", tuple(x.bfloat16() for x in inputs), "p2p")
    assert all(x.dtype == torch.bfloat16 for _, *tensors in results for x in tensors)
    actual = _assembled([(columns, *(x.float() for x in tensors))
                         for columns, *tensors in results])
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, _expected(True, inputs)):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=3e-2, msg=lambda m: f"{name}: {m}")
