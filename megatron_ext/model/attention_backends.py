"""Varlen attention kernels and the choice among them (``--attention-backend``), for
``model/attention.py``'s ``CoreAttention``: causal attention over packed documents (THD).

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
``i // (heads / groups)`` (megatron-core's layout).
"""

import functools
import importlib.util
import inspect
import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

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
        check_backend_name(backend)
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


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"--attention-backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def choose_backend(requested: str, config: TransformerConfig) -> Tuple[str, str]:
    """(backend, why) for ``--attention-backend requested`` on this machine and config; raises
    if a requested backend cannot run."""
    check_backend_name(requested)
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
    warn_slow(backend)
    return backend


def warn_slow(backend: str) -> None:
    # The start-up summary names the backend and why (training/summary.py); on a GPU the sdpa
    # loop over documents is exact but slow: say so loudly, once.
    if backend != "sdpa" or not torch.cuda.is_available() or backend in _warned:
        return
    _warned.add(backend)
    logger.warning("attention backend: sdpa on a GPU (exact but slow: one call per document); "
                   "install flash-attn or use torch >= 2.10 with --bf16/--fp16")
