"""Benchmark: document-isolated (varlen) attention vs full causal attention over packed samples.

Times forward+backward of our ``CoreAttention`` (the module in the layer spec, RNG fork
included) on one packed sample of ``--seq-length`` tokens holding documents whose lengths are
drawn from an exponential distribution with the given mean (seeded; the last one truncated),
for every backend that can run here, and the same sample as one causal sequence.

Useful FLOPs count only what document isolation needs, per document i of length L_i:
    forward          F = 4 * sum_i(L_i^2) / 2 * heads * head_dim   (QK^T and PV, causal half)
    forward+backward 3.5 * F                                       (backward = 2.5 * F)
The causal column's TFLOP/s uses its own work, seq_length^2 in place of sum_i(L_i^2).

    python bench/varlen.py                                          # GPU: 8192 tokens, 32 heads, bf16
    python bench/varlen.py --seq-length 2048 --heads 4 --threads 1 --clock process  # CPU, ~1 min
    python bench/varlen.py --e2e                                    # also a GPTModel step
    python bench/varlen.py --json rows.json                         # also the rows as JSON
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_ext import platform  # noqa: E402
from megatron_ext.training.packing import cumulative_seq_len, packed_seq_params_from_actual_seq_len  # noqa: E402

BACKENDS = ("flash", "torch", "te", "sdpa")


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="query groups (GQA); default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--mean-lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=["wall", "process"], default="wall",
                   help="process: this process's CPU time (CPU only; robust on a shared machine "
                        "when used with --threads 1)")
    p.add_argument("--sdpa-mask", action="store_true",
                   help="also time SDPA with one block-diagonal causal mask (the alternative to "
                        "the sdpa backend's loop over documents)")
    p.add_argument("--e2e", action="store_true", help="also time a GPTModel forward+backward")
    p.add_argument("--e2e-layers", type=int, default=2)
    p.add_argument("--e2e-vocab", type=int, default=32000)
    p.add_argument("--json", help="also write the header, skipped backends and rows here")
    return p.parse_args()


def document_lengths(total: int, mean: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed * 100003 + mean)
    lengths = []
    while sum(lengths) < total:
        draw = torch.empty(1).exponential_(1.0 / mean, generator=g).item()
        lengths.append(max(1, round(draw)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def attention_flops(lengths, heads, head_dim) -> float:
    """Forward+backward FLOPs of causal attention over these documents (see the docstring)."""
    return 3.5 * 4 * sum(n * n for n in lengths) / 2 * heads * head_dim


CLOCK = time.perf_counter


def timed(fn, warmup, reps, device) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = CLOCK()
        fn()
        sync()
        times.append(CLOCK() - start)
    return statistics.median(times)


def block_diagonal_sdpa(q, k, v, cu_seqlens):
    """One SDPA call with a [t, t] causal-within-document mask (comparison only)."""
    t = q.size(0)
    pos = torch.arange(t, device=q.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)
    mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))
    return out[0].transpose(0, 1).reshape(t, -1)


def core_attention(backend, heads, kv_heads, head_dim, dtype):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.model.attention import CoreAttention

    config = TransformerConfig(
        num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
        num_query_groups=kv_heads, kv_channels=head_dim, attention_dropout=0.0, params_dtype=dtype,
    )
    return CoreAttention(config, 1, AttnMaskType.causal, "self", backend=backend)


def bench_attention(args, device, dtype, kv_heads, skipped):
    """Rows of timings; ``skipped`` collects {backend: why} for backends that cannot run."""
    from megatron_ext.model.attention_backends import AttentionBackendError

    s, h, d = args.seq_length, args.heads, args.head_dim
    rows = []
    for backend in args.backends:
        try:
            module = core_attention(backend, h, kv_heads, d, dtype)
        except AttentionBackendError as error:
            print(f"skip {backend}: {error}", file=sys.stderr)
            skipped[backend] = str(error)
            continue
        variants = [(backend, module)]
        if backend == "sdpa" and args.sdpa_mask:
            variants.append(("sdpa-mask", None))
        for name, module in variants:
            for mean in args.mean_lengths:
                lengths = document_lengths(s, mean, args.seed)
                params = packed_seq_params_from_actual_seq_len(cumulative_seq_len(lengths).to(device))
                g = torch.Generator(device=device).manual_seed(args.seed)
                q, k, v = (torch.randn(s, n, d, device=device, dtype=dtype, generator=g)
                           .requires_grad_() for n in (h, kv_heads, kv_heads))

                def varlen():
                    if module is None:
                        out = block_diagonal_sdpa(q, k, v, params.cu_seqlens_q)
                    else:
                        out = module(q, k, v, None, packed_seq_params=params)
                    out.backward(torch.ones_like(out))

                def causal():
                    out = variants[0][1](q[:, None], k[:, None], v[:, None], None)
                    out.backward(torch.ones_like(out))

                t_varlen = timed(varlen, args.warmup, args.reps, device)
                t_causal = timed(causal, args.warmup, args.reps, device)
                rows.append(dict(
                    backend=name, mean=mean, docs=len(lengths),
                    varlen_ms=t_varlen * 1e3, causal_ms=t_causal * 1e3,
                    speedup=t_causal / t_varlen,
                    varlen_tflops=attention_flops(lengths, h, d) / t_varlen / 1e12,
                    causal_tflops=attention_flops([s], h, d) / t_causal / 1e12,
                ))
    return rows


def bench_e2e(args, device, dtype, kv_heads):
    """Forward+backward of a small GPTModel over the packed sample, varlen vs causal."""
    from megatron_ext.config import parse_args
    from megatron_ext.training.packing import packed_seq_params as make_params
    from megatron_ext.model.attention_backends import AttentionBackendError, select_backend
    from megatron_ext.model.gpt import build_model, transformer_config
    from megatron_ext.parallel import ParallelTopology

    os.environ.setdefault("MASTER_PORT", "29517")
    s, eod, rows, topology = args.seq_length, args.e2e_vocab - 1, [], None
    for backend in args.backends:
        argv = (
            f"--num-layers {args.e2e_layers} --hidden-size {args.heads * args.head_dim} "
            f"--num-attention-heads {args.heads} --group-query-attention --num-query-groups "
            f"{kv_heads} --kv-channels {args.head_dim} --seq-length {s} --swiglu "
            "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
            "--untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0 "
            f"--mock-data --tokenizer-type NullTokenizer --vocab-size {args.e2e_vocab - 1} "
            f"--attention-backend {backend} --reset-position-ids"
        ).split() + {torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"]}.get(dtype, [])
        config = parse_args(argv, world_size=1)
        try:
            select_backend(backend, transformer_config(config))
        except AttentionBackendError:
            continue
        if topology is None:  # one process group and parallel state for every backend
            topology = ParallelTopology.from_config(config.parallel, 1)
            topology.initialize()
        platform.manual_seed(args.seed)
        model = build_model(config, args.e2e_vocab).to(device)
        for mean in args.mean_lengths:
            lengths = document_lengths(s, mean, args.seed)
            tokens = torch.randint(0, eod, (1, s), device=device)
            tokens[0, cumulative_seq_len(lengths)[:-1].to(device) - 1] = eod
            labels = torch.randint(0, eod, (1, s), device=device)
            positions = torch.arange(s, device=device)[None]
            params = make_params(tokens, eod)
            assert params.cu_seqlens_q.numel() == len(lengths) + 1

            def step(p):
                model.zero_grad(set_to_none=True)
                model(tokens, positions, None, labels=labels, packed_seq_params=p).sum().backward()

            t_varlen = timed(lambda: step(params), 1, max(1, args.reps // 2), device)
            t_causal = timed(lambda: step(None), 1, max(1, args.reps // 2), device)
            rows.append(dict(backend=backend, mean=mean, docs=len(lengths),
                             varlen_ms=t_varlen * 1e3, causal_ms=t_causal * 1e3,
                             speedup=t_causal / t_varlen))
        model = None
    if topology is not None:
        ParallelTopology.destroy()
        torch.distributed.destroy_process_group()
    return rows


def table(rows, columns):
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in columns]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(fmt(r[c]).rjust(w) for c, w in zip(columns, widths)) + " |"
              for r in rows]
    return "\n".join(lines)


def main():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    platform.apply()
    device = platform.device()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    kv_heads = args.kv_heads or args.heads
    if args.clock == "process":
        if device.type == "cuda":
            raise SystemExit("--clock process measures CPU work; use wall time on a GPU")
        global CLOCK
        CLOCK = time.process_time
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().reset()
    tensor_parallel.get_cuda_rng_tracker().add("model-parallel-rng", args.seed + 1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = (f"{name}; torch {torch.__version__}; {dtype}; seq {args.seq_length}, heads "
              f"{args.heads}, kv heads {kv_heads}, head dim {args.head_dim}; median of "
              f"{args.reps}, {args.clock} clock")
    print(f"# {header}\n")
    skipped = {}
    rows = bench_attention(args, device, dtype, kv_heads, skipped)
    print("Attention forward+backward (TFLOP/s: useful per-document causal FLOPs x 3.5)\n")
    print(table(rows, ["backend", "mean", "docs", "varlen_ms", "causal_ms", "speedup",
                       "varlen_tflops", "causal_tflops"]))
    result = dict(header=header, skipped=skipped, attention=rows)
    if args.e2e:
        tensor_parallel.get_cuda_rng_tracker().reset()
        rows = bench_e2e(args, device, dtype, kv_heads)
        print(f"\nGPTModel forward+backward, {args.e2e_layers} layers, vocab {args.e2e_vocab}\n")
        print(table(rows, ["backend", "mean", "docs", "varlen_ms", "causal_ms", "speedup"]))
        result["e2e"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
