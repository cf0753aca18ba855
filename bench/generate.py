"""Benchmark: decoding speed of megatron_ext.generation, KV cache vs recomputing the prefix.

A random model of the quickstart's sizes (examples/tiny_llama_model.sh: 4 layers, hidden 128,
FFN 352, 4 heads, 2 query groups, RoPE, SwiGLU; vocabulary 8000 as the quickstart tokenizer),
one process, greedy, ``--new-tokens`` tokens after a ``--prompt-length`` prompt. The time is the
answer's wall time (prefill included), median of ``--repeats``.

    python bench/generate.py                      # CPU, 1 thread, ~10 s
    python bench/generate.py --threads 2 --new-tokens 64
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_ext import platform  # noqa: E402
from megatron_ext.config import parse_args  # noqa: E402
from megatron_ext.generation.generator import Generator  # noqa: E402
from megatron_ext.generation.sampling import SamplingParams  # noqa: E402
from megatron_ext.model.gpt import build_model  # noqa: E402
from megatron_ext.parallel import ParallelTopology  # noqa: E402

VOCAB = 8000
MODEL = (
    "--num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4 "
    "--group-query-attention --num-query-groups 2 --seq-length 128 "
    "--max-position-embeddings 128 --position-embedding-type rope --normalization RMSNorm "
    "--swiglu --untie-embeddings-and-output-weights --disable-bias-linear "
    "--attention-dropout 0 --hidden-dropout 0 --mock-data --tokenizer-type NullTokenizer "
    f"--vocab-size {VOCAB - 1}"
).split()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MASTER_PORT", "29517")
    config = parse_args(MODEL, world_size=1)
    topology = ParallelTopology.from_config(config.parallel, 1)
    topology.initialize()
    platform.manual_seed(0)
    model = build_model(config, VOCAB).to(platform.device()).eval()
    prompt = torch.randint(0, VOCAB - 1, (a.prompt_length,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for cache in (True, False):
        generator = Generator(model, VOCAB, [], use_cache=cache)
        generator.generate(prompt, 4, SamplingParams())  # warm-up
        times = []
        for _ in range(a.repeats):
            start = time.perf_counter()
            generator.generate(prompt, a.new_tokens, SamplingParams())
            times.append(time.perf_counter() - start)
        t = statistics.median(times)
        rows.append(("KV cache" if cache else "recompute prefix", t, a.new_tokens / t))
    print(f"| decoding ({a.prompt_length}-token prompt, {a.new_tokens} new, {a.threads} thread(s), "
          f"{platform.device()}) | s per answer | tokens/s |")
    print("|---|---|---|")
    for name, t, rate in rows:
        print(f"| {name} | {t:.3f} | {rate:.0f} |")
    topology.destroy()


if __name__ == "__main__":
    main()
