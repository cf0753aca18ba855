"""Start-up cost of the shard checks (megatron_ext/training/shard_checks.py) on a large shard.

    python bench/shard_scan.py [--gigabytes 1.5] [--dir /tmp] [--results bench/results/x.md]

Builds a shard of random uint16 ids (documents of 100-1500 tokens, each ending with EOD) with
numpy in a temporary directory, then times ``check_data`` as pretrain_gpt.py runs it:

- scan, cold-ish: a shard without ``.meta.json``, its pages evicted from the page cache first
  (``posix_fadvise(DONTNEED)``; the disk may still cache), no scan cache yet;
- scan, warm: the same with the file in the page cache, still no scan cache;
- cached scan: the second run with ``--data-cache-path`` (the JSON written by the first);
- metadata: a shard with ``.meta.json`` (what preprocess_data.py writes): no token is read.

Every case includes opening and checking the ``.idx`` (sizes, pointers, document index) and the
``--split`` document counts. CPU seconds (user + system) show the work on a busy machine.
"""

import argparse
import datetime
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.preprocess import _cpu_name  # noqa: E402
from megatron_ext.config import parse_args  # noqa: E402
from megatron_ext.data.indexed import IndexedDatasetWriter  # noqa: E402
from megatron_ext.data.shard_meta import ShardMeta, write_meta  # noqa: E402
from megatron_ext.tokenizer import build_tokenizer  # noqa: E402
from megatron_ext.training.shard_checks import check_data, open_shard  # noqa: E402

VOCAB = 32000  # NullTokenizer --vocab-size 32000: EOD 32000, ids below it
CHUNK_TOKENS = 32 << 20


def build_shard(prefix: str, gigabytes: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    total = int(gigabytes * 1e9) // 2
    written = 0
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        while written < total:
            n = min(CHUNK_TOKENS, total - written)
            lengths = rng.integers(100, 1501, n // 100 + 1)
            lengths = lengths[np.cumsum(lengths) <= n]
            if lengths.size == 0:  # less than a document left
                break
            n = int(lengths.sum())
            tokens = rng.integers(0, VOCAB, n, dtype=np.uint16)
            tokens[np.cumsum(lengths) - 1] = VOCAB  # EOD ends every document
            writer.add_documents(tokens, lengths)
            written += n
    return written


def evict(path: str) -> None:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed_check(prefix: str, cache: str) -> tuple:
    argv = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 1024 "
            "--micro-batch-size 1 --train-iters 1000 --eval-interval 100 --eval-iters 10 "
            f"--tokenizer-type NullTokenizer --vocab-size {VOCAB} --reset-position-ids "
            f"--data-path {prefix} --data-cache-path {cache} --split 98,1,1").split()
    config = parse_args(argv, world_size=1)
    tokenizer = build_tokenizer("NullTokenizer", None, VOCAB)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    check_data(config, tokenizer)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.5)
    parser.add_argument("--dir", default=None, help="where the temporary shard goes")
    parser.add_argument("--repeats", type=int, default=3, help="best of N per case")
    parser.add_argument("--results", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="shard_scan_", dir=args.dir)
    try:
        prefix = os.path.join(work, "big_text_document")
        started = time.perf_counter()
        tokens = build_shard(prefix, args.gigabytes)
        build_s = time.perf_counter() - started
        size_gb = os.path.getsize(prefix + ".bin") / 1e9
        documents = open_shard(prefix).num_documents
        rows = []

        def case(name, prepare):
            best = None
            for repeat in range(args.repeats):
                cache = os.path.join(work, f"cache-{len(rows)}-{repeat}")
                prepare(cache)
                result = timed_check(prefix, cache)
                best = result if best is None or result[0] < best[0] else best
            rows.append((name, *best))

        case("scan, cold-ish", lambda cache: evict(prefix + ".bin"))
        case("scan, warm", lambda cache: None)
        warm = os.path.join(work, "cache-shared")
        timed_check(prefix, warm)  # writes the scan cache
        case("cached scan", lambda cache: shutil.copytree(warm, cache))
        write_meta(prefix, ShardMeta(
            num_documents=documents, num_tokens=tokens, max_id=VOCAB - 1,
            bin_bytes=os.path.getsize(prefix + ".bin"), idx_bytes=os.path.getsize(prefix + ".idx"),
            tokenizer_type="NullTokenizer", vocab_size=VOCAB + 1, eod=VOCAB, eod_appended=True,
            tool="bench/shard_scan.py"))
        case("metadata (.meta.json)", lambda cache: None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"shard: {size_gb:.2f} GB .bin (uint16), {tokens:,} tokens, {documents:,} documents "
        f"(built in {build_s:.1f} s); best of {args.repeats}",
        "",
        "| case | wall s | s per GB | CPU s |",
        "|---|---:|---:|---:|",
    ]
    for name, wall, cpu in rows:
        lines.append(f"| {name} | {wall:.3f} | {wall / size_gb:.3f} | {cpu:.3f} |")
    header = [
        "# Shard checks at start-up (CPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"Linux {platform.release()}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other jobs share the machine)",
        f"- command: `python bench/shard_scan.py {' '.join(argv or sys.argv[1:])}`",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.results:
        with open(args.results, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
