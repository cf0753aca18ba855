"""`preprocess_data.py`: text files to Megatron indexed datasets, one per JSON key.

    python preprocess_data.py --input data/*.jsonl --output-prefix out/corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \\
        --append-eod --workers 2

writes `out/corpus_text_document.bin/.idx`. Merge mode:
`python preprocess_data.py --merge --input-prefixes A B --output-prefix C`. Instruction data
(`--handler-name ... --prompt-type ...`, token ids + loss mask, optionally packed) goes through
the same reader, workers and progress: see `megatron_ext/data/instruction.py`.

The main process reads raw chunks and writes; N worker processes parse and tokenize. Output
order is input order. torch is never imported, so start-up takes well under a second.
"""

import argparse
import multiprocessing
import os
import sys
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import chain
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_ext.data.indexed import IndexedDatasetWriter, as_token_array, best_dtype
from megatron_ext.data.readers import (Chunk, InputError, check_keys_fit, chunk_texts,
                                       expand_inputs, read_chunks)
from megatron_ext.tokenizer import TOKENIZER_TYPES, build_tokenizer

SKIP_HINT = "; fix it, or pass --skip-invalid to skip and count such records"
# With --skip-invalid, the first few skipped records are named, so a systematic problem
# (a wrong --json-keys) is visible before the summary.
SHOWN_SKIPS = 10


@dataclass
class Summary:
    read: int = 0  # records seen, valid or not
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    tokens: Dict[str, int] = field(default_factory=dict)  # per key, EODs included
    empty: Dict[str, int] = field(default_factory=dict)  # per key: no tokens before EOD

    @property
    def written(self) -> int:
        return self.read - self.skipped

    def rates(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return (f"{self.read / seconds:.0f} docs/s, {self.bytes / seconds / 1e6:.2f} MB/s, "
                f"{sum(self.tokens.values()) / seconds:.0f} tokens/s")

    def report(self) -> str:
        per_key = "; ".join(f"{k}: {self.tokens[k]} tokens, {self.empty[k]} empty"
                            for k in self.tokens)
        return (f"done: {self.read} documents read, {self.written} written, {self.skipped} "
                f"skipped; {per_key}; {self.bytes / 1e6:.2f} MB in {self.seconds:.2f} s "
                f"({self.rates()})")


@dataclass
class _ChunkResult:
    read: int
    skipped: int
    nbytes: int
    error: Optional[str]
    arrays: List[tuple]  # per key: (tokens, lengths)
    empty: List[int]  # per key
    skips: List[str] = field(default_factory=list)  # the first few skipped records


_STATE = {}


def _init_worker(tokenizer_args: tuple, keys: Sequence[str], append_eod: bool,
                 skip_invalid: bool, dtype, single_threaded: bool) -> None:
    if single_threaded:
        # Processes are the parallelism; HF `tokenizers` threads would only contend.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE.update(tokenizer=build_tokenizer(*tokenizer_args), keys=list(keys),
                  append_eod=append_eod, skip_invalid=skip_invalid, dtype=np.dtype(dtype))


def _tokenize(tokenizer, texts: List[str], bad: Dict[int, str]) -> List[List[int]]:
    try:
        return tokenizer.tokenize_batch(texts)
    except ValueError:
        pass
    # Some document cannot be tokenized (e.g. a non-integer for NullTokenizer): find which.
    ids = []
    for i, text in enumerate(texts):
        try:
            ids.append(tokenizer.tokenize(text))
        except ValueError as e:
            bad.setdefault(i, str(e))
            ids.append([])
    return ids


def encode_chunk(chunk: Chunk) -> _ChunkResult:
    """Parse and tokenize one chunk (in a worker) into per-key token arrays."""
    keys, skip = _STATE["keys"], _STATE["skip_invalid"]
    wheres, columns, skips = [], [[] for _ in keys], []
    read = skipped = 0
    error = None
    for where, texts in chunk_texts(chunk, keys):
        read += 1
        if isinstance(texts, str):
            if not skip:
                error = f"{where}: {texts}"
                break  # the records before it may hold an earlier, tokenizer-found error
            skipped += 1
            skips.append(f"{where}: {texts}")
            continue
        wheres.append(where)
        for column, text in zip(columns, texts):
            column.append(text)

    bad: Dict[int, str] = {}
    tokenized = [_tokenize(_STATE["tokenizer"], column, bad) for column in columns]
    if bad and not skip:
        error = f"{wheres[min(bad)]}: {bad[min(bad)]}"
    if error:
        return _ChunkResult(read, skipped, chunk.nbytes, error, [], [])
    if bad:
        skipped += len(bad)
        skips.extend(f"{wheres[i]}: {bad[i]}" for i in sorted(bad))
        tokenized = [[d for i, d in enumerate(docs) if i not in bad] for docs in tokenized]

    arrays, empty = [], []
    eod = _STATE["tokenizer"].eod
    for docs in tokenized:
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        empty.append(int(np.count_nonzero(lengths == 0)))
        if _STATE["append_eod"]:
            for doc in docs:
                doc.append(eod)
            lengths += 1
        flat = np.fromiter(chain.from_iterable(docs), np.int64, int(lengths.sum()))
        arrays.append((as_token_array(flat, _STATE["dtype"], chunk.path), lengths))
    return _ChunkResult(read, skipped, chunk.nbytes, None, arrays, empty, skips[:SHOWN_SKIPS])


def _encoded(chunks, workers: int, init_args: tuple, stack: ExitStack, init=None, encode=None):
    """Encoded chunks in input order; at most a few chunks in flight per worker. `init` and
    `encode` (module-level functions) default to the pretraining text path's."""
    init, encode = init or _init_worker, encode or encode_chunk
    if workers == 1:
        init(*init_args)
        yield from map(encode, chunks)
        return
    methods = multiprocessing.get_all_start_methods()
    # fork starts workers in milliseconds, with the tokenizer modules already imported.
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = stack.enter_context(context.Pool(workers, init, init_args))
    pending = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(encode, (chunk,)))
        if len(pending) >= 4 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def checked(results, summary: Summary, start: float, log, log_interval: int):
    """Yield encoded chunks in order; raise the first bad record's error; after each chunk is
    consumed, report its first skips and count it, with a progress line every `log_interval`."""
    next_log = log_interval
    for result in results:
        if result.error:
            raise InputError(result.error + SKIP_HINT)
        yield result
        for skip in result.skips[:max(0, SHOWN_SKIPS - summary.skipped)]:
            print(f"skipped {skip}", file=log)
        summary.read += result.read
        summary.skipped += result.skipped
        summary.bytes += result.nbytes
        if log_interval and summary.read >= next_log:
            summary.seconds = time.perf_counter() - start
            print(f"processed {summary.read} documents ({summary.rates()})", file=log)
            next_log = (summary.read // log_interval + 1) * log_interval


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_type: str,
               tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None,
               json_keys: Sequence[str] = ("text",), append_eod: bool = False,
               workers: int = 1, log_interval: int = 10000, skip_invalid: bool = False,
               log=sys.stderr) -> Summary:
    """Tokenize `inputs` into `{output_prefix}_{key}_document.bin/.idx` per key.

    Raises ValueError (InputError for bad data) before creating any file when the
    tokenizer or the inputs are wrong; on a failure half-way no output file is left.
    """
    start = time.perf_counter()
    tokenizer_args = (tokenizer_type, tokenizer_model, vocab_size)
    tokenizer = build_tokenizer(*tokenizer_args)
    files = expand_inputs(inputs)
    check_keys_fit(files, json_keys)
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    dtype = best_dtype(tokenizer.vocab_size)
    if os.path.dirname(output_prefix):
        os.makedirs(os.path.dirname(output_prefix), exist_ok=True)

    summary = Summary(tokens={k: 0 for k in json_keys}, empty={k: 0 for k in json_keys})
    init_args = (tokenizer_args, json_keys, append_eod, skip_invalid, dtype, workers > 1)
    with ExitStack() as stack:
        writers = [stack.enter_context(IndexedDatasetWriter(output_prefix_for(output_prefix, k),
                                                            dtype)) for k in json_keys]
        chunks = (chunk for path in files for chunk in read_chunks(path, json_keys))
        results = _encoded(chunks, workers, init_args, stack)
        for result in checked(results, summary, start, log, log_interval):
            for key, writer, (tokens, lengths), empty in zip(json_keys, writers, result.arrays,
                                                            result.empty):
                writer.add_documents(tokens, lengths)
                summary.tokens[key] += tokens.size
                summary.empty[key] += empty
    summary.seconds = time.perf_counter() - start
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize JSONL/JSON/TXT/Parquet text into Megatron indexed datasets.")
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", metavar="PATH",
                       help="files, directories (recursive) or globs: .jsonl, .json, .txt "
                            "(one document per line), each optionally .gz, and .parquet")
    group.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                       help="keys (Parquet columns) to tokenize, one output each "
                            "(default: text)")
    group.add_argument("--skip-invalid", action="store_true",
                       help="skip and count malformed records instead of stopping")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=list(TOKENIZER_TYPES))
    group.add_argument("--tokenizer-model", "--tokenizer-name-or-path", dest="tokenizer_model",
                       help="SentencePiece .model, tokenizer.json, or a saved HF directory")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer: ids are in [0, V)")
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's EOD id to every document")
    group = parser.add_argument_group("output and runtime")
    group.add_argument("--output-prefix", required=True,
                       help="writes PREFIX_{key}_document.bin/.idx (merge: PREFIX.bin/.idx)")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="progress line every N documents (0: none)")
    from megatron_ext.data.handlers import HANDLERS
    from megatron_ext.data.instruction import OVERLONG
    from megatron_ext.data.templates import prompt_types

    group = parser.add_argument_group(
        "instruction data (fine-tuning; writes PREFIX_input_ids_document and "
        "PREFIX_loss_mask_document, see docs/finetune.md)")
    group.add_argument("--handler-name", choices=list(HANDLERS),
                       help="read records as conversations in this format (default: pretraining "
                            "text)")
    group.add_argument("--prompt-type", metavar="NAME",
                       help=f"chat template: {', '.join(prompt_types())} (hf: the tokenizer's "
                            "chat_template), or a template .json file")
    group.add_argument("--map-keys", metavar="JSON",
                       help="rename the fields a handler reads, e.g. '{\"prompt\": \"question\"}'")
    group.add_argument("--pack", action="store_true",
                       help="pack conversations into samples of --seq-length (+1) tokens")
    group.add_argument("--seq-length", type=int, metavar="N",
                       help="the training --seq-length: a sample holds N + 1 tokens")
    group.add_argument("--overlong", choices=OVERLONG, default="drop",
                       help="a conversation longer than --seq-length + 1 tokens: drop it "
                            "(default) or truncate it; counted in the summary")
    group = parser.add_argument_group("merge mode")
    group.add_argument("--merge", action="store_true",
                       help="concatenate existing datasets instead of tokenizing")
    group.add_argument("--input-prefixes", nargs="+", metavar="PREFIX",
                       help="datasets to merge, in order (a directory means all its pairs)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        if not args.input_prefixes or args.input:
            parser.error("--merge takes --input-prefixes (and no --input)")
    elif args.input_prefixes:
        parser.error("--input-prefixes is for --merge")
    elif not args.input or not args.tokenizer_type:
        parser.error("--input and --tokenizer-type are required (or --merge)")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    instruction_flags = [flag for flag, given in (
        ("--prompt-type", args.prompt_type), ("--map-keys", args.map_keys), ("--pack", args.pack),
        ("--seq-length", args.seq_length is not None),
        ("--overlong", args.overlong != "drop")) if given]
    if args.handler_name:
        if args.merge or args.append_eod or args.json_keys != ["text"]:
            parser.error("--handler-name (instruction data) takes no --merge, --append-eod or "
                         "--json-keys: the template ends every turn, the handler picks the fields")
        if not args.prompt_type:
            parser.error("--handler-name needs --prompt-type (a chat template)")
        if args.pack and args.seq_length is None:
            parser.error("--pack needs --seq-length (the training --seq-length)")
    elif instruction_flags:
        parser.error(f"{', '.join(instruction_flags)}: only with --handler-name (instruction data)")
    try:
        if args.handler_name:
            from megatron_ext.data.instruction import output_prefixes, preprocess_instructions

            summary = preprocess_instructions(
                args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                args.vocab_size, args.handler_name, args.prompt_type, args.map_keys, args.pack,
                args.seq_length, args.overlong, args.workers, args.log_interval,
                args.skip_invalid)
            print(summary.report(), file=sys.stderr)
            for prefix in output_prefixes(args.output_prefix):
                print(f"wrote {prefix}.bin/.idx", file=sys.stderr)
            return
        if args.merge:
            from megatron_ext.data.merge import merge_datasets

            merge_datasets(args.input_prefixes, args.output_prefix, log=sys.stderr)
            return
        summary = preprocess(args.input, args.output_prefix, args.tokenizer_type,
                             args.tokenizer_model, args.vocab_size, args.json_keys,
                             args.append_eod, args.workers, args.log_interval,
                             args.skip_invalid)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(summary.report(), file=sys.stderr)
    for key in args.json_keys:
        print(f"wrote {output_prefix_for(args.output_prefix, key)}.bin/.idx", file=sys.stderr)
