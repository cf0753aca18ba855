"""Core-attention kernels and backend selection, against plain masked-softmax math."""

import contextlib
import logging
import sys
import types

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.model import attention
from megatron_ext.model import attention_backends
from megatron_ext.model.attention import CoreAttention
from megatron_ext.model.attention_backends import AttentionBackendError, select_backend


def _config(**kwargs):
    kwargs.setdefault("attention_dropout", 0.0)
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                             num_query_groups=2, **kwargs)


def _reference(q, k, v, lengths, scale=None):
    """Plain math: softmax(q k^T * scale) v over the packed row, masked to causal-within-document.
    On q's device and in q's dtype (bench/gpu/kernels.py checks the GPU kernels against it)."""
    groups = q.size(1) // k.size(1)
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))  # query head i -> group i // groups
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                  torch.tensor(lengths, device=q.device))
    pos = torch.arange(q.size(0), device=q.device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    scores = torch.einsum("qhd,khd->hqk", q, k) * (scale or q.size(-1) ** -0.5)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _qkv(t, heads=4, groups=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, n, dim, generator=g, requires_grad=True) for n in (heads, groups, groups)]


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


LENGTHS = [5, 1, 1, 0, 9, 2, 0, 6]  # length-1 documents, zero-length entries, GQA 4 heads / 2 groups


@pytest.mark.parametrize("scale", [None, 0.3])
def test_sdpa_varlen_equals_each_document_alone_forward_and_backward(scale):
    q, k, v = _qkv(sum(LENGTHS))
    out = attention_backends._sdpa_varlen(q, k, v, _cu(LENGTHS), max(LENGTHS), scale, 0.0)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = _reference(q, k, v, LENGTHS, scale)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):  # masked-out scores add round-off around exact zeros
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_sdpa_varlen_rejects_cu_seqlens_that_do_not_cover_the_input():
    q, k, v = _qkv(10)
    with pytest.raises(ValueError, match="cu_seqlens ends at 8"):
        attention_backends._sdpa_varlen(q, k, v, _cu([4, 4]), 4, None, 0.0)


def test_flash_wrapper_passes_causal_varlen_arguments(monkeypatch):
    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append((cu_q is cu_k, max_q, max_k, dropout_p, softmax_scale, causal))
        lengths = torch.diff(cu_q).tolist()
        return _reference(q, k, v, lengths, softmax_scale)  # flash-attn takes GQA natively

    monkeypatch.setattr(attention_backends, "_flash_kernel", lambda: fake)
    monkeypatch.setattr(attention_backends, "_require_gpu_half", lambda q, backend: None)
    q, k, v = _qkv(sum(LENGTHS))
    out = attention_backends._flash_varlen(q, k, v, _cu(LENGTHS), 9, 0.5, 0.0)
    assert calls == [(True, 9, 9, 0.0, 0.5, True)]
    torch.testing.assert_close(out, _reference(q, k, v, LENGTHS, 0.5))


def _fake_varlen_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False,
                     scale=None, return_aux=None):
    assert is_causal and query.size(1) == key.size(1), "2.10 has no GQA: heads must be expanded"
    return _reference(query, key, value, torch.diff(cu_seq_q).tolist(), scale)


def _fake_varlen_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, window_size=(-1, -1)):
    # The GPU image's torch (bench/gpu/README.md): window_size, but no enable_gqa yet.
    assert window_size == (-1, 0), "causal is window_size=(-1, 0) since 2.11"
    assert query.size(1) == key.size(1), "2.11 has no enable_gqa: heads must be expanded"
    return _reference(query, key, value, torch.diff(cu_seq_q).tolist(), scale)


def _fake_varlen_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                     block_table=None, num_splits=None):
    assert window_size == (-1, 0), "causal is window_size=(-1, 0) since 2.11"
    assert enable_gqa == (query.size(1) != key.size(1))
    return _reference(query, key, value, torch.diff(cu_seq_q).tolist(), scale)


@pytest.mark.parametrize("fake", [_fake_varlen_210, _fake_varlen_211, _fake_varlen_213],
                         ids=["2.10", "2.11", "2.13"])
def test_torch_varlen_wrapper_adapts_to_the_installed_signature(monkeypatch, fake):
    module = types.ModuleType("torch.nn.attention.varlen")
    module.varlen_attn = fake
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", module)
    monkeypatch.setattr(attention_backends, "_require_gpu_half", lambda q, backend: None)
    attention_backends._torch_varlen_kernel.cache_clear()
    try:
        q, k, v = _qkv(sum(LENGTHS))
        out = attention_backends._torch_varlen(q, k, v, _cu(LENGTHS), 9, None, 0.0)
        torch.testing.assert_close(out, _reference(q, k, v, LENGTHS))
    finally:
        attention_backends._torch_varlen_kernel.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's choice")
def test_sdpa_is_selected_on_cpu_with_the_reason(caplog):
    with caplog.at_level(logging.INFO, logger="megatron_ext.model.attention_backends"):
        assert select_backend("sdpa", _config()) == "sdpa"
        assert select_backend("auto", _config()) == "sdpa"
    # On the CPU nothing is logged: the start-up summary names the backend (training/summary.py).
    assert caplog.records == []
    core = CoreAttention(_config(), 1, AttnMaskType.causal, "self", backend="auto")
    assert core.backend == "sdpa"
    assert core.backend_reason.startswith("auto skipped flash: ")
    assert "; torch: " in core.backend_reason
    forced = CoreAttention(_config(), 1, AttnMaskType.causal, "self", backend="sdpa")
    assert forced.backend_reason == "--attention-backend sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's errors")
@pytest.mark.parametrize("backend, reason", [
    ("flash", "flash-attn 2 is not installed|the flash kernel needs a CUDA device"),
    ("torch", "the torch kernel needs a CUDA device|torch .* has no torch.nn.attention.varlen"),
    ("te", "Transformer Engine is (not installed|installed, but its THD attention is not wired)"),
])
def test_forcing_an_unavailable_backend_raises_a_clear_error(backend, reason):
    with pytest.raises(AttentionBackendError, match=f"--attention-backend {backend}: ({reason})"):
        CoreAttention(_config(), 1, AttnMaskType.causal, "self", backend=backend)


def test_gpu_kernels_refuse_cpu_or_fp32_tensors():
    q, k, v = (x.detach() for x in _qkv(8))
    for kernel in (attention_backends._flash_varlen, attention_backends._torch_varlen):
        with pytest.raises(AttentionBackendError, match="needs CUDA fp16/bf16 tensors"):
            kernel(q, k, v, _cu([8]), 8, None, 0.0)


def test_unknown_backend_and_dense_masks_are_rejected():
    with pytest.raises(ValueError, match="expected one of"):
        select_backend("xformers", _config())
    core = CoreAttention(_config(), 1, AttnMaskType.causal, "self", backend="sdpa")
    q = torch.zeros(4, 1, 4, 16)
    with pytest.raises(ValueError, match="attention_mask=None"):
        core(q, q[:, :, :2], q[:, :, :2], torch.ones(1, 1, 4, 4, dtype=torch.bool))


class _NoFork:
    def fork(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize("kernel", ["sdpa", "varlen"])
def test_without_packed_seq_params_each_sample_is_plain_causal(monkeypatch, kernel):
    monkeypatch.setattr(attention.tensor_parallel, "get_cuda_rng_tracker", _NoFork)
    core = CoreAttention(_config(), 1, AttnMaskType.causal, "self", backend="sdpa")
    if kernel == "varlen":  # the GPU backends' route: the b samples as b documents of length s
        monkeypatch.setitem(attention_backends._VARLEN, "flash", attention_backends._sdpa_varlen)
        core.backend = "flash"
    s, b = 7, 3
    q, k, v = (x.detach().reshape(s, b, *x.shape[1:]) for x in _qkv(s * b))
    out = core(q, k, v, None)
    assert out.shape == (s, b, 4 * 16)
    for i in range(b):
        expected = _reference(q[:, i], k[:, i], v[:, i], [s]).reshape(s, -1)
        torch.testing.assert_close(out[:, i], expected, rtol=1e-5, atol=1e-6)
