"""The ``--data-path`` shards checked against the run before any process group exists.

megatron-core trusts its shards: a ``.bin`` shorter than its ``.idx`` says trains until the
missing sample is drawn, an id beyond the vocabulary is zeroed by the vocab-parallel embedding
(TP >= 2), a shard whose EOD is not the run's trains with no document boundaries, and a
``--split`` that leaves a split without tokens loops forever in ``GPTDataset._get_num_epochs``.
``check_data`` turns each into an error naming the file, the numbers and the flag, raised on
every rank alike (all ranks read the same files) before a rank could wait for a peer.

What a shard holds comes from its ``PREFIX.meta.json`` (written by preprocess_data.py) or, for
a shard without one (Megatron-LM's tool), from one scan of its tokens, cached as JSON under
``--data-cache-path`` keyed by the file's path, size and mtime (``shard_scan.py``). The ``.idx``
is read with numpy alone, as the format is documented in ``megatron_ext/data/indexed.py``.
"""

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix, parse_and_normalize_split)

from megatron_ext.config import Config, ConfigError
from megatron_ext.data.indexed import IndexedDatasetReader, bin_path, idx_path
from megatron_ext.data.instruct.pipeline import output_prefixes
from megatron_ext.data.instruct.tasks import task_ids_prefix, tasks_path
from megatron_ext.data.shard_meta import (META_SUFFIX, ShardMeta, ShardMetaError, meta_path,
                                           read_meta)
from megatron_ext.tokenizer import fingerprint
from megatron_ext.config.blend import SPLITS, check_prefixes, naming, resolve
from megatron_ext.training.sft_dataset import check_prefix
from megatron_ext.training.logs import log_once
from megatron_ext.training.shard_scan import scanned_facts

logger = logging.getLogger("megatron_ext")

IDX_HEADER_BYTES = 34  # magic 9, version 8, dtype code 1, sequence and document counts 8 + 8


def _warn(message: str) -> None:
    log_once(logger, logging.WARNING, message)  # every rank reads the same files


class ShardError(ConfigError):
    """A shard that cannot train this run; the message names the file and what to do."""


@dataclass
class Shard:
    """One ``.bin/.idx`` pair, its structure checked."""

    prefix: str
    reader: IndexedDatasetReader
    document_tokens: np.ndarray  # int64 tokens per document
    where: str  # how messages name it: "--data-path PREFIX" (config.blend.naming)

    @property
    def num_documents(self) -> int:
        return self.document_tokens.size


def open_shard(prefix: str, flag: str = "--data-path") -> Shard:
    """The pair, or a ShardError naming the file (and ``flag``) when its structure is damaged."""
    where = naming(prefix, flag)
    try:
        reader = IndexedDatasetReader(prefix)
    except ValueError as error:  # bad magic, version, dtype code, truncated, .bin size
        raise ShardError(f"{where}: {error}; rewrite the shard with preprocess_data.py (or copy "
                         f"both files again)") from None
    path = idx_path(prefix)
    lengths = np.asarray(reader.sequence_lengths, np.int64)
    pointers = np.asarray(reader.sequence_pointers, np.int64)
    docs = np.asarray(reader.document_indices, np.int64)
    expected = IDX_HEADER_BYTES + lengths.size * 12 + docs.size * 8
    if os.path.getsize(path) != expected:
        raise ShardError(f"{where}: {path} has {os.path.getsize(path)} bytes, its header "
                         f"describes {expected} ({lengths.size} sequences, {docs.size - 1} "
                         f"documents): not the index of this shard; rewrite the shard")
    itemsize = reader.dtype.itemsize
    # megatron-core reads sequence i at pointers[i]: they must be the running sum of lengths.
    starts = np.zeros_like(lengths)
    np.cumsum(lengths[:-1], out=starts[1:])
    bad = np.flatnonzero(pointers != starts * itemsize)
    if (lengths < 0).any() or bad.size:
        raise ShardError(f"{where}: {path} is damaged: sequence {int(bad[0]) if bad.size else '?'}"
                         f" does not start where the previous one ends; rewrite the shard")
    if docs.size == 0 or docs[0] != 0 or docs[-1] != lengths.size or (np.diff(docs) < 0).any():
        raise ShardError(f"{where}: {path} is damaged: its document index does not cover its "
                         f"{lengths.size} sequences in order; rewrite the shard")
    if docs.size == 1:
        raise ShardError(f"{where}: {prefix} holds no documents; remove it from the list or "
                         f"preprocess a non-empty corpus")
    ends = np.concatenate([[0], np.cumsum(lengths)])
    return Shard(prefix, reader, ends[docs[1:]] - ends[docs[:-1]], where)


def check_meta(shard: Shard, meta: ShardMeta) -> None:
    """The metadata file must describe this very pair (not one from another run)."""
    found = (shard.num_documents, shard.reader.num_tokens,
             os.path.getsize(bin_path(shard.prefix)), os.path.getsize(idx_path(shard.prefix)))
    described = (meta.num_documents, meta.num_tokens, meta.bin_bytes, meta.idx_bytes)
    if found != described:
        raise ShardError(
            f"{shard.where}: {meta_path(shard.prefix)} describes {described[0]} "
            f"documents, {described[1]} tokens, .bin {described[2]} and .idx {described[3]} "
            f"bytes, but the pair holds {found[0]} documents, {found[1]} tokens, .bin {found[2]} "
            f"and .idx {found[3]} bytes: the files come from different runs of "
            f"preprocess_data.py; rewrite the shard")


# -- the checks against the run -----------------------------------------------------------------
def tokenizer_flags(config: Config) -> str:
    d = config.data
    flags = f"--tokenizer-type {d.tokenizer_type}"
    if d.tokenizer_type == "GPT2BPETokenizer":  # the one that reads no --tokenizer-model
        flags += f" --vocab-file {d.vocab_file} --merge-file {d.merge_file}"
    elif d.tokenizer_model:
        flags += f" --tokenizer-model {d.tokenizer_model}"
    elif d.vocab_size is not None:
        flags += f" --vocab-size {d.vocab_size}"
    return flags


def _made_with(meta: Optional[ShardMeta]) -> str:
    if meta is None or not meta.tokenizer_type:
        return ""
    model = f" {meta.tokenizer_model}" if meta.tokenizer_model else ""
    return (f" (the shard was made with {meta.tokenizer_type}{model}: vocabulary "
            f"{meta.vocab_size}, EOD {meta.eod}, says its {META_SUFFIX})")


def _eod_flags(config: Config) -> str:
    d = config.data
    names = [flag for flag, on in (("--reset-position-ids", d.reset_position_ids),
                                   ("--reset-attention-mask", d.reset_attention_mask),
                                   ("--eod-mask-loss", d.eod_mask_loss)) if on]
    return "/".join(names)


def check_tokens(config: Config, shard: Shard, meta: Optional[ShardMeta], tokenizer,
                 check_eod: bool) -> None:
    """Largest id vs the vocabulary; with the EOD flags, the shard's EOD vs the run's."""
    vocab, eod = tokenizer.vocab_size, tokenizer.eod
    needs_scan = meta is None or (check_eod and meta.eod is None)
    facts = scanned_facts(shard, eod, config.data.data_cache_path) if needs_scan else {}
    max_id = meta.max_id if meta is not None else facts["max_id"]
    if max_id >= vocab:
        raise ShardError(
            f"{shard.where}: largest token id {max_id} does not fit the vocabulary "
            f"of {vocab} ids of {tokenizer_flags(config)}{_made_with(meta)}; train with the "
            f"tokenizer the shard was made with, or preprocess it again with this one")
    if meta is not None and meta.tokenizer_fingerprint is not None and (
            meta.tokenizer_fingerprint != fingerprint(tokenizer)):
        raise ShardError(
            f"{shard.where}: made with another tokenizer than this run's "
            f"{tokenizer_flags(config)}{_made_with(meta)}: the same text has other ids (its "
            f"tokenizer_fingerprint {meta.tokenizer_fingerprint}, this run's "
            f"{fingerprint(tokenizer)}); train with the tokenizer the shard was made with, or "
            f"preprocess it again with this one")
    if meta is not None and meta.vocab_size is not None and meta.vocab_size != vocab:
        _warn(f"{shard.prefix} was made with a vocabulary of {meta.vocab_size} ids, "
              f"this run's {tokenizer_flags(config)} has {vocab}")
    if not check_eod:
        return
    flags = _eod_flags(config)
    if meta is not None and meta.eod is not None:
        if meta.eod != eod:
            raise ShardError(
                f"{shard.where}: the shard's EOD is id {meta.eod} "
                f"({meta.tokenizer_type}), the run's is {eod} ({tokenizer_flags(config)}): "
                f"{flags} would find no document boundaries; train with the shard's tokenizer")
        if meta.eod_appended is False:
            raise _no_document_end(config, shard, f"its {META_SUFFIX} says it was written "
                                                  f"without --append-eod")
        return
    occurrences, ending = facts["eod_counts"][str(eod)]
    nonempty = int(np.count_nonzero(shard.document_tokens))
    common = ", ".join(f"{count} with id {value}" for value, count in facts["last_tokens"])
    found = (f"the run's EOD id {eod} ({tokenizer_flags(config)}) occurs {occurrences} times "
             f"and ends {ending} of its {nonempty} non-empty documents (most end: {common})")
    if ending == 0:  # where the id occurs, it is text of another tokenizer, not an EOD
        raise _no_document_end(config, shard, found)
    if 2 * ending < nonempty:
        _warn(f"{shard.prefix}: {found}; was it written with --append-eod and this "
              f"tokenizer?")


def _no_document_end(config: Config, shard: Shard, found: str) -> ShardError:
    """A shard without the run's EOD after its documents: the EOD flags would run it as one
    document (with or without a metadata file saying so, the same error)."""
    flags = _eod_flags(config)
    return ShardError(
        f"{shard.where}: {found}: {flags} would find no document's end (its documents would "
        f"attend to each other); write the shard again with preprocess_data.py --append-eod "
        f"and this run's tokenizer, or train without {flags}")


def split_documents(split: str, shards: List[Shard]) -> List[List[Optional[Tuple[int, int]]]]:
    """(documents, tokens) per shard and split as megatron-core cuts them (a contiguous range
    of documents per split, ``_build_megatron_dataset_splits``), None where the split is off."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    counts = []
    for shard in shards:
        n, row = shard.num_documents, []
        for bookends in matrix:
            if bookends is None:
                row.append(None)
                continue
            begin, end = int(round(bookends[0] * n)), int(round(bookends[1] * n))
            row.append((end - begin, int(shard.document_tokens[begin:end].sum())))
        counts.append(row)
    return counts


def plan_splits(config: Config, shards: List[Shard],
                per_split: Optional[List[List[Shard]]] = None) -> List[Optional[Tuple[float, float]]]:
    """megatron-core's split matrix, less the splits this run does not read. A split without
    tokens that is read is an error (megatron-core would loop forever building it); an empty
    test split is not evaluated (as Megatron-LM, which evaluates a test split that exists).
    With datasets per split (``per_split``: the shards of each split, None where it has none)
    each dataset is a split whole: ``(0, 1)`` where it is given and read, else None."""
    d, evaluating = config.data, config.logging.eval_iters > 0
    if per_split is not None:
        return _plan_per_split(config, per_split)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(d.split))
    counts = split_documents(d.split, shards)
    if evaluating and matrix[1] is None:  # Megatron-LM then skips validation without a word
        _warn(f"--split {d.split} has no validation part: --eval-interval "
              f"{config.logging.eval_interval} evaluates nothing; give the second "
              f"number a share (e.g. 98,2,0), or pass --eval-iters 0")
    wanted = [True, evaluating, evaluating]
    least = _least_tokens(config, resolve(d).blend)
    for i, name in enumerate(SPLITS):
        if matrix[i] is None:
            continue
        empty = [(shard.prefix, row[i]) for shard, row in zip(shards, counts)
                 if row[i][1] < least]
        if not wanted[i] or (empty and name == "test"):
            if empty and wanted[i]:
                _warn(f"--split {d.split} leaves the test split of {empty[0][0]} "
                      f"without documents: the test split is not evaluated")
            matrix[i] = None
            continue
        if empty:
            prefix, (docs, tokens) = empty[0]
            table = "; ".join(f"{shard.prefix}: " + ", ".join(
                f"{split} {row[j][0]}" for j, split in enumerate(SPLITS) if row[j] is not None)
                + " documents" for shard, row in zip(shards, counts))
            hint = " (or --eval-iters 0)" if name == "valid" else ""
            raise ShardError(
                f"--split {d.split} leaves the {name} split of {prefix} with {docs} documents "
                f"and {tokens or 'no'} tokens{_why(least)} ({table}); give the {name} split a "
                f"larger part{hint}")
        _warn_short(config, [(f"--split {d.split}: the {name} split of {shard.prefix}", row[i])
                             for shard, row in zip(shards, counts)], "give the split a larger part")
    return matrix


def _warn_short(config: Config, counts, remedy: str) -> None:
    """megatron-core fills a sample of a dataset shorter than one by repeating its documents
    (more epochs): say so, the loss of such a split is over the same text again and again.
    ``counts``: (how the message names the dataset's split, (documents, tokens))."""
    sample = config.model.seq_length + 1
    short = next(((label, c) for label, c in counts if c[1] < sample), None)
    if short is not None and not config.data.is_instruction_dataset:
        label, (docs, tokens) = short
        _warn(f"{label} holds {tokens} tokens ({docs} documents), less than one sample of "
              f"--seq-length {config.model.seq_length} + 1: each sample repeats them; {remedy}")


def _least_tokens(config: Config, blend) -> int:
    """Tokens a dataset of ``blend`` needs in a split that is read: one; for an unweighted
    blend of several, one sample's (megatron-core builds one epoch of each, weighs it by its
    sample count and asserts every weight > 0)."""
    unweighted = blend is not None and blend[1] is None and len(blend[0]) > 1
    if unweighted and not config.data.is_instruction_dataset:
        return config.model.seq_length + 1  # a GPTDataset sample: --seq-length + 1 tokens
    return 1


def _why(least: int) -> str:
    return (f", less than one sample ({least} tokens) for the unweighted blend (or give weights)"
            if least > 1 else "")


def _plan_per_split(config: Config, per_split) -> List[Optional[Tuple[float, float]]]:
    evaluating = config.logging.eval_iters > 0
    if evaluating and per_split[1] is None:
        _warn(f"no validation datasets (--valid-data-path): --eval-interval "
              f"{config.logging.eval_interval} evaluates nothing; give them, or pass "
              f"--eval-iters 0")
    matrix = []
    for i, shards in enumerate(per_split):
        if shards is None or not (i == 0 or evaluating):
            matrix.append(None)
            continue
        least = _least_tokens(config, resolve(config.data).per_split[i])
        empty = next((shard for shard in shards if shard.document_tokens.sum() < least), None)
        if empty is not None:  # megatron-core would loop forever building its samples
            raise ShardError(f"{empty.where}: its {empty.num_documents} documents hold "
                             f"{int(empty.document_tokens.sum()) or 'no'} tokens{_why(least)}; "
                             f"remove it from the {SPLITS[i]} datasets")
        _warn_short(config, [(shard.where, (shard.num_documents, int(shard.document_tokens.sum())))
                             for shard in shards], f"give the {SPLITS[i]} datasets more text")
        matrix.append((0.0, 1.0))
    return matrix


def data_prefixes(config: Config) -> List[Tuple[str, bool, str]]:
    """(shard prefix, holds token ids, flag that names it) for every pair the run reads."""
    prefixes = resolve(config.data).prefixes()
    if not config.data.is_instruction_dataset:
        check_prefixes(prefixes)
        return [(prefix, True, flag) for prefix, flag in prefixes]
    pairs = []
    for prefix, flag in prefixes:
        check_prefix(prefix)
        ids, mask = output_prefixes(prefix)
        pairs += [(ids, True, flag), (mask, False, flag)]
        if os.path.exists(tasks_path(prefix)):  # multi-task data (check_prefix: it exists)
            pairs.append((task_ids_prefix(prefix), False, flag))
    return pairs


def check_data(config: Config, tokenizer) -> Optional[List[Optional[Tuple[float, float]]]]:
    """Every check above for every dataset (of ``--data-path`` or of each split); returns the
    split matrix to build (None with ``--mock-data``)."""
    d = config.data
    if d.mock_data:
        return None
    check_eod = not d.is_instruction_dataset and (
        d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss)
    token_shards = {}
    for prefix, holds_ids, flag in data_prefixes(config):
        shard = open_shard(prefix, flag)
        try:
            meta = read_meta(prefix)
        except ShardMetaError as error:
            raise ShardError(f"{shard.where}: {error}") from None
        if meta is not None:
            check_meta(shard, meta)
        if holds_ids:
            check_tokens(config, shard, meta, tokenizer, check_eod)
            token_shards[prefix] = shard
    per_split = resolve(d).per_split
    if per_split is not None:
        per_split = [None if b is None else [token_shards[p] for p in b[0]] for b in per_split]
    return plan_splits(config, list(token_shards.values()), per_split)
