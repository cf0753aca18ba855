"""Benchmark: LoRA vs full fine-tuning of the same model, memory and step time (prints a table).

Each run builds a ``Trainer`` from Megatron-LM flags (mock data) in fresh forked gloo ranks
(``tests.launcher.launch``), runs ``--warmup`` untimed and ``--steps`` timed training steps, and
reports per rank (the largest over ranks):
- trainable parameters, and the bytes of what training keeps for them: megatron-core DDP's
  gradient buffers (``main_grad``) and the optimizer state (Adam's moments, counted from the
  optimizer's own tensors); the frozen base has neither under LoRA;
- peak RSS growth of the rank process over the run (``ru_maxrss`` after the steps minus the RSS
  before the Trainer is built): weights, gradients, optimizer state, activations, allocator;
- the median step time (a step between two barriers, the slowest rank's).

    python bench/lora.py                                   # single process and TP=2
    python bench/lora.py --only single --lora-r 8
"""

import argparse
import os
import resource
import statistics
import sys
import time
import warnings

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")  # Transformer Engine / Apex fallbacks, once per import

import torch  # noqa: E402

from bench.train_step import COMMON  # noqa: E402

# A small Llama-style model whose weights outweigh its activations (short sequences, one
# sample per micro-batch), as in fine-tuning a large model: 4 layers, hidden 768, SwiGLU FFN
# 2048, 12 heads in 4 KV groups, vocabulary 4096 (about 30M parameters).
MODEL = (
    "--num-layers 4 --hidden-size 768 --ffn-hidden-size 2048 --num-attention-heads 12 "
    "--group-query-attention --num-query-groups 4 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights "
    "--seq-length 128 --attention-dropout 0 --hidden-dropout 0 --tokenizer-type NullTokenizer "
    "--vocab-size 4095 --micro-batch-size 1 --global-batch-size 2"
)

TOPOLOGIES = {"single": (1, ""), "tp2": (2, "--tensor-model-parallel-size 2")}
TARGETS = "linear_qkv linear_proj linear_fc1 linear_fc2"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _bench(argv, world_size, warmup, steps):
    import logging

    import torch.distributed as dist

    import pretrain_gpt
    from megatron_ext.config import parse_args
    from megatron_ext.training.data import data_iterator
    from megatron_ext.training.trainer import Trainer

    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    start_rss = _rss_bytes()
    config = parse_args(argv, world_size=world_size)
    config.training.train_iters = warmup + steps
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size)
    iterator = data_iterator(trainer.train_ds, 0, config.training.micro_batch_size,
                             trainer.topology.dp_rank, trainer.topology.data_parallel)
    times = []
    for step in range(warmup + steps):
        dist.barrier()
        begin = time.perf_counter()
        trainer.train_step(iterator)
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - begin)
    params = list(trainer.model[0].module.parameters())
    chained = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    optimizer_bytes = sum(t.numel() * t.element_size() for opt in chained
                          for state in opt.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    result = {
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "grad_bytes": sum(p.main_grad.numel() * p.main_grad.element_size() for p in params
                          if getattr(p, "main_grad", None) is not None),
        "optimizer_bytes": optimizer_bytes,
        "peak_rss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss,
        "times": times,
    }
    trainer.close()
    return result


def _mb(count: float) -> str:
    return f"{count / 2**20:.1f}"


def main(argv=None) -> int:
    from tests.launcher import launch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(TOPOLOGIES), default=None)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lora = f"--lora-target-modules {TARGETS} --lora-r {args.lora_r} --lora-alpha {2 * args.lora_r}"
    print(f"model: {MODEL}")
    print(f"LoRA: {lora}; {args.warmup} warmup + {args.steps} timed steps\n")
    print("| layout | training | trainable params (per rank) | grad buffers MB | optimizer state "
          "MB | peak RSS growth MB | step ms (median) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only or TOPOLOGIES:
        ranks, flags = TOPOLOGIES[name]
        for mode, extra in (("full", ""), ("LoRA", lora)):
            argv = f"{MODEL} {COMMON} {flags} {extra}".split()
            results = launch(_bench, ranks, argv, ranks, args.warmup, args.steps)
            worst = {k: max(r[k] for r in results) for k in
                     ("params", "trainable", "grad_bytes", "optimizer_bytes", "peak_rss_growth")}
            step = statistics.median(max(r["times"][i] for r in results)
                                     for i in range(args.steps))
            print(f"| {name} | {mode} | {worst['trainable']:,} of {worst['params']:,} | "
                  f"{_mb(worst['grad_bytes'])} | {_mb(worst['optimizer_bytes'])} | "
                  f"{_mb(worst['peak_rss_growth'])} | {step * 1000:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
