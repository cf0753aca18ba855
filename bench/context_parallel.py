"""Benchmark: activation memory per rank and tokens/s of context parallelism (prints a table).

Each (sequence length, CP, --cp-comm-type) builds a ``Trainer`` from Megatron-LM flags on CP
ranks (``--context-parallel-size CP --cp-comm-type allgather``, ``a2a``, ``p2p`` or ``a2a+p2p``
with ``--hierarchical-context-parallel-sizes A CP/A``, mock data, micro-batch 1, global batch 1:
every rank holds 1/CP of one sequence), then:

- activation memory per rank: the storages autograd saves for backward during one micro-batch's
  forward (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded; as
  tests/training/test_summary.py measures them), the largest over the CP ranks. This is what a
  rank keeps alive between forward and backward, exactly, without allocator noise; on a GPU
  the peak allocated memory of a step is reported too. With CP it should fall about as 1/CP
  (each rank keeps its own tokens; allgather adds the whole sequence's K and V per layer, small
  next to the rest with GQA; a2a holds the whole rows of heads / CP instead of its columns of
  all heads, the same size; p2p keeps only its own K/V, the ring's blocks are freed each step;
  a2a+p2p keeps the whole rows of its inner group's chunks for heads / A, the same size again);
- tokens/s: sequence length / the median step time (each step timed between barriers, a step's
  time is its slowest rank's), after the warm-up steps.

Documents are isolated (``--reset-position-ids``) unless ``--causal``; megatron-core's mock
documents are 1..4095 tokens long, so long sequences hold many.

CPU (default; forked gloo ranks, one torch thread each; a tiny model):

    python bench/context_parallel.py                                  # seq 2k..16k, CP 1, 2, 4
    python bench/context_parallel.py --seq-lengths 2048 --cp 1 2 --cp-comm-type a2a

A (CP, --cp-comm-type) the model cannot run (a2a needs the KV groups divisible by CP: the CPU
model's 2 groups stop it at CP=4) is reported as skipped with the configuration error; so is
a2a+p2p where CP / A < 2 (a ring of one rank is a2a alone).

GPU (``--gpu``; one rank per GPU, NCCL, bf16, a 0.6B-parameter Llama shape, full activation
recomputation; a CP size needs that many GPUs and is reported as skipped otherwise):

    python bench/context_parallel.py --gpu                            # seq 32k..128k
    python bench/context_parallel.py --gpu --dry-run                  # rehearsal, tiny sizes
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")  # Transformer Engine / Apex fallbacks, once per import

# Tiny Llama-style model: 2 layers, hidden 128, 8 heads in 2 KV groups (GQA).
CPU_MODEL = (
    "--num-layers 2 --hidden-size 128 --num-attention-heads 8 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0 "
    "--hidden-dropout 0 --tokenizer-type NullTokenizer --vocab-size 1023"
)
# 0.6B-parameter Llama shape: 12 layers, hidden 2048, 16 heads of 128 in 8 KV groups, SwiGLU
# FFN 5632, vocabulary 32000 (the fp32 logits of 128k tokens are 16 GB already).
GPU_MODEL = (
    "--num-layers 12 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16 "
    "--group-query-attention --num-query-groups 8 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --rotary-base 500000 --disable-bias-linear "
    "--attention-dropout 0 --hidden-dropout 0 --bf16 --tokenizer-type NullTokenizer "
    "--vocab-size 31999 --recompute-granularity full --recompute-method uniform "
    "--recompute-num-layers 1"
)
COMMON = ("--mock-data --micro-batch-size 1 --global-batch-size 1 --lr 1e-4 --lr-warmup-iters 1 "
          "--log-interval 1000000 --eval-iters 0")
CPU_SEQ, GPU_SEQ, DRY_SEQ = [2048, 4096, 8192, 16384], [32768, 65536, 131072], [512, 1024]
SCHEMES = ("allgather", "a2a", "p2p", "a2a+p2p")


def _saved_bytes(trainer) -> int:
    """Storages autograd saves during one micro-batch's forward (then backward, to free them)."""
    import torch

    from megatron_ext.training.data import data_iterator

    module = trainer.model[0]
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    iterator = data_iterator(trainer.train_ds, 0, 1, trainer.topology.dp_rank,
                             trainer.topology.data_parallel)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output, loss_func = trainer.forward_step(iterator, module)
        loss_func(output)[0].backward()
    return sum(storages.values())


def _bench(argv, world_size, warmup, steps):
    """On every rank: activation bytes of one micro-batch, then the timed train steps."""
    import logging

    import torch
    import torch.distributed as dist

    import pretrain_gpt
    from megatron_ext.config import parse_args
    from megatron_ext.training.data import data_iterator
    from megatron_ext.training.trainer import Trainer

    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    config = parse_args(argv, world_size=world_size)
    config.training.train_iters = warmup + steps + 1
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size)
    for chunk in trainer.model:
        chunk.train()
    cuda = torch.cuda.is_available()
    saved = _saved_bytes(trainer)
    iterator = data_iterator(trainer.train_ds, 0, 1, trainer.topology.dp_rank,
                             trainer.topology.data_parallel)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for step in range(warmup + steps):
        if cuda and step == warmup:
            torch.cuda.reset_peak_memory_stats()
        sync()
        dist.barrier()
        start = time.perf_counter()
        stats = trainer.train_step(iterator)
        sync()
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    result = dict(saved_bytes=saved, times=times, loss=stats["lm loss"],
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    trainer.close()
    return result


def _row(seq, cp, results):
    per_step = [max(r["times"][i] for r in results) for i in range(len(results[0]["times"]))]
    step_s = statistics.median(per_step)
    peaks = [r["peak_gib"] for r in results if r["peak_gib"] is not None]
    return dict(seq=seq, cp=cp, step_s=step_s, tokens_per_s=seq / step_s,
                activation_mib=max(r["saved_bytes"] for r in results) / 2**20,
                peak_gib=max(peaks) if peaks else None, loss=results[0]["loss"])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="0.6B model, bf16, one rank per GPU")
    p.add_argument("--dry-run", action="store_true", help="--gpu path at tiny sizes, here")
    p.add_argument("--seq-lengths", type=int, nargs="+")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--cp-comm-type", nargs="+", default=list(SCHEMES), choices=SCHEMES,
                   help="schemes compared at each CP > 1")
    p.add_argument("--a2a-size", type=int, default=2,
                   help="a2a+p2p: the all-to-all group size A (the ring: CP / A)")
    p.add_argument("--causal", action="store_true", help="no --reset-position-ids")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    # The parent never initializes CUDA: the ranks are forked (tests/launcher.py).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    from megatron_ext.config import ConfigError, parse_args
    from tests.launcher import launch

    gpu = args.gpu and not args.dry_run
    if gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device (--dry-run rehearses it at tiny size here)")
    if not gpu:
        os.environ["MEGATRON_EXT_DEVICE"] = "cpu"
    devices = torch.cuda.device_count() if gpu else os.cpu_count()
    model = GPU_MODEL if gpu else CPU_MODEL
    seqs = args.seq_lengths or (GPU_SEQ if gpu else DRY_SEQ if args.dry_run else CPU_SEQ)
    rows, skipped = [], []
    for seq in seqs:
        for cp, comm in [(cp, comm) for cp in args.cp
                         for comm in (args.cp_comm_type if cp > 1 else ["allgather"])]:
            name = f"seq {seq} CP {cp}" + (f" {comm}" if cp > 1 else "")
            if gpu and cp > devices:
                skipped.append(f"{name}: needs {cp} GPUs, {devices} here")
                continue
            hierarchical = []
            if comm == "a2a+p2p":
                if cp // args.a2a_size < 2:
                    skipped.append(f"{name}: CP {cp} / --a2a-size {args.a2a_size} leaves no "
                                   "ring (that is a2a alone)")
                    continue
                hierarchical = ["--hierarchical-context-parallel-sizes", str(args.a2a_size),
                                str(cp // args.a2a_size)]
            argv = (model + " " + COMMON).split() + [
                "--seq-length", str(seq), "--max-position-embeddings", str(seq),
                "--context-parallel-size", str(cp), "--cp-comm-type", comm, *hierarchical,
            ] + ([] if args.causal else ["--reset-position-ids"])
            try:
                parse_args(argv, world_size=cp)
            except ConfigError as error:
                skipped.append(f"{name}: {error}")
                continue
            results = launch(_bench, cp, argv, cp, args.warmup, args.steps, timeout=3600)
            label = f"{comm} {args.a2a_size}x{cp // args.a2a_size}" if hierarchical else comm
            rows.append(dict(_row(seq, cp, results), comm=label if cp > 1 else "-"))
            r = rows[-1]
            print(f"{name}: {r['activation_mib']:.1f} MiB activations per rank, "
                  f"{r['tokens_per_s']:,.0f} tokens/s", flush=True)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\ndevice: {device}; torch {torch.__version__}; model: {model}; "
          f"{'causal' if args.causal else 'documents isolated (--reset-position-ids)'}; "
          f"micro-batch 1; {args.warmup} warm-up + median of {args.steps} timed steps")
    print("\n| seq | CP | --cp-comm-type | activations per rank (MiB) | vs CP=1 | step s | "
          "tokens/s | peak allocated (GiB) | loss |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next((b for b in rows if b["seq"] == r["seq"] and b["cp"] == 1), None)
        ratio = f"{r['activation_mib'] / base['activation_mib']:.2f}x" if base else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        print(f"| {r['seq']} | {r['cp']} | {r['comm']} | {r['activation_mib']:.1f} | {ratio} | "
              f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {peak} | {r['loss']:.4f} |")
    for line in skipped:
        print(f"skipped: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, model=model, rows=rows, skipped=skipped), f, indent=1)


if __name__ == "__main__":
    main()
