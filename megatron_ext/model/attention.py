"""Core attention for the layer spec: causal attention, document-isolated for packed (THD) input.

megatron-core's local ``DotProductAttention`` rejects ``packed_seq_params``; this module takes
its place in the spec. With ``packed_seq_params`` (``qkv_format="thd"``, built from EOD
positions by ``megatron_ext.training.packing``) q/k/v arrive as ``[t, heads, head_dim]`` and each
document attends causally to itself only, exactly as if it were trained alone. Without it, the
input is ``[s, b, heads, head_dim]`` and attention is plain causal over each sample (Megatron).
With megatron-core's KV cache (``megatron_ext.generation``), a decoding step comes as
``no_mask``: one new query per sample attends to every cached key. With context parallelism
(``ContextParallelParams`` from ``megatron_ext.model.context_parallel``) q/k/v are this rank's
chunks ``[s / CP, b, heads, head_dim]``. With ``--cp-comm-type allgather`` K/V are all-gathered
over the CP group and every (row, chunk, document) piece attends to its document's keys, causal
aligned bottom-right; with ``a2a`` an all-to-all gives each rank the whole rows of heads / CP
heads, which attend as without CP; with ``p2p`` K/V blocks travel around the CP ring
(``megatron_ext.model.ring_attention``, float32 math on any device) and the partial outputs
merge by log-sum-exp; with ``a2a+p2p`` the all-to-all runs within the inner hierarchical CP
group and the ring over the outer one (one value per layer: layers may mix them).

Backends (``--attention-backend``: flash-attn, torch varlen, exact SDPA per document) are in
``megatron_ext.model.attention_backends``. A backend that cannot honour the request raises; nothing silently attends across documents.
GQA/MQA: k/v carry ``num_query_groups`` heads per TP rank; query head i uses group
``i // (heads / groups)`` (megatron-core's layout). Dropout runs under megatron-core's RNG
tracker fork, so activation recomputation replays it exactly.
"""

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.model.attention_backends import (check_backend_name, choose_backend,
                                                    varlen_attention, warn_slow)
from megatron_ext.model.context_parallel import (ContextParallelParams, gather_heads,
                                                  layer_scheme, scatter_heads)
from megatron_ext.model.ring_attention import ring_attention


class CoreAttention(MegatronModule):
    """Spec entry for ``self_attention.submodules.core_attention`` (see ``core_attention_spec``)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        backend: str = "auto",
        cp_comm_types: Tuple[str, ...] = (),
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"only causal attention is supported, got {attn_mask_type}")
        self.cp_scheme = layer_scheme(config, layer_number, cp_comm_type, cp_comm_types)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if self.cp_scheme in ("p2p", "a2a+p2p") and self.dropout > 0:
            raise ValueError(f"--cp-comm-type {self.cp_scheme} (ring attention) has no "
                             f"attention dropout: "
                             f"pass --attention-dropout 0 (now {self.dropout}) or use "
                             f"--cp-comm-type allgather or a2a")
        self.softmax_scale = softmax_scale
        self.backend, self.backend_reason = choose_backend(backend, config)
        warn_slow(self.backend)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        if attention_mask is not None:
            raise ValueError(
                "CoreAttention is causal by itself and takes document boundaries from "
                "packed_seq_params (megatron_ext.training.packing); pass attention_mask=None "
                "instead of a dense mask, which would otherwise be silently ignored"
            )
        dropout = self.dropout if self.training else 0.0
        if attn_mask_type == AttnMaskType.no_mask:
            return self._decode(query, key, value)
        if isinstance(packed_seq_params, ContextParallelParams):
            if packed_seq_params.cp_group.size() != self.config.context_parallel_size:
                raise ValueError(f"the batch was sharded over {packed_seq_params.cp_group.size()}"
                                 f" CP ranks, the model has --context-parallel-size "
                                 f"{self.config.context_parallel_size}")
            if self.cp_scheme == "a2a":
                return self._all_to_all(query, key, value, packed_seq_params, dropout)
            if self.cp_scheme == "p2p":
                return ring_attention(query, key, value, packed_seq_params.cp_group,
                                      packed_seq_params.ring_blocks, self.softmax_scale)
            if self.cp_scheme == "a2a+p2p":
                return self._hierarchical(query, key, value, packed_seq_params)
            return self._context_parallel(query, key, value, packed_seq_params, dropout)
        if self.config.context_parallel_size > 1:
            raise ValueError("context parallelism needs the ContextParallelParams of "
                             "megatron_ext.model.context_parallel.shard_batch as "
                             "packed_seq_params")
        if packed_seq_params is None:
            return self._causal(query, key, value, dropout)
        cu_seqlens, max_seqlen = _check_packed(packed_seq_params, query)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = varlen_attention(
                self.backend, query, key, value, cu_seqlens, max_seqlen, self.softmax_scale, dropout
            )
        return out.reshape(query.size(0), -1)

    def _decode(self, query, key, value):
        """A decoding step with megatron-core's KV cache (``StaticInferenceContext``): it passes
        ``no_mask`` once the prompt is cached, with the new token's query [1, b, np, hn] and
        the cached keys/values [s, b, ng, hn]. A causal mask would be aligned top-left here
        (the query would see the first key only), so attend to every cached position."""
        if query.size(0) != 1:
            raise ValueError(f"a KV-cache decoding step takes one token per sample, got "
                             f"{query.size(0)} (megatron_ext.generation feeds one at a time)")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, hn]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale,
                                             enable_gqa=q.size(1) != k.size(1))
        return out.permute(2, 0, 1, 3).reshape(1, query.size(1), -1)

    def _context_parallel(self, query, key, value, params, dropout):
        """[s / CP, b, n, hn] local chunks (context_parallel.py) -> [s / CP, b, np * hn]: the
        local queries against K/V all-gathered over the CP group (backward: reduce-scatter of
        dK/dV), one varlen call over every (row, chunk, document) piece."""
        s, b = query.shape[:2]
        key, value = (tensor_parallel.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=True, group=params.cp_group) for x in (key, value))
        key, value = (x.reshape(-1, *x.shape[2:]).index_select(0, params.kv_index)
                      for x in (key, value))
        q = query.transpose(0, 1).reshape(b * s, *query.shape[2:])  # (b, s) order, as the pieces
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = varlen_attention(
                self.backend, q, key, value, params.q_cu_seqlens, params.q_max_seqlen,
                self.softmax_scale, dropout, params.kv_cu_seqlens, params.kv_max_seqlen)
        return out.reshape(b, s, -1).transpose(0, 1).contiguous()

    def _all_to_all(self, query, key, value, params, dropout):
        """``--cp-comm-type a2a``: [s / CP, b, n, hn] local chunks -> the whole rows of n / CP
        heads (context_parallel.scatter_heads), attention as at CP=1, and back."""
        query, key, value = (scatter_heads(x, params.cp_group, params.row_order)
                             for x in (query, key, value))
        if params.row_cu_seqlens is None:
            out = self._causal(query, key, value, dropout)
        else:
            s, b = query.shape[:2]
            q, k, v = (x.transpose(0, 1).reshape(b * s, *x.shape[2:])
                       for x in (query, key, value))
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = varlen_attention(self.backend, q, k, v, params.row_cu_seqlens,
                                       params.row_max_seqlen, self.softmax_scale, dropout)
            out = out.reshape(b, s, -1).transpose(0, 1)
        return gather_heads(out, params.cp_group, params.row_order)

    def _hierarchical(self, query, key, value, params):
        """``--cp-comm-type a2a+p2p``: the all-to-all within the inner CP group gives each rank
        the columns of its inner group's ranks for heads / A heads; the ring over the outer
        group (the ranks with the same heads) passes K/V of those column sets around, masked by
        global column and document (``hierarchical_blocks``); then the inverse all-to-all."""
        if params.hierarchical_groups is None:
            raise ValueError("--cp-comm-type a2a+p2p needs shard_batch's hierarchical_groups "
                             "(parallel_state.get_hierarchical_context_parallel_groups())")
        inner, outer = params.hierarchical_groups
        query, key, value = (scatter_heads(x, inner) for x in (query, key, value))
        out = ring_attention(query, key, value, outer, params.hierarchical_blocks,
                             self.softmax_scale)
        return gather_heads(out, inner)

    def _causal(self, query, key, value, dropout):
        """[s, b, n, hn] -> [s, b, np * hn], causal over each sample."""
        s, b = query.shape[:2]
        with tensor_parallel.get_cuda_rng_tracker().fork():
            if self.backend == "sdpa":
                q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, hn]
                out = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                    enable_gqa=q.size(1) != k.size(1),
                )
                return out.permute(2, 0, 1, 3).reshape(s, b, -1)
            # A varlen kernel over the b samples as b documents of length s.
            q, k, v = (x.transpose(0, 1).reshape(b * s, *x.shape[2:]) for x in (query, key, value))
            cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
            out = varlen_attention(
                self.backend, q, k, v, cu_seqlens, s, self.softmax_scale, dropout
            )
        return out.reshape(b, s, -1).transpose(0, 1).contiguous()


def _check_packed(params: PackedSeqParams, query: torch.Tensor):
    if params.qkv_format != "thd":
        raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got {params.qkv_format!r}")
    cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
    if cu_q is None or (cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_q, cu_kv)):
        raise ValueError("self-attention needs cu_seqlens_q (and cu_seqlens_kv equal to it)")
    for padded in (params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded):
        if padded is not None and padded is not cu_q and not torch.equal(padded, cu_q):
            raise ValueError("padded cu_seqlens (cu_seqlens_*_padded) are not supported")
    if query.dim() != 3:
        raise ValueError(f"THD query must be [t, heads, head_dim], got {tuple(query.shape)}")
    if cu_q.dtype != torch.int32 or cu_q.device != query.device:
        cu_q = cu_q.to(device=query.device, dtype=torch.int32)
    max_seqlen = params.max_seqlen_q
    if max_seqlen is None:
        max_seqlen = int((cu_q[1:] - cu_q[:-1]).max())
    return cu_q, int(max_seqlen)


def core_attention_spec(backend: str = "auto", cp_comm_types: Tuple[str, ...] = ()):
    """The layer-spec entry: ``CoreAttention`` bound to ``--attention-backend`` and
    ``--cp-comm-type`` (one value, or one per layer)."""
    check_backend_name(backend)
    return functools.partial(CoreAttention, backend=backend, cp_comm_types=tuple(cp_comm_types))
