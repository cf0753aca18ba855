"""Throughput of preprocess_data.py on the default corpus with the 8k SentencePiece model.

    python bench/preprocess.py [--min-mb 24] [--workers 1 2] [--results bench/results/x.md]

Each configuration runs the real CLI in a subprocess. Start-up is the wall time of a run on a
one-document input (imports, tokenizer load, worker start, file finalisation); steady-state
rates divide the big run's work by its wall time minus that start-up. MB per CPU-second
(user + system time of the tool and its workers) shows the efficiency even on a busy machine.
"""

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_ext.data import default_corpus  # noqa: E402
from megatron_ext.data.indexed import IndexedDatasetReader  # noqa: E402


def _run_tool(corpus: str, model: str, prefix: str, workers: int) -> tuple:
    """(wall seconds, CPU seconds of the tool and its workers)."""
    command = [sys.executable, os.path.join(ROOT, "preprocess_data.py"), "--input", corpus,
               "--output-prefix", prefix, "--tokenizer-type", "GPTSentencePieceTokenizer",
               "--tokenizer-model", model, "--append-eod", "--workers", str(workers),
               "--log-interval", "0"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir",
                        default=os.path.join(tempfile.gettempdir(), "megatron-ext-bench"))
    parser.add_argument("--min-mb", type=float, default=24.0, help="corpus size in MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs per setting")
    parser.add_argument("--results", help="also write the table, with date and machine, here")
    args = parser.parse_args()

    os.makedirs(args.work_dir, exist_ok=True)
    default_corpus.main(["--output-dir", args.work_dir])  # 8k tokenizer, skipped if present
    model = os.path.join(args.work_dir, "tokenizer.model")
    corpus = os.path.join(args.work_dir, f"bench-{args.min_mb:g}MB.jsonl")
    if not os.path.exists(corpus):
        default_corpus.build_corpus(corpus, int(args.min_mb * 1e6))
    tiny = os.path.join(args.work_dir, "one-document.jsonl")
    with open(corpus, encoding="utf-8") as src, open(tiny, "w", encoding="utf-8") as dst:
        dst.write(src.readline())
    size = os.path.getsize(corpus)

    load_before = os.getloadavg()[0]
    rows = []
    for workers in args.workers:
        prefix = os.path.join(args.work_dir, f"out-w{workers}")
        startup = min(_run_tool(tiny, model, prefix + "-tiny", workers)
                      for _ in range(args.repeats))[0]
        total, cpu = min(_run_tool(corpus, model, prefix, workers) for _ in range(args.repeats))
        dataset = IndexedDatasetReader(prefix + "_text_document")
        steady = total - startup
        rows.append((workers, dataset.num_documents / steady, size / steady / 1e6,
                     dataset.num_tokens / steady, startup, total, size / cpu / 1e6))

    base = rows[0][2]
    lines = [f"corpus: {size / 1e6:.1f} MB, {dataset.num_documents} documents, "
             f"{dataset.num_tokens} tokens (GPTSentencePieceTokenizer, 8k BPE, --append-eod); "
             f"best of {args.repeats}",
             "",
             "| workers | docs/s | MB/s | tokens/s | start-up s | total s | speed-up "
             "| MB per CPU-s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workers, docs, mb, tokens, startup, total, per_cpu in rows:
        lines.append(f"| {workers} | {docs:,.0f} | {mb:.2f} | {tokens:,.0f} | {startup:.2f} | "
                     f"{total:.2f} | {mb / base:.2f}x | {per_cpu:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.results:
        header = (f"# preprocess_data.py throughput (CPU)\n\n"
                  f"- date: {datetime.date.today().isoformat()}\n"
                  f"- machine: {_cpu_name()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}, {platform.system()} {platform.release()}; "
                  f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
                  "(other jobs share the machine)\n"
                  f"- command: `python bench/preprocess.py {' '.join(sys.argv[1:])}`\n\n")
        with open(args.results, "w", encoding="utf-8") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
