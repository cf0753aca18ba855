"""Text files to Megatron indexed datasets, one per JSON key (flags: ``data/cli.py``).

Instruction data (token ids + loss mask, optionally packed) goes through the same reader,
workers and progress: see ``megatron_ext/data/instruct/pipeline.py``.

The main process reads raw chunks and writes; N worker processes parse and tokenize. Output
order is input order. torch is never imported, so start-up takes well under a second.
"""

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

from megatron_ext.data.indexed import as_token_array, best_dtype
from megatron_ext.data.inputs import InputError, check_keys_fit, expand_inputs
from megatron_ext.data.outputs import prepare_output_dir
from megatron_ext.data.partitions import Outputs
from megatron_ext.data.readers import Chunk, chunk_texts, read_chunks
from megatron_ext.data.sentences import SentenceSplitter
from megatron_ext.data.shard_meta import TOOL
from megatron_ext.tokenizer import TokenizerOptions, build_tokenizer, fingerprint

SKIP_HINT = "; fix it, or pass --skip-invalid to skip and count such records"
# With --skip-invalid, the first few skipped records are named, so a systematic problem
# (a wrong --json-keys) is visible before the summary.
SHOWN_SKIPS = 10


class WorkerError(RuntimeError):
    """A tokenizing worker process was lost; the run stops with no output written."""


@dataclass
class Summary:
    read: int = 0  # records seen, valid or not
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    tokens: Dict[str, int] = field(default_factory=dict)  # per key, EODs included
    empty: Dict[str, int] = field(default_factory=dict)  # per key: no tokens before EOD
    ignored: str = ""  # the files in --input directories/globs not read (InputFiles)

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
                f"({self.rates()}){self.ignored_line()}")

    def ignored_line(self) -> str:
        return f"\n{self.ignored}" if self.ignored else ""


@dataclass
class _ChunkResult:
    read: int
    skipped: int
    nbytes: int
    error: Optional[str]
    arrays: List[tuple]  # per key: (tokens, sequence lengths, sequences per document or None)
    empty: List[int]  # per key
    skips: List[str] = field(default_factory=list)  # the first few skipped records


_STATE = {}


def _init_worker(tokenizer_args: tuple, keys: Sequence[str], append_eod: bool,
                 skip_invalid: bool, dtype, single_threaded: bool,
                 sentences: Optional[tuple] = None) -> None:
    if single_threaded:
        # Processes are the parallelism; HF `tokenizers` threads would only contend.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE.update(tokenizer=build_tokenizer(*tokenizer_args), keys=list(keys),
                  append_eod=append_eod, skip_invalid=skip_invalid, dtype=np.dtype(dtype),
                  splitter=SentenceSplitter(*sentences) if sentences else None)


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


def _tokenize_sentences(tokenizer, splitter, texts: List[str], bad: Dict[int, str]):
    """Per document: the token ids of its non-empty sentences (Megatron-LM drops sentences
    without tokens), at least one (maybe empty) so that a document keeps its place."""
    sentences, owner = [], []
    for i, text in enumerate(texts):
        pieces = splitter.split(text)
        sentences.extend(pieces)
        owner.extend([i] * len(pieces))
    sentence_bad: Dict[int, str] = {}
    ids = _tokenize(tokenizer, sentences, sentence_bad)
    for i, message in sentence_bad.items():
        bad.setdefault(owner[i], message)
    docs = [[] for _ in texts]
    for i, sentence in zip(owner, ids):
        if sentence:
            docs[i].append(sentence)
    return [doc or [[]] for doc in docs]


def _documents_to_arrays(docs, sentence_level: bool, eod: Optional[int], dtype, where: str):
    """(tokens, sequence lengths, sequences per document or None) of tokenized documents
    (lists of ids, or with sentences lists of lists of ids); `eod` ends each document."""
    if not sentence_level:
        docs = [[doc] for doc in docs]
    if eod is not None:
        for doc in docs:
            doc[-1].append(eod)
    sequences = [sentence for doc in docs for sentence in doc]
    lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
    flat = np.fromiter(chain.from_iterable(sequences), np.int64, int(lengths.sum()))
    per_document = np.fromiter(map(len, docs), np.int64, len(docs)) if sentence_level else None
    return as_token_array(flat, dtype, where), lengths, per_document


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
    tokenizer, splitter = _STATE["tokenizer"], _STATE["splitter"]
    if splitter is None:
        tokenized = [_tokenize(tokenizer, column, bad) for column in columns]
    else:
        tokenized = [_tokenize_sentences(tokenizer, splitter, column, bad) for column in columns]
    if bad and not skip:
        error = f"{wheres[min(bad)]}: {bad[min(bad)]}"
    if error:
        return _ChunkResult(read, skipped, chunk.nbytes, error, [], [])
    if bad:
        skipped += len(bad)
        skips.extend(f"{wheres[i]}: {bad[i]}" for i in sorted(bad))
        tokenized = [[d for i, d in enumerate(docs) if i not in bad] for docs in tokenized]

    eod = tokenizer.eod if _STATE["append_eod"] else None
    # An empty document: no tokens (a sentence-split one has only its placeholder sentence).
    empty = [sum(1 for doc in docs if not doc or not doc[0]) for docs in tokenized]
    arrays = [_documents_to_arrays(docs, splitter is not None, eod, _STATE["dtype"], chunk.path)
              for docs in tokenized]
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
    before = _children()
    pool = stack.enter_context(context.Pool(workers, init, init_args))
    pending, started = deque(), _children() - before
    for chunk in chunks:
        pending.append(pool.apply_async(encode, (chunk,)))
        if len(pending) >= 4 * workers:
            yield _result(pending.popleft(), started)
    while pending:
        yield _result(pending.popleft(), started)


def _children() -> set:
    return {process.pid for process in multiprocessing.active_children()}


def _result(pending, workers: set):
    """The chunk's result; a Pool replaces a worker that was killed (out of memory, a signal)
    and would wait forever for the chunk that worker held, so a lost worker stops the run."""
    while True:
        try:
            return pending.get(timeout=1.0)
        except multiprocessing.TimeoutError:
            if not workers <= _children():
                raise WorkerError("a --workers process died (killed by a signal or out of "
                                  "memory) while tokenizing; nothing was written; run again "
                                  "(with fewer --workers if memory ran out)") from None


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


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool = False) -> str:
    """Megatron-LM's names: PREFIX_{key}_document, or PREFIX_{key}_sentence when split."""
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def made_with(tokenizer, tokenizer_type: str, tokenizer_model: Optional[str],
              eod_appended: bool) -> dict:
    """The ShardMeta fields on how a token shard was made."""
    return dict(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                vocab_size=tokenizer.vocab_size, eod=tokenizer.eod, eod_appended=eod_appended,
                tokenizer_fingerprint=fingerprint(tokenizer), tool=TOOL)


def check_not_empty(inputs: Sequence[str], tokens: int, counts: str) -> None:
    """No shard without tokens: megatron-core's IndexedDataset memory-maps the `.bin` with
    numpy, which cannot map an empty file, and a shard without documents has no sample to give,
    so writing one would only move the failure to training. Called inside the writers' `with`,
    so nothing is written."""
    if not tokens:
        raise InputError(f"--input {' '.join(inputs)}: nothing to write ({counts}); a shard "
                         "without tokens cannot be read by megatron-core, so none is written")


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_type: str,
               tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None,
               json_keys: Sequence[str] = ("text",), append_eod: bool = False,
               workers: int = 1, log_interval: int = 10000, skip_invalid: bool = False,
               log=sys.stderr, tokenizer_options: Optional[TokenizerOptions] = None,
               partitions: int = 1, keep_sequential_samples: bool = False,
               split_sentences: bool = False, keep_newlines: bool = False,
               lang: str = "english") -> Summary:
    """Tokenize `inputs` into `{output_prefix}_{key}_document.bin/.idx` per key
    (`_sentence` with `split_sentences`: one sequence per sentence, Megatron-LM's punkt split).

    `partitions` and `keep_sequential_samples` are Megatron-LM's `--partitions` and
    `--keep-sequential-samples`: they fix the order of documents in the output (see `Outputs`;
    sequential partitions keep the input order), never the parallelism, which is `workers`.

    Raises ValueError (InputError for bad data) before creating any file when the
    tokenizer or the inputs are wrong; on a failure half-way no output file is left.
    """
    start = time.perf_counter()
    tokenizer_args = (tokenizer_type, tokenizer_model, vocab_size, tokenizer_options)
    tokenizer = build_tokenizer(*tokenizer_args)
    sentences = (lang, keep_newlines) if split_sentences else None
    if sentences:
        SentenceSplitter(*sentences)  # a missing NLTK or punkt model fails here, once
    found = expand_inputs(inputs)
    files = found.files
    check_keys_fit(files, json_keys)
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    if partitions < 1:
        raise ValueError("--partitions must be at least 1")
    dtype = best_dtype(tokenizer.vocab_size)
    prepare_output_dir(output_prefix)

    summary = Summary(tokens={k: 0 for k in json_keys}, empty={k: 0 for k in json_keys},
                      ignored=found.ignored_report())
    init_args = (tokenizer_args, json_keys, append_eod, skip_invalid, dtype, workers > 1,
                 sentences)
    prefixes = [output_prefix_for(output_prefix, k, split_sentences) for k in json_keys]
    with ExitStack() as stack:
        outputs = Outputs(stack, prefixes, dtype, 1 if keep_sequential_samples else partitions,
                           log)
        chunks = (chunk for path in files for chunk in read_chunks(path, json_keys))
        results = _encoded(chunks, workers, init_args, stack)
        for result in checked(results, summary, start, log, log_interval):
            for index, (key, arrays, empty) in enumerate(zip(json_keys, result.arrays,
                                                             result.empty)):
                outputs.add(index, arrays)
                summary.tokens[key] += arrays[0].size
                summary.empty[key] += empty
        for key in json_keys:
            empty = (f", all {'--json-keys ' + key + ' ' if len(json_keys) > 1 else ''}empty "
                     "(--append-eod would give each its EOD)" if summary.written else "")
            check_not_empty(inputs, summary.tokens[key],
                            f"{summary.read} documents read, {summary.skipped} skipped, "
                            f"{summary.written} written{empty}")
        outputs.finish()
    fields = made_with(tokenizer, tokenizer_type, tokenizer_model, append_eod)
    for writer in outputs.final:  # finalized: the with block is done
        writer.write_meta(**fields)
    summary.seconds = time.perf_counter() - start
    return summary
