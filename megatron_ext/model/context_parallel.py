"""Context parallelism (``--context-parallel-size``): each sequence is split over the CP ranks.

Interface (``pretrain_gpt.get_batch`` calls it once per micro-batch, on every pipeline stage)::

    from megatron_ext.model.context_parallel import shard_batch
    local, params = shard_batch(batch, packed_seq_params, cp_group)
    output = model(local["tokens"], local["position_ids"], None, labels=local["labels"],
                   packed_seq_params=params)          # output/loss: [b, s / CP], local tokens

- ``batch``: the global micro-batch, ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
  ``[b, s]`` (rows, *not* flattened to ``[1, b * s]``); other entries are passed on unchanged.
- ``packed_seq_params``: ``None`` (plain causal: each row is one document) or the global THD
  params of ``megatron_ext.training.packing`` over the (b, s)-flattened batch (``--reset-
  position-ids`` / instruction data); every row end must be a document end (it is, by
  construction there).
- ``cp_group``: the CP process group (``parallel_state.get_context_parallel_group()``).
- Returns ``local``: the per-token entries (``SHARDED``) ``[b, s / CP]``, the columns
  ``local_columns(s, CP, rank)`` of every row; and a ``ContextParallelParams`` for ``GPTModel.forward`` (our
  ``model.gpt.GPTModel`` takes RoPE from it, our ``CoreAttention`` the attention layout).

What the training loop must do around it: give the CP ranks of a DP rank the same micro-batch;
pass ``seq_length=s, micro_batch_size=b`` (not the flattened ``b * s, 1`` of the CP=1 packed
path) to ``get_forward_backward_func``, which divides ``s`` by CP itself for the pipeline's
``[s / CP, b, h]`` activations; sum the loss and its token count over the CP group (each rank
holds part of the tokens); reduce gradients over DP x CP (megatron-core's DDP does, from
``parallel_state``'s CP groups). tests/model/test_context_parallel_model.py runs PP=2 x CP=2
through megatron-core's schedule.

Layout (Megatron's load balancing for causal attention): each row of ``s`` tokens is cut into
``2 * CP`` chunks of ``c = s / (2 * CP)`` tokens; CP rank ``r`` holds chunks ``r`` and
``2 * CP - 1 - r``, in that order, so every rank has the same causal work. Every row is cut the
same way (micro-batch > 1), and documents cross chunk boundaries freely: no document is padded
and the data is unchanged.

Attention (``--cp-comm-type allgather``, exact): each rank all-gathers K and V of the whole row
over the CP group (megatron-core's ``gather_from_sequence_parallel_region``: its backward
reduce-scatters dK/dV) and attends with its local queries. The keys a local chunk's queries need
are one contiguous slice of the row, ``[start of the document holding the chunk's first token,
end of the chunk)``; the chunk's queries cut at document starts, each piece against its own
document's keys up to the piece's end, causal aligned bottom-right: one varlen call for all
pieces of all chunks and rows (``q_cu_seqlens`` / ``kv_cu_seqlens``), with ``kv_index``
picking the slices out of the gathered K/V.

Attention (``--cp-comm-type a2a``, Ulysses-style, exact): an all-to-all over the CP group
(``scatter_heads``, megatron-core's ``all_to_all``: its backward is the inverse all-to-all)
trades heads for sequence: each rank then holds the whole rows of ``heads / CP`` query heads and
``groups / CP`` KV groups, its columns in the gathered order of the allgather path (rank after
rank, each rank's two chunks), put back in column order by ``row_order``. The attention is the
one of CP=1 (each document over ``row_cu_seqlens`` of the whole (b, s)-flattened rows, or plain
causal), and ``gather_heads`` sends every rank its columns of all heads back. Needs the heads
and groups per TP rank divisible by CP (config/parallel.py's ``a2a_heads_error``); layers may
mix the schemes.

Attention (``--cp-comm-type p2p``, ring, exact): model/ring_attention.py passes K/V blocks
around the CP group and merges the partial outputs by log-sum-exp; ``ring_blocks``
(``_ring_layout``) names per source rank and (local chunk, source chunk) pair the local queries
and the block's keys that take part (from the document ranges: a query sees ``[its
document's start, its column]``), with their global columns and document starts for the mask.

Attention (``--cp-comm-type a2a+p2p``, hierarchical, exact): ``shard_batch``'s
``hierarchical_groups`` are megatron-core's (inner, outer) sub-groups of
``--hierarchical-context-parallel-sizes A B``: CP rank r is rank ``r % A`` of the inner group
of ranks ``A * (r // A)`` onwards and rank ``r // A`` of the outer group of the ranks ``r % A``
(mod A). The all-to-all within the inner group (``scatter_heads`` without ``row_order``) gives
each rank its inner group's columns, rank after rank, for heads / A heads (the same heads on
every rank of an outer group); the ring over the outer group passes those column sets:
``hierarchical_blocks`` is ``_ring_layout`` over the outer members' chunks.

RoPE: megatron-core's own CP RoPE (``get_pos_emb_on_this_cp_rank``, and the THD path with a
CP group) assumes Transformer Engine's split of every *document* into 2 * CP chunks, which is
not this layout. So q/k/v stay ``[s / CP, b, heads, dim]`` (``qkv_format="sbhd"``: megatron-core
applies RoPE position by position) and ``rotary_positions`` holds each local token's global
rotary position: its position in its document when packed (megatron-core's THD RoPE restarts
at every document), its column in the row otherwise.
"""

import bisect
import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_ext.config.parallel import a2a_heads_error

__all__ = ["ContextParallelParams", "gather_heads", "layer_scheme", "local_columns",
           "rotary_embedding", "scatter_heads", "shard_batch"]

# --cp-comm-type values our CoreAttention implements, with megatron-core's spelling of
# allgather (None: its TransformerConfig default, which is ours).
_CP_SCHEMES = {None: "allgather", "all_gather": "allgather", "allgather": "allgather",
               "a2a": "a2a", "p2p": "p2p", "a2a+p2p": "a2a+p2p"}
# Per-token entries, cut like the tokens; task_ids and loss_weight come with multi-task
# instruction data (training/multitask.py).
SHARDED = ("tokens", "labels", "loss_mask", "position_ids", "task_ids", "loss_weight")


@dataclass
class ContextParallelParams(PackedSeqParams):
    """``PackedSeqParams`` of a context-parallel micro-batch (built by ``shard_batch``).

    megatron-core's attention reads ``qkv_format`` only ("sbhd": none of its THD paths);
    ``cp_group`` is the group that sharded the batch; the rest is ours.
    """

    qkv_format: str = "sbhd"
    rotary_positions: torch.Tensor = None  # [b, s / CP] int64: global RoPE position per token
    q_cu_seqlens: torch.Tensor = None  # int32: query pieces of the (b, s / CP)-flattened tokens
    kv_cu_seqlens: torch.Tensor = None  # int32: their key ranges, in kv_index order
    q_max_seqlen: int = None
    kv_max_seqlen: int = None
    kv_index: torch.Tensor = None  # int64: rows of the gathered K/V [s * b, ...] (s-major)
    # --cp-comm-type a2a: the whole rows after the all-to-all.
    row_order: torch.Tensor = None  # int64 [s]: the gathered row holding each column
    row_cu_seqlens: torch.Tensor = None  # int32: documents of the (b, s)-flattened rows; None:
    row_max_seqlen: int = None  # one per row (plain causal)
    # The columns where a document starts, per row: the ring layouts below are built from them
    # on first use, so a model without p2p layers never builds them.
    document_starts: list = None
    # --cp-comm-type a2a+p2p: megatron-core's hierarchical CP groups (inner: the all-to-all,
    # outer: the ring).
    hierarchical_groups: tuple = None

    @functools.cached_property
    def ring_blocks(self) -> tuple:
        """--cp-comm-type p2p (model/ring_attention.py): per source CP rank j, the parts of j's
        block to compute (none: skipped), one per (local chunk, j's chunk) pair that a query
        sees: (rows, cols, q_column, q_document, k_column, k_document), the local queries and
        j's keys that take part, their global columns [n] and their document's start per row
        [b, n]."""
        cp = self.cp_group.size()
        members = [_rank_chunks(cp, r) for r in range(cp)]
        return _to(_ring_layout(self.document_starts, len(self.row_order), cp, members,
                                self.cp_group.rank()), self.row_order.device)

    @functools.cached_property
    def hierarchical_blocks(self) -> tuple:
        """--cp-comm-type a2a+p2p: ``ring_blocks`` for the inner groups' column sets around the
        outer ring."""
        cp = self.cp_group.size()
        return _to(_ring_layout(self.document_starts, len(self.row_order), cp,
                                *_hierarchical_members(self.hierarchical_groups, cp,
                                                       self.cp_group.rank())),
                   self.row_order.device)


def local_columns(seq_length: int, cp_size: int, cp_rank: int,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Columns of a row held by CP rank ``cp_rank``: chunks ``r`` and ``2 * CP - 1 - r``."""
    if seq_length % (2 * cp_size):
        raise ValueError(f"--seq-length {seq_length} must be divisible by 2 x "
                         f"--context-parallel-size ({2 * cp_size}) for the load-balanced layout")
    c = seq_length // (2 * cp_size)
    first, second = cp_rank * c, (2 * cp_size - 1 - cp_rank) * c
    return torch.cat([torch.arange(first, first + c, device=device),
                      torch.arange(second, second + c, device=device)])


def _row_order(seq_length: int, cp_size: int) -> torch.Tensor:
    """Each column's row in a tensor gathered over the CP group (rank after rank)."""
    return torch.argsort(torch.cat([local_columns(seq_length, cp_size, r)
                                    for r in range(cp_size)]))


def _document_bounds(packed: Optional[PackedSeqParams], b: int, s: int) -> list:
    """The sorted document boundaries of the (b, s)-flattened rows (None: one per row)."""
    if packed is None:
        return None
    bounds = sorted(set(packed.cu_seqlens_q.tolist()))
    if bounds[0] != 0 or bounds[-1] != b * s:
        raise ValueError(f"packed_seq_params covers tokens {bounds[0]}..{bounds[-1]}, but the "
                         f"micro-batch has {b} x {s}")
    missing = [r * s for r in range(1, b) if r * s not in bounds]
    if missing:
        raise ValueError(f"packed_seq_params has documents across rows (no boundary at "
                         f"{missing}): each row must end a document")
    return bounds


def _document_starts(bounds: Optional[list], b: int, s: int) -> list:
    """Per row, the sorted columns where a document starts (always including 0)."""
    if bounds is None:
        return [[0] for _ in range(b)]
    starts = [[] for _ in range(b)]
    for x in bounds[:-1]:
        starts[x // s].append(x % s)
    return starts


def _attention_layout(starts: list, gathered_row: torch.Tensor, cp_size: int, cp_rank: int):
    """(q_cu, kv_cu, q_max, kv_max, kv_index, rotary positions) for this rank; see the module
    docstring. Gathered K/V are [s, b, ...] in rank order (each rank's two chunks),
    ``gathered_row`` the ``_row_order`` of their columns."""
    s = len(gathered_row)
    b, c = len(starts), s // (2 * cp_size)
    q_cu, kv_cu, kv_index, rotary = [0], [0], [], []
    for row, row_starts in enumerate(starts):
        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            lo, hi = chunk * c, (chunk + 1) * c
            first = row_starts[bisect.bisect_right(row_starts, lo) - 1]  # document holding lo
            inner = row_starts[bisect.bisect_right(row_starts, lo):bisect.bisect_left(
                row_starts, hi)]
            q_base, kv_base = q_cu[-1], kv_cu[-1]
            q_cu += [q_base + x - lo for x in inner + [hi]]
            kv_cu += [kv_base + x - first for x in inner + [hi]]
            kv_index.append(gathered_row[first:hi] * b + row)
            doc_start = torch.tensor([first] + inner).repeat_interleave(
                torch.diff(torch.tensor([lo] + inner + [hi])))
            rotary.append(torch.arange(lo, hi) - doc_start)
    q_lengths, kv_lengths = torch.diff(torch.tensor(q_cu)), torch.diff(torch.tensor(kv_cu))
    return (torch.tensor(q_cu, dtype=torch.int32), torch.tensor(kv_cu, dtype=torch.int32),
            int(q_lengths.max()), int(kv_lengths.max()), torch.cat(kv_index),
            torch.cat(rotary).view(b, 2 * c))


def _ring_layout(starts: list, s: int, cp_size: int, members: list, me: int) -> tuple:
    """``ContextParallelParams.ring_blocks`` for ring member ``me``: ``members`` are the chunks
    each member of the ring holds, in its order (p2p: each CP rank's two; a2a+p2p: those of
    the ranks of an inner group, rank after rank), one part per (local chunk, source chunk)
    pair. A query sees the keys of ``[start of its document, its column]``, a key is seen by
    the queries of ``[its column, end of its document)``: a query (key) takes part if that
    range meets the other chunk, in some row of the micro-batch."""
    c = s // (2 * cp_size)
    column = torch.arange(s)
    bounds = [torch.tensor(row + [s]) for row in starts]
    doc_start = torch.stack([b[torch.searchsorted(b, column, right=True) - 1] for b in bounds])
    doc_last = torch.stack([b[torch.searchsorted(b, column, right=True)] - 1 for b in bounds])

    def meets(lo, hi, chunk):  # which of the [b, c] ranges [lo, hi] meet chunk, in some row
        return (lo.clamp_min(chunk * c) <= hi.clamp_max(chunk * c + c - 1)).any(0)

    def columns(chunks):
        return torch.cat([torch.arange(k * c, k * c + c) for k in chunks])

    q_col = columns(members[me])
    blocks = []
    for source in members:
        k_col, parts = columns(source), []
        for qi, q_chunk in enumerate(members[me]):
            for ki, k_chunk in enumerate(source):
                qc, kc = q_col[qi * c:(qi + 1) * c], k_col[ki * c:(ki + 1) * c]
                rows = meets(doc_start[:, qc], qc.expand(len(starts), -1), k_chunk).nonzero()
                cols = meets(kc.expand(len(starts), -1), doc_last[:, kc], q_chunk).nonzero()
                if len(rows) and len(cols):
                    rows, cols = rows[:, 0] + qi * c, cols[:, 0] + ki * c
                    parts.append((rows, cols, q_col[rows], doc_start[:, q_col[rows]],
                                  k_col[cols], doc_start[:, k_col[cols]]))
        blocks.append(tuple(parts))
    return tuple(blocks)


def _rank_chunks(cp_size: int, rank: int) -> tuple:
    return (rank, 2 * cp_size - 1 - rank)


def _hierarchical_members(groups: tuple, cp_size: int, cp_rank: int) -> Tuple[list, int]:
    """(the chunks of each outer ring member, this rank's member) for megatron-core's
    hierarchical CP groups (``create_hierarchical_groups``): the inner group of CP rank r is
    ranks ``A * (r // A)`` onwards, its rank ``r % A``; the outer one ranks ``r % A`` + multiples
    of A, its rank ``r // A``."""
    inner, outer = groups
    a, b = inner.size(), outer.size()
    if a * b != cp_size or inner.rank() != cp_rank % a or outer.rank() != cp_rank // a:
        raise ValueError(f"hierarchical CP groups of sizes {a} x {b} (rank {inner.rank()}, "
                         f"{outer.rank()}) do not match CP rank {cp_rank} of {cp_size}: pass "
                         "parallel_state.get_hierarchical_context_parallel_groups()")
    return ([tuple(k for r in range(g * a, g * a + a) for k in _rank_chunks(cp_size, r))
             for g in range(b)], outer.rank())


def _to(blocks: tuple, device) -> tuple:
    return tuple(tuple(tuple(x.to(device) for x in part) for part in block) for block in blocks)


def shard_batch(batch: dict, packed_seq_params: Optional[PackedSeqParams], cp_group,
                hierarchical_groups: Optional[tuple] = None) -> Tuple[dict, ContextParallelParams]:
    """This CP rank's part of a global micro-batch and the params for ``GPTModel.forward``
    (``hierarchical_groups``: megatron-core's (inner, outer) CP groups, for a2a+p2p layers)."""
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    tokens = batch["tokens"]
    if tokens.dim() != 2:
        raise ValueError(f"shard_batch takes [micro_batch, seq_length] rows, got "
                         f"{tuple(tokens.shape)}")
    b, s = tokens.shape
    columns = local_columns(s, cp_size, cp_rank, device=tokens.device)
    local = dict(batch)
    for key in SHARDED:
        if batch.get(key) is not None:
            local[key] = batch[key].index_select(1, columns)
    bounds, row_order = _document_bounds(packed_seq_params, b, s), _row_order(s, cp_size)
    starts = _document_starts(bounds, b, s)
    q_cu, kv_cu, q_max, kv_max, kv_index, rotary = _attention_layout(
        starts, row_order, cp_size, cp_rank)
    to = dict(device=tokens.device)
    row_cu = row_max = None
    if bounds is not None:
        row_cu = torch.tensor(bounds, dtype=torch.int32, **to)
        row_max = int(torch.diff(row_cu).max())
    params = ContextParallelParams(
        cp_group=cp_group, rotary_positions=rotary.to(**to), q_cu_seqlens=q_cu.to(**to),
        kv_cu_seqlens=kv_cu.to(**to), q_max_seqlen=q_max, kv_max_seqlen=kv_max,
        kv_index=kv_index.to(**to), row_order=row_order.to(**to), row_cu_seqlens=row_cu,
        row_max_seqlen=row_max, document_starts=starts,
        hierarchical_groups=None if hierarchical_groups is None else tuple(hierarchical_groups),
    )
    return local, params


def scatter_heads(x: torch.Tensor, group, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The all-to-all of ``--cp-comm-type a2a`` over ``group`` (the CP group; a2a+p2p: the
    inner one, of G ranks): this rank's columns of all heads ``[s / CP, b, n, hn]`` -> the
    columns of every rank of ``group`` for its ``n / G`` heads ``[G * s / CP, b, n / G, hn]``,
    rank after rank, or by ``order`` (a2a: ``row_order``, the whole rows in column order)."""
    g = group.size()
    s_local, b, n = x.shape[:3]
    # [G (the rank the heads go to), s / CP, b, n / G, hn]; received: [G (the rank the
    # columns come from), ...], the gathered order.
    parts = x.reshape(s_local, b, g, n // g, -1).permute(2, 0, 1, 3, 4)
    rows = tensor_parallel.all_to_all(group, parts.contiguous())
    rows = rows.reshape(g * s_local, b, n // g, -1)
    return rows if order is None else rows.index_select(0, order)


def gather_heads(x: torch.Tensor, group, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The inverse of ``scatter_heads`` for the attention output: ``[G * s / CP, b, n / G *
    hn]`` -> this rank's columns of all heads ``[s / CP, b, n * hn]``."""
    g = group.size()
    s, b = x.shape[:2]
    # Back to the gathered order, [G (the rank the columns go to), s / CP, b, n / G * hn].
    gathered = x if order is None else torch.empty_like(x).index_copy(0, order, x)
    parts = tensor_parallel.all_to_all(group, gathered.reshape(g, s // g, b, -1).contiguous())
    return parts.permute(1, 2, 0, 3).reshape(s // g, b, -1)


def rotary_embedding(rope, positions: torch.Tensor) -> torch.Tensor:
    """megatron-core ``RotaryEmbedding.get_emb`` at the given positions: ``[s, b, 1, dim]`` from
    ``positions [b, s]`` (the same float32 products as its table, so the same angles)."""
    inv_freq = rope.inv_freq.to(positions.device)
    seq = positions.t().to(inv_freq.dtype)
    if rope.seq_len_interpolation_factor is not None:
        seq *= 1 / rope.seq_len_interpolation_factor
    freqs = seq[..., None] * inv_freq  # [s, b, dim / 2]
    if rope.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).view(*freqs.shape[:2], -1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, :, None, :]


def layer_scheme(config, layer_number: int, cp_comm_type: Optional[str],
                 per_layer: Tuple[str, ...]) -> Optional[str]:
    """This layer's scheme, allgather, a2a, p2p or a2a+p2p (None without CP): megatron-core's
    ``cp_comm_type`` (from ``TransformerConfig``) or ours, one value or one per layer
    (``layer_number`` counts from 1 over the whole model, as megatron-core's)."""
    cp, tp = config.context_parallel_size, config.tensor_model_parallel_size
    if cp == 1:
        return None
    if cp_comm_type is None and per_layer:
        cp_comm_type = per_layer[0] if len(per_layer) == 1 else per_layer[layer_number - 1]
    if cp_comm_type not in _CP_SCHEMES:
        raise ValueError(f"--cp-comm-type {cp_comm_type}: CoreAttention implements allgather, "
                         f"a2a, p2p and a2a+p2p")
    scheme = _CP_SCHEMES[cp_comm_type]
    sizes = config.hierarchical_context_parallel_sizes
    if scheme == "a2a+p2p" and (not sizes or len(sizes) != 2 or sizes[0] * sizes[1] != cp):
        raise ValueError(f"--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes "
                         f"A B with A x B = --context-parallel-size {cp}, got {sizes}")
    if scheme in ("a2a", "a2a+p2p"):
        error = a2a_heads_error(config.num_attention_heads,
                                config.num_query_groups or config.num_attention_heads, tp, cp,
                                hierarchical=sizes if scheme == "a2a+p2p" else None)
        if error:
            raise ValueError(error)
    return scheme
