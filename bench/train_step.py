"""Benchmark: training-step time and throughput of the Trainer (not a test; prints a table).

Each configuration builds a ``Trainer`` from Megatron-LM flags (mock data), runs ``--warmup``
steps untimed and then ``--steps`` timed steps. A step is timed between two barriers on every
rank; its time is the slowest rank's. The table reports the median over the timed steps and the
fastest step (on a shared machine the best step is the steadier estimate of the uncontended
cost; the median includes interference). Tokens/s = global batch x sequence length / step
time. Model FLOPs per token come from ``megatron_ext.training.metrics.flops_per_token``
(forward + backward = 3 x forward; causal attention counted as half of the score matrix;
recomputation not counted).

CPU mode (default): a tiny Llama-style model across topologies on forked gloo ranks
(``tests.launcher.launch``), one torch thread per rank; the same global batch everywhere.

    python bench/train_step.py                      # all topologies
    python bench/train_step.py --only single tp2    # a subset

GPU mode: a Llama-3.2-1B-shaped model (16 layers, hidden 2048, 32 heads / 8 KV groups, SwiGLU
FFN 8192, RMSNorm, RoPE base 500000, tied embeddings, vocabulary 128256), bf16, sequence 4096,
in one process on one GPU, reporting tokens/s, model TFLOP/s and MFU against the device's dense
bf16 peak. ``--reset-position-ids`` isolates the mock data's documents (megatron-core's mock
documents are 1..4095 tokens long) with the varlen kernel; the model FLOPs stay those of full
causal attention, so compare tokens/s. ``--dry-run`` runs the same path with a tiny model of
the same shape family on whatever device is here (bench/gpu/run.py's CPU rehearsal).

    python bench/train_step.py --gpu
    python bench/train_step.py --gpu --micro-batch-size 2 --global-batch-size 16 --reset-position-ids
    python bench/train_step.py --gpu --dry-run --warmup 1 --steps 2 --json /tmp/step.json
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

import torch  # noqa: E402

# Tiny Llama-style model for CPU: 4 layers (2 per stage at PP2), 8 heads in 4 KV groups (2 per
# rank at TP2), SwiGLU FFN 640 (Megatron's default for hidden 256), vocabulary 1024.
CPU_MODEL = (
    "--num-layers 4 --hidden-size 256 --num-attention-heads 8 --group-query-attention "
    "--num-query-groups 4 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --seq-length 256 "
    "--attention-dropout 0 --hidden-dropout 0 --tokenizer-type NullTokenizer --vocab-size 1023 "
    "--micro-batch-size 2 --global-batch-size 8"
)
CPU_TOPOLOGIES = {  # name: (ranks, flags)
    "single": (1, ""),
    "dp2": (2, ""),
    "tp2": (2, "--tensor-model-parallel-size 2"),
    "tp2-sp": (2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    "pp2": (2, "--pipeline-model-parallel-size 2"),
    "tp2-pp2": (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"),
}

# Llama-3.2-1B: 16 layers, hidden 2048, 32 heads, 8 KV heads, FFN 8192, vocab 128256, RoPE
# theta 500000, tied embeddings. NullTokenizer --vocab-size 128256 gives 128257 ids (EOD last),
# padded to 128384 for the embedding.
GPU_MODEL = (
    "--num-layers 16 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 32 "
    "--group-query-attention --num-query-groups 8 --swiglu --normalization RMSNorm "
    "--norm-epsilon 1e-5 --position-embedding-type rope --rotary-base 500000 "
    "--disable-bias-linear --seq-length 4096 --max-position-embeddings 4096 "
    "--attention-dropout 0 --hidden-dropout 0 --bf16 --tokenizer-type NullTokenizer "
    "--vocab-size 128256"
)
# The same family at rehearsal size (bench/gpu/run.py --dry-run), in bf16 like the GPU run:
# on the CPU too, so that the rehearsal takes the mixed-precision model and optimizer path.
DRY_RUN_MODEL = (
    "--num-layers 2 --hidden-size 128 --ffn-hidden-size 512 --num-attention-heads 4 "
    "--group-query-attention --num-query-groups 2 --swiglu --normalization RMSNorm "
    "--norm-epsilon 1e-5 --position-embedding-type rope --rotary-base 500000 "
    "--disable-bias-linear --seq-length 256 --max-position-embeddings 256 "
    "--attention-dropout 0 --hidden-dropout 0 --tokenizer-type NullTokenizer --vocab-size 1023"
)
COMMON = "--mock-data --lr 1e-4 --lr-warmup-iters 1 --log-interval 1000000 --eval-iters 0"


def _bench(argv, world_size, warmup, steps):
    """Runs on every rank: build a Trainer, time train steps. Returns per-step seconds."""
    import logging

    import torch.distributed as dist

    import pretrain_gpt
    from megatron_ext.config import parse_args
    from megatron_ext.training.data import data_iterator
    from megatron_ext.training.metrics import device_peak_tflops, flops_per_token
    from megatron_ext.training.trainer import Trainer

    logging.getLogger("megatron.core").setLevel(logging.ERROR)  # dataset-cache chatter
    config = parse_args(argv, world_size=world_size)
    config.training.train_iters = warmup + steps
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size)
    iterator = data_iterator(trainer.train_ds, 0, config.training.micro_batch_size,
                             trainer.topology.dp_rank, trainer.topology.data_parallel)
    for chunk in trainer.model:
        chunk.train()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times, losses = [], []
    for step in range(warmup + steps):
        sync()
        dist.barrier()
        start = time.perf_counter()
        stats = trainer.train_step(iterator)
        sync()
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(stats["lm loss"])
    result = {
        "times": times, "loss": losses[-1],
        "flops_per_token": flops_per_token(config, trainer.vocab_size),
        "tokens_per_step": config.training.global_batch_size * config.model.seq_length,
        "params": sum(p.numel() for p in trainer.model[0].module.parameters()),
        "peak_tflops": device_peak_tflops(config),
        "docs_per_sample": _docs_per_sample(trainer.train_ds, trainer.tokenizer.eod),
        "max_memory_gb": (torch.cuda.max_memory_allocated() / 2**30
                          if torch.cuda.is_available() else None),
    }
    trainer.close()
    return result


def _docs_per_sample(dataset, eod, samples=64):
    """Mean documents per sample over the first samples (a row's tail counts as one)."""
    n = min(samples, len(dataset))
    tokens = torch.stack([torch.as_tensor(dataset[i]["tokens"]) for i in range(n)])
    return float((tokens[:, :-1] == eod).sum(1).add(1).float().mean())


def _summary(results):
    steps = len(results[0]["times"])
    per_step = [max(r["times"][i] for r in results) for i in range(steps)]  # slowest rank
    step_s = statistics.median(per_step)
    first = results[0]
    tokens_per_s = first["tokens_per_step"] / step_s
    flops_per_s = tokens_per_s * first["flops_per_token"]
    return step_s, min(per_step), max(per_step), tokens_per_s, flops_per_s


def run_cpu(args):
    from tests.launcher import launch

    names = args.only or list(CPU_TOPOLOGIES)
    argv_base = (CPU_MODEL + " " + COMMON).split()
    rows = []
    for name in names:
        world_size, flags = CPU_TOPOLOGIES[name]
        results = launch(_bench, world_size, argv_base + flags.split(), world_size,
                         args.warmup, args.steps)
        step_s, fastest, slowest, tokens_per_s, flops = _summary(results)
        best_tps = results[0]["tokens_per_step"] / fastest
        rows.append((name, world_size, step_s, fastest, slowest, tokens_per_s, best_tps,
                     flops / 1e9, results[0]["loss"]))
        print(f"{name}: {step_s * 1e3:.1f} ms/step, {tokens_per_s:,.0f} tokens/s", flush=True)
    base = rows[0][5] if rows and rows[0][0] == "single" else None
    base_best = rows[0][6] if base else None
    print()
    print(f"model: {CPU_MODEL} ({results[0]['flops_per_token'] / 1e6:.1f} MFLOP/token)")
    print(f"{args.warmup} warm-up steps excluded, median of {args.steps} timed steps; "
          f"1 torch thread per rank; {os.cpu_count()} CPU cores")
    print()
    print("| topology | ranks | step ms median | best..worst ms | tokens/s median | tokens/s best "
          "| model GFLOP/s median (all ranks) | median vs single | best vs single | last loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, ranks, step_s, fastest, slowest, tps, best_tps, gflops, loss in rows:
        ratio = f"{tps / base:.2f}x" if base else "-"
        best_ratio = f"{best_tps / base_best:.2f}x" if base else "-"
        print(f"| {name} | {ranks} | {step_s * 1e3:.0f} | {fastest * 1e3:.0f}..{slowest * 1e3:.0f} "
              f"| {tps:,.0f} | {best_tps:,.0f} | {gflops:.1f} | {ratio} | {best_ratio} "
              f"| {loss:.4f} |")


def run_gpu(args):
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        sys.exit("--gpu needs a CUDA device (--dry-run rehearses it at tiny size on the CPU)")
    from tests.launcher import free_port

    # One process, no fork (CUDA must not be initialized before a fork): torchrun's env here.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port or free_port()),
                      RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    model = (DRY_RUN_MODEL + " --bf16") if args.dry_run else GPU_MODEL
    argv = (model + " " + COMMON).split() + [
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size or args.micro_batch_size),
        "--attention-backend", args.attention_backend,
    ] + (["--reset-position-ids"] if args.reset_position_ids else [])
    result = _bench(argv, 1, args.warmup, args.steps)
    step_s, fastest, slowest, tokens_per_s, flops = _summary([result])
    tflops = flops / 1e12
    peak = result["peak_tflops"]
    mfu = 100 * tflops / peak if peak else None
    device = torch.cuda.get_device_name() if cuda else "CPU"
    memory = f"{result['max_memory_gb']:.1f} GiB" if cuda else "n/a (CPU)"
    print(f"device: {device} (dense bf16 peak {peak or 'unknown'} TFLOP/s); "
          f"torch {torch.__version__}")
    print(f"model: {'tiny (dry run)' if args.dry_run else 'Llama-3.2-1B'} shape, "
          f"{result['params'] / 1e9:.3f} B parameters, {result['flops_per_token'] / 1e9:.2f} "
          f"GFLOP/token; {result['docs_per_sample']:.2f} documents per sample; "
          f"flags: {' '.join(argv)}")
    print(f"{args.warmup} warm-up steps excluded, median of {args.steps} timed steps; "
          f"peak memory {memory}")
    print()
    print("| micro-batch | global batch | reset-position-ids | step s (median) | min..max s "
          "| tokens/s | TFLOP/s | MFU | last loss |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.micro_batch_size} | {args.global_batch_size or args.micro_batch_size} "
          f"| {'yes' if args.reset_position_ids else 'no'} | {step_s:.3f} "
          f"| {fastest:.3f}..{slowest:.3f} | {tokens_per_s:,.0f} | {tflops:.1f} "
          f"| {f'{mfu:.1f}%' if mfu is not None else 'n/a'} | {result['loss']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, argv=argv, device=device, torch=torch.__version__,
                           step_s=step_s, fastest_s=fastest, slowest_s=slowest,
                           tokens_per_s=tokens_per_s, tflops=tflops, mfu_percent=mfu,
                           reset_position_ids=args.reset_position_ids), f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the ~1B model on one GPU")
    p.add_argument("--only", nargs="+", choices=list(CPU_TOPOLOGIES), help="CPU topologies")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro-batch-size", type=int, default=1, help="--gpu only")
    p.add_argument("--global-batch-size", type=int, default=8, help="--gpu only")
    p.add_argument("--attention-backend", default="auto",
                   choices=["auto", "flash", "torch", "sdpa"], help="--gpu only")
    p.add_argument("--reset-position-ids", action="store_true",
                   help="--gpu only: isolate documents (varlen attention)")
    p.add_argument("--dry-run", action="store_true",
                   help="--gpu only: a tiny model on whatever device is here")
    p.add_argument("--json", help="--gpu only: also write the result here")
    p.add_argument("--port", type=int, default=0, help="--gpu only: rendezvous port (0: a free one)")
    args = p.parse_args()
    run_gpu(args) if args.gpu else run_cpu(args)


if __name__ == "__main__":
    main()
