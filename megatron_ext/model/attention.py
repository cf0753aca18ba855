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

Backends (``--attention-backend``; ``auto`` takes the first that can run here):
- ``flash``: flash-attn 2 ``flash_attn_varlen_func`` (CUDA, fp16/bf16, dropout, GQA);
- ``torch``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10; CUDA, fp16/bf16, GQA,
  no dropout);
- ``te``: Transformer Engine is detected but not wired yet: forcing it raises, ``auto`` skips it;
- ``sdpa``: PyTorch SDPA, one causal call per document (exact; any device and dtype). Measured
  on the 2-core CPU against one call with a block-diagonal causal mask: at test sizes (24-48
  tokens) the mask is faster per call (0.15 vs 0.45-0.8 ms) but the test suite's CPU time is
  the same within noise; at 2048 tokens the loop is 2-5.6x faster, since its work is sum(len^2)
  rather than t^2 and it needs no [t, t] mask (docs/varlen.md). The loop is kept.
A backend that cannot honour the request raises; nothing silently attends across documents.
GQA/MQA: k/v carry ``num_query_groups`` heads per TP rank; query head i uses group
``i // (heads / groups)`` (megatron-core's layout). Dropout runs under megatron-core's RNG
tracker fork, so activation recomputation replays it exactly.
"""

import functools
import importlib.util
import inspect
import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.model.context_parallel import (ContextParallelParams, gather_heads,
                                                  layer_scheme, scatter_heads)
from megatron_ext.model.ring_attention import ring_attention

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "te", "torch", "sdpa")
_AUTO_ORDER = ("flash", "torch", "sdpa")  # te: not wired yet, never picked by auto
_warned = set()


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here, or cannot honour document boundaries."""


# ----------------------------------------------------------------------------------- kernels
# Every kernel takes THD q [t, np, hn], k/v [t, ng, hn], int32 cu_seqlens (leading 0) and the
# longest document, and returns [t, np, hn]. With cu_seqlens_k (context parallelism), key range
# i (k/v [t_k, ng, hn]) may be longer than query piece i: causal is aligned bottom-right, the
# last query sees the last key (flash-attn 2's and torch varlen's causal).


@functools.lru_cache(maxsize=None)
def _flash_kernel():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen_kernel():
    """torch's varlen_attn with its causal/GQA keywords: causal is ``is_causal`` in 2.10 and
    ``window_size=(-1, 0)`` from 2.11; ``enable_gqa`` is not in 2.11 (the GPU image's) and is
    in 2.13."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def _require_gpu_half(q, backend):
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise AttentionBackendError(
            f"the {backend} kernel needs CUDA fp16/bf16 tensors, got {q.dtype} on {q.device}")


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout, cu_seqlens_k=None,
                  max_seqlen_k=None):
    _require_gpu_half(q, "flash")
    cu_seqlens_k, max_seqlen_k = _keys(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    return _flash_kernel()(
        q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
        dropout_p=dropout, softmax_scale=scale, causal=True,
    )


def _keys(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k):
    """The key ranges: the queries' own documents unless given (self-attention)."""
    if cu_seqlens_k is None:
        return cu_seqlens, max_seqlen
    return cu_seqlens_k, int(max_seqlen_k)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout, cu_seqlens_k=None,
                  max_seqlen_k=None):
    _require_gpu_half(q, "torch")
    if dropout:
        raise AttentionBackendError("torch varlen_attn has no attention dropout")
    varlen_attn, causal, has_gqa = _torch_varlen_kernel()
    kwargs = dict(causal, scale=scale)
    if q.size(1) != k.size(1):
        if has_gqa:
            kwargs["enable_gqa"] = True
        else:  # torch <= 2.11: expand the groups (query head i -> group i // (np / ng))
            k, v = (x.repeat_interleave(q.size(1) // k.size(1), dim=1) for x in (k, v))
    cu_seqlens_k, max_seqlen_k = _keys(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, **kwargs)


def _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout, cu_seqlens_k=None,
                 max_seqlen_k=None):
    bounds = cu_seqlens.tolist()
    kv_bounds = bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    if bounds[-1] != q.size(0) or kv_bounds[-1] != k.size(0) or len(kv_bounds) != len(bounds):
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} (keys: {kv_bounds[-1]}, "
                         f"{len(kv_bounds)} entries for {len(bounds)}) but the packed input "
                         f"has {q.size(0)} queries and {k.size(0)} keys")
    outs = []
    for start, end, k_start, k_end in zip(bounds[:-1], bounds[1:], kv_bounds[:-1],
                                          kv_bounds[1:]):
        if end == start:
            continue
        # [1, n, len, hn]: 4-D inputs take PyTorch's fused CPU kernel (3-D ones are 2x slower).
        qd = q[start:end].transpose(0, 1).unsqueeze(0)
        kd, vd = (x[k_start:k_end].transpose(0, 1).unsqueeze(0) for x in (k, v))
        # SDPA's is_causal is aligned top-left; keys before the queries (context parallelism:
        # the document began in an earlier chunk) take an explicit bottom-right mask.
        extra = (k_end - k_start) - (end - start)
        mask = None if extra == 0 else torch.ones(
            end - start, k_end - k_start, dtype=torch.bool, device=q.device).tril(extra)
        outs.append(F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale,
            enable_gqa=qd.size(1) != kd.size(1)).squeeze(0).transpose(0, 1))
    return torch.cat(outs)


_VARLEN = {"flash": _flash_varlen, "torch": _torch_varlen, "sdpa": _sdpa_varlen}


def varlen_attention(backend, query, key, value, cu_seqlens, max_seqlen,
                     softmax_scale=None, dropout=0.0, cu_seqlens_k=None, max_seqlen_k=None):
    """Causal attention of each document to itself with kernel ``backend`` (no RNG fork).

    query ``[t, np, hn]``, key/value ``[t, ng, hn]``, ``cu_seqlens`` int32 with leading 0.
    With ``cu_seqlens_k`` (as many entries), query piece i attends to key range i, causal
    aligned bottom-right (key/value ``[t_k, ng, hn]``; ``max_seqlen_k`` its longest range).
    """
    keys = () if cu_seqlens_k is None else (cu_seqlens_k, max_seqlen_k)  # self-attention: 7 args
    return _VARLEN[backend](query, key, value, cu_seqlens, int(max_seqlen), softmax_scale, dropout,
                            *keys)


# ---------------------------------------------------------------------------------- selection


def _te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def unavailable_reason(backend: str, config: TransformerConfig) -> Optional[str]:
    """None when ``backend`` can run ``config`` on this machine, else why not."""
    half = config.params_dtype in (torch.float16, torch.bfloat16)
    cuda = torch.cuda.is_available()
    if backend == "sdpa":
        return None
    if backend == "te":
        if not _te_installed():
            return "Transformer Engine is not installed"
        return ("Transformer Engine is installed, but its THD attention is not wired into "
                "megatron_ext yet")
    if backend == "flash":
        if _flash_kernel() is None:
            return "flash-attn 2 is not installed (pip install flash-attn)"
    elif backend == "torch":
        if _torch_varlen_kernel() is None:
            return (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn "
                    f"(needs torch >= 2.10)")
    else:
        _check_name(backend)
        raise ValueError(f"{backend!r} names no kernel; select_backend resolves it")
    if not cuda:
        return f"the {backend} kernel needs a CUDA device and there is none"
    if not half:
        return (f"the {backend} kernel needs fp16 or bf16 (--bf16/--fp16); params are "
                f"{config.params_dtype}")
    if backend == "torch" and config.attention_dropout > 0:
        return ("torch varlen_attn has no attention dropout; set --attention-dropout 0 "
                f"(now {config.attention_dropout})")
    return None


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"--attention-backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def choose_backend(requested: str, config: TransformerConfig) -> Tuple[str, str]:
    """(backend, why) for ``--attention-backend requested`` on this machine and config; raises
    if a requested backend cannot run."""
    _check_name(requested)
    if requested == "auto":
        skipped = []
        for name in _AUTO_ORDER:
            reason = unavailable_reason(name, config)
            if reason is None:
                why = f"auto skipped {'; '.join(skipped)}" if skipped else "auto: first choice"
                return name, why
            skipped.append(f"{name}: {reason}")
        raise AssertionError("sdpa is always available")
    reason = unavailable_reason(requested, config)
    if reason is not None:
        raise AttentionBackendError(
            f"--attention-backend {requested}: {reason}. Use --attention-backend sdpa (exact, "
            f"any device) or auto."
        )
    return requested, f"--attention-backend {requested}"


def select_backend(requested: str, config: TransformerConfig) -> str:
    """Resolve ``--attention-backend`` for this machine and config; raise if it cannot run."""
    backend, _ = choose_backend(requested, config)
    _warn_slow(backend)
    return backend


def _warn_slow(backend: str) -> None:
    # The start-up summary names the backend and why (training/summary.py); on a GPU the sdpa
    # loop over documents is exact but slow: say so loudly, once.
    if backend != "sdpa" or not torch.cuda.is_available() or backend in _warned:
        return
    _warned.add(backend)
    logger.warning("attention backend: sdpa on a GPU (exact but slow: one call per document); "
                   "install flash-attn or use torch >= 2.10 with --bf16/--fp16")


# ------------------------------------------------------------------------------------ module


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
        _warn_slow(self.backend)

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
    _check_name(backend)
    return functools.partial(CoreAttention, backend=backend, cp_comm_types=tuple(cp_comm_types))
