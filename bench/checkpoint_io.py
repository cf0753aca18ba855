"""Benchmark: checkpoint save and load, ``--ckpt-format torch`` vs ``torch_dist`` (prints a table).

One process (world size 1, gloo) builds the Trainer for a ~1B-parameter Llama-style model
(fp32), saves a checkpoint in each format and loads it back into a second Trainer, timing
``save_checkpoint`` and ``load_checkpoint`` alone. Peak host memory is sampled every 20 ms as
the RSS of the process plus the unique (private) memory of its children (the torch_dist writer
forks processes that share the parent's pages copy-on-write), reported above the value before
the call. The optimizer is fresh (its Adam moments are allocated at the first step):
the checkpoints hold weights, optimizer param groups, scheduler and RNG, and are loaded with
``--no-load-optim`` (weights, RNG, iteration); Adam moments would
add two more copies of the weights. Host memory needed: about 2x the weights for the model and
its gradient buffer, plus the load's transient copy (~3x in all: 11.5 GB at 16 layers).

    python bench/checkpoint_io.py                 # ~1B: 16 layers, hidden 2048, SwiGLU FFN 5632
    python bench/checkpoint_io.py --layers 8      # ~0.5B
"""

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")

import psutil  # noqa: E402
import torch  # noqa: E402


def model_flags(layers: int) -> list:
    return (
        f"--num-layers {layers} --hidden-size 2048 --ffn-hidden-size 5632 "
        "--num-attention-heads 16 --group-query-attention --num-query-groups 16 --swiglu "
        "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
        "--untie-embeddings-and-output-weights --seq-length 16 --attention-dropout 0 "
        "--hidden-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 31999 "
        "--micro-batch-size 1 --train-iters 1 --eval-iters 0 --eval-interval 0"
    ).split()


class PeakRss:
    """Peak RSS of the process + unique memory of its children, above the starting value."""

    def __init__(self):
        self.proc = psutil.Process()

    def _rss(self):
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_full_info().uss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self.start = self._rss()
        self.peak, self.running = self.start, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())


def checksums(model) -> dict:
    return {k: (v.double().sum().item(), v.double().abs().sum().item())
            for k, v in model.state_dict().items() if torch.is_tensor(v)}


def disk_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(fmt: str, layers: int, root: str) -> dict:
    import pretrain_gpt
    from megatron_ext.config import parse_args
    from megatron_ext.training import checkpointing
    from megatron_ext.training.trainer import Trainer

    save = os.path.join(root, fmt)
    argv = model_flags(layers) + ["--ckpt-format", fmt, "--save", save]
    trainer = Trainer(parse_args(argv, world_size=1), pretrain_gpt.forward_step, world_size=1)
    params = sum(p.numel() for p in trainer.model[0].module.parameters())
    # Checksums, not copies: a copy of the weights would take as much memory as a checkpoint.
    expected = checksums(trainer.model[0].module)
    weights = sum(p.numel() * p.element_size() for p in trainer.model[0].module.parameters())
    with PeakRss() as save_mem:
        start = time.perf_counter()
        checkpointing.save_checkpoint(trainer)
        save_s = time.perf_counter() - start
    trainer.close()
    del trainer
    gc.collect()
    # A different seed: the load must overwrite every weight.
    trainer = Trainer(parse_args(model_flags(layers) + ["--seed", "7"], world_size=1),
                      pretrain_gpt.forward_step, world_size=1)
    trainer.config.checkpoint.load = save
    trainer.config.checkpoint.no_load_optim = True  # nothing to load: no step was taken
    with PeakRss() as load_mem:
        start = time.perf_counter()
        checkpointing.load_checkpoint(trainer)
        load_s = time.perf_counter() - start
    assert checksums(trainer.model[0].module) == expected, "weights differ"
    trainer.close()
    del trainer
    gc.collect()
    result = dict(fmt=fmt, params=params, disk=disk_bytes(save), save_s=save_s, load_s=load_s,
                  save_mem=save_mem.peak - save_mem.start, load_mem=load_mem.peak - load_mem.start,
                  weights=weights)
    shutil.rmtree(save)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    opts = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", MEGATRON_EXT_DEVICE="cpu")
    root = tempfile.mkdtemp(dir=opts.dir, prefix="ckpt-bench-")
    try:
        rows = [run(fmt, opts.layers, root) for fmt in ("torch", "torch_dist")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gib = 2 ** 30
    print(f"model: {rows[0]['params'] / 1e9:.2f}B parameters, fp32 weights "
          f"{rows[0]['weights'] / gib:.2f} GiB; load average {os.getloadavg()[0]:.1f}")
    print("| format | on disk GiB | save s | save GiB/s | save peak RSS +GiB | load s | "
          "load GiB/s | load peak RSS +GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['fmt']} | {r['disk'] / gib:.2f} | {r['save_s']:.1f} | "
              f"{r['disk'] / gib / r['save_s']:.2f} | {r['save_mem'] / gib:.2f} | "
              f"{r['load_s']:.1f} | {r['disk'] / gib / r['load_s']:.2f} | "
              f"{r['load_mem'] / gib:.2f} |")


if __name__ == "__main__":
    main()
