"""Check every varlen attention kernel against the exact fp32 reference (not a test; prints a table).

Each case packs documents into ``micro_batch x seq`` tokens with an EOD ending each document,
takes the boundaries the way training does (``megatron_ext.training.packing.packed_seq_params``
over the ``[b, s]`` tokens, flattened in (b, s) order), and runs the kernel through
``megatron_ext.model.attention_backends.varlen_attention``, forward and backward, in bf16 and
fp16. The reference is the plain masked-softmax math of ``tests/model/test_attention.py::_reference``
over the per-row document lengths as drawn (so a wrong flattening shows), on the same inputs
upcast to fp32 (TF32 off).

Tolerance (flash-attn's own tests' criterion, plus a sanity bound): the kernel's largest error
is at most 2x (output) or 3x (gradients) that of the same plain math computed in the low dtype
itself (+1e-5), its relative L2 error ``|x - ref| / |ref|`` is under ``REL_TOL`` for the
dtype, and nothing is NaN or inf.

    python bench/gpu/kernels.py                   # GPU sizes
    python bench/gpu/kernels.py --dry-run         # tiny sizes, any device (CPU: sdpa only)
"""

import argparse
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)

from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_ext import platform  # noqa: E402
from megatron_ext.model import attention_backends  # noqa: E402
from megatron_ext.training import packing  # noqa: E402
from tests.model.test_attention import _reference  # noqa: E402

KERNELS = ("torch", "flash", "sdpa")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
REL_TOL = {"bf16": 1e-2, "fp16": 2e-3}
EOD = 0

# name: (micro-batch, seq length per row, mean document length, heads, query groups, head dim)
CASES = {
    "many-short-gqa": (2, 4096, 64, 16, 4, 64),
    "few-long-gqa": (2, 4096, 2048, 16, 4, 128),
    "mid-mha": (1, 4096, 512, 8, 8, 128),
}
DRY_RUN_CASES = {
    "many-short-gqa": (2, 64, 6, 4, 2, 16),
    "few-long-gqa": (2, 64, 40, 4, 2, 16),
    "mid-mha": (1, 64, 16, 2, 2, 16),
}


def row_lengths(seq: int, mean: int, generator: torch.Generator) -> list:
    """Exponential document lengths (>= 1) filling one row; the first document has length 1."""
    lengths = [1]
    while sum(lengths) < seq:
        lengths.append(max(1, round(torch.empty(1).exponential_(1.0 / mean, generator=generator).item())))
    lengths[-1] -= sum(lengths) - seq
    return lengths


def packed_tokens(rows: list, device) -> torch.Tensor:
    """``[b, s]`` tokens with an EOD at each document's last position (the row's last document
    may end without one: the row end closes it)."""
    tokens = torch.ones(len(rows), sum(rows[0]), dtype=torch.int64)
    for r, lengths in enumerate(rows):
        ends = torch.tensor(lengths).cumsum(0) - 1
        tokens[r, ends[:-1]] = EOD
        if r % 2 == 0:
            tokens[r, ends[-1]] = EOD
    return tokens.to(device)


def _errors(out, ref, baseline):
    out, ref, baseline = out.float(), ref.float(), baseline.float()
    return {
        "max_abs": (out - ref).abs().max().item(),
        "rel_l2": ((out - ref).norm() / ref.norm()).item(),
        "baseline_max_abs": (baseline - ref).abs().max().item(),
        "finite": bool(torch.isfinite(out).all()),
    }


def _passes(name, err, dtype_name) -> bool:
    factor = 2 if name == "out" else 3
    return (err["finite"] and err["max_abs"] <= factor * err["baseline_max_abs"] + 1e-5
            and err["rel_l2"] <= REL_TOL[dtype_name])


def _forward_backward(fn, q, k, v, grad_out):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    return [out.detach(), *grads]


def check_case(kernel, dtype_name, case, shape, device, seed) -> dict:
    b, s, mean, heads, groups, head_dim = shape
    g = torch.Generator().manual_seed(seed)
    rows = [row_lengths(s, mean, g) for _ in range(b)]
    lengths = [n for row in rows for n in row]
    params = packing.packed_seq_params(packed_tokens(rows, device), EOD)
    dtype = DTYPES[dtype_name]
    q, k, v, grad_out = (torch.randn(b * s, n, head_dim, generator=g).to(device, dtype)
                         for n in (heads, groups, groups, heads))

    def kernel_fn(q, k, v):
        return attention_backends.varlen_attention(kernel, q, k, v, params.cu_seqlens_q,
                                                   params.max_seqlen_q)

    results = _forward_backward(kernel_fn, q, k, v, grad_out)
    ref = _forward_backward(lambda q, k, v: _reference(q, k, v, lengths),
                            q.float(), k.float(), v.float(), grad_out.float())
    baseline = _forward_backward(lambda q, k, v: _reference(q, k, v, lengths), q, k, v, grad_out)
    errors = {name: _errors(x, r, bl)
              for name, x, r, bl in zip(("out", "dq", "dk", "dv"), results, ref, baseline)}
    ok = all(_passes(name, e, dtype_name) for name, e in errors.items())
    return dict(kernel=kernel, dtype=dtype_name, case=case, docs=len(lengths),
                max_doc=max(lengths), status="ok" if ok else "FAIL", errors=errors)


def availability(kernel, dtype) -> str:
    """None when ``kernel`` runs here in ``dtype``, else why not (the library's own reasons)."""
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               num_query_groups=2, attention_dropout=0.0, params_dtype=dtype)
    return attention_backends.unavailable_reason(kernel, config)


def run(cases, device, seed=0) -> list:
    rows = []
    for kernel in KERNELS:
        for dtype_name, dtype in DTYPES.items():
            reason = availability(kernel, dtype)
            if reason is not None:
                rows.append(dict(kernel=kernel, dtype=dtype_name, case="*",
                                 status=f"not available: {reason}"))
                print(_row_line(rows[-1]), flush=True)
                continue
            for i, (case, shape) in enumerate(cases.items()):
                try:
                    rows.append(check_case(kernel, dtype_name, case, shape, device, seed + i))
                except Exception as error:  # one broken case must not hide the others
                    rows.append(dict(kernel=kernel, dtype=dtype_name, case=case,
                                     status=f"error: {type(error).__name__}: {error}"))
                print(_row_line(rows[-1]), flush=True)
    return rows


def _row_line(row) -> str:
    errors = row.get("errors")
    if not errors:
        return f"| {row['kernel']} | {row['dtype']} | {row['case']} | - | - | {row['status']} |"
    worst = " ".join(f"{name} {e['max_abs']:.2e}/{e['rel_l2']:.1e} (plain {e['baseline_max_abs']:.1e})"
                     for name, e in errors.items())
    return (f"| {row['kernel']} | {row['dtype']} | {row['case']} | {row['docs']} / {row['max_doc']} "
            f"| {worst} | {row['status']} |")


HEADER = ("| kernel | dtype | case | docs / longest | max abs / rel L2 error vs fp32 "
          "(max abs of the same math in the dtype) | status |\n|---|---|---|---|---|---|")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    platform.apply()
    device = platform.device()
    if device.type == "cuda":  # the fp32 reference must be exact fp32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cases = DRY_RUN_CASES if args.dry_run else CASES
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
          f"torch {torch.__version__}; cases (micro-batch, seq, mean doc, heads, groups, head dim): "
          f"{cases}\n")
    print(HEADER, flush=True)
    rows = run(cases, device, args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": cases, "rows": rows}, f, indent=1)
    failed = [r for r in rows if r["status"] == "FAIL" or r["status"].startswith("error")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
