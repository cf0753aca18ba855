"""Ring attention (``--cp-comm-type p2p``, Megatron-LM's default CP scheme), exact, without
Transformer Engine.

Interface (``CoreAttention`` calls it for the layers whose scheme is p2p)::

    out = ring_attention(query, key, value, params.cp_group, params.ring_blocks,
                         softmax_scale)  # [s / CP, b, np * hn]

q ``[s / CP, b, np, hn]``, k/v ``[s / CP, b, ng, hn]``: this rank's two chunks of every row
(``context_parallel.shard_batch``'s layout), RoPE applied; the blocks of the micro-batch's
``ContextParallelParams`` for the ring ``group``. ``--cp-comm-type a2a+p2p`` passes the columns
of its inner CP group (after the all-to-all, for its heads) around the outer group:
``params.hierarchical_groups[1]`` and ``params.hierarchical_blocks``; below, "CP" is then the
outer group's size and "rank" its members.

No rank holds more than two ranks' K/V at a time: over CP steps every rank's K/V block travels
once around the CP group (step i: rank r holds the block of rank ``(r - i) mod CP``, sends it to
``r + 1`` and receives the next from ``r - 1`` while it computes). At each step the local
queries attend to the block's keys, masked by global column (causal) and document (same
document start), in float32; the partial outputs are merged online by their log-sum-exp (the
flash/ring merge), so the result is softmax over all keys at once. ``ring_blocks`` (built once
per micro-batch, on the host) names per block its parts, one per (local chunk, block chunk)
pair that some query sees, with the queries and keys that take part: with the load-balanced
layout a block from an earlier rank is seen through its first chunk only, one from a later
rank by the second local chunk only, and pairs of other documents only are skipped; a query
that sees nothing of a part in some row of the micro-batch gets log-sum-exp -inf there and
weight 0 (every query sees itself in its own block, step 0, so the merged log-sum-exp is
finite).

Backward (``_Ring.backward``): the blocks travel the ring again; each step recomputes the
block's probabilities from the saved log-sum-exp, adds dQ locally and adds the block's dK/dV
into a float32 buffer that travels with it, one step behind, so after CP steps every rank
holds the dK/dV of its own block. Activation recomputation replays the forward (ring
included) on every CP rank alike. GQA: query head i uses group ``i // (np / ng)``. No
attention dropout (``CoreAttention`` refuses it, naming --attention-dropout).
"""

import torch
import torch.distributed as dist

__all__ = ["ring_attention"]


def ring_attention(query, key, value, group, blocks, softmax_scale=None) -> torch.Tensor:
    s, b, n, hn = query.shape
    groups = key.size(2)
    scale = hn ** -0.5 if softmax_scale is None else softmax_scale
    # [b, ng, np / ng, s, hn] and [b, ng, s, hn]: head i -> group i // (np / ng).
    q = query.reshape(s, b, groups, n // groups, hn).permute(1, 2, 3, 0, 4)
    kv = torch.stack([x.permute(1, 2, 0, 3) for x in (key, value)])
    out = _Ring.apply(q, kv, group, blocks, scale)
    return out.permute(3, 0, 1, 2, 4).reshape(s, b, n * hn)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, group, blocks, scale):
        ring = _Peers(group)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        block = kv
        for step in range(ring.size):
            pending = ring.pass_on(block) if step < ring.size - 1 else None
            for layout in blocks[ring.source(step)]:
                rows = layout[0]
                part, part_lse = _block_forward(q, block, layout, scale)
                merged = torch.logaddexp(lse[..., rows], part_lse)
                safe = merged.masked_fill(merged == float("-inf"), 0)
                out.index_copy_(3, rows, out[..., rows, :] * (lse[..., rows] - safe).exp()[
                    ..., None] + part * (part_lse - safe).exp()[..., None])
                lse.index_copy_(3, rows, merged)
            if pending is not None:
                block = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.group, ctx.blocks, ctx.scale = group, blocks, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        blocks, scale = ctx.blocks, ctx.scale
        ring = _Peers(ctx.group)
        dout = dout.float()
        delta = (dout * out.float()).sum(-1)  # [b, ng, np / ng, s]: rowsum(dP * P)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        block, dkv, incoming = kv, torch.zeros(kv.shape, dtype=torch.float32,
                                               device=kv.device), None
        for step in range(ring.size):
            pending = ring.pass_on(block) if step < ring.size - 1 else None
            parts = blocks[ring.source(step)]
            grads = [_block_backward(q, block, layout, scale, dout, delta, lse, dq)
                     for layout in parts]
            if incoming is not None:  # the block's dK/dV so far, from the ranks before
                dkv = incoming.wait()
            for layout, grad in zip(parts, grads):
                dkv.index_add_(3, layout[1], grad)
            # One step behind the K/V: after the last step it reaches the block's owner.
            incoming = ring.pass_on(dkv)
            if pending is not None:
                block = pending.wait()
        dkv = incoming.wait()
        return dq.to(q.dtype), dkv.to(kv.dtype), None, None, None


def _scores(q, block, layout, scale):
    """Masked float32 scores ``[b, ng, np / ng, rows, cols]`` of the block's taking part, and
    its scaled queries ``[b, ng, np / ng * rows, hn]`` and keys/values ``[b, ng, cols, hn]``.
    The (head, row) dims are merged so that every product is one batched matmul over
    (b, ng) of strided views, without copies."""
    rows, cols, q_col, q_doc, k_col, k_doc = layout
    b, groups, per_group, _, hn = q.shape
    qs = q.index_select(3, rows).float().mul_(scale).view(b, groups, -1, hn)
    ks, vs = block.index_select(3, cols).float().unbind(0)
    scores = torch.matmul(qs, ks.transpose(-1, -2)).view(b, groups, per_group, len(rows), -1)
    allowed = (k_col[None, None, :] <= q_col[None, :, None]) & (
        k_doc[:, None, :] == q_doc[:, :, None])  # [b, rows, cols]
    return scores.masked_fill_(~allowed[:, None, None], float("-inf")), qs, ks, vs


def _block_forward(q, block, layout, scale):
    """(the block's normalized output [b, ng, np / ng, rows, hn], its log-sum-exp): 0 and -inf
    for a query that sees no key of the block."""
    scores, _, _, vs = _scores(q, block, layout, scale)
    top = scores.amax(-1)
    top = top.masked_fill_(top == float("-inf"), 0)
    probs = scores.sub_(top[..., None]).exp_()
    total = probs.sum(-1)
    out = torch.matmul(probs.view(*vs.shape[:2], -1, probs.size(-1)), vs)
    out = out.view(*probs.shape[:-1], -1) / total.clamp_min(torch.finfo(total.dtype).tiny)[
        ..., None]  # a query that sees nothing: 0 / tiny = 0
    return out, top + total.log()


def _block_backward(q, block, layout, scale, dout, delta, lse, dq):
    """Adds the block's dQ into ``dq``; returns its [2, b, ng, cols, hn] dK/dV."""
    rows = layout[0]
    scores, qs, ks, vs = _scores(q, block, layout, scale)
    probs = scores.sub_(lse.index_select(3, rows)[..., None]).exp_()  # masked: exp(-inf) = 0
    flat = probs.view(*qs.shape[:3], -1)  # [b, ng, np / ng * rows, cols]
    do = dout.index_select(3, rows).view(qs.shape)
    dv = torch.matmul(flat.transpose(-1, -2), do)
    dscores = torch.matmul(do, vs.transpose(-1, -2)).view(probs.shape).sub_(
        delta.index_select(3, rows)[..., None]).mul_(probs).view(flat.shape)
    dq.index_add_(3, rows, torch.matmul(dscores, ks).mul_(scale).view(
        *probs.shape[:-1], -1))
    dk = torch.matmul(dscores.transpose(-1, -2), qs)  # qs carries the scale
    return torch.stack([dk, dv])


class _Peers:
    """This rank's neighbours in the CP ring (global ranks, as torch.distributed's P2P takes)."""

    def __init__(self, group):
        self.group, self.size, self.rank = group, group.size(), group.rank()
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def source(self, step: int) -> int:
        """The CP rank whose block this rank holds at ``step``."""
        return (self.rank - step) % self.size

    def pass_on(self, tensor: torch.Tensor) -> "_Pending":
        """Send ``tensor`` to the next rank and receive the previous rank's, asynchronously."""
        tensor = tensor.contiguous()
        if self.size == 1:  # a one-member ring (a2a+p2p with sizes A 1) receives its own
            return _Pending([], tensor, tensor)
        received = torch.empty_like(tensor)
        requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, self.next, self.group),
            dist.P2POp(dist.irecv, received, self.prev, self.group)])
        return _Pending(requests, received, tensor)


class _Pending:
    def __init__(self, requests, received, sent):
        self.requests, self.received, self.sent = requests, received, sent  # keep sent alive

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        return self.received
