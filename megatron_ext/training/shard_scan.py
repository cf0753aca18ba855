"""What a shard without ``PREFIX.meta.json`` (one of Megatron-LM's tool) holds, for
``shard_checks``: its largest id and EOD counts from one chunked pass over its tokens, cached as
JSON under ``--data-cache-path`` keyed by the file's path, size and mtime (``shard_key``, which
also keys the dataset index caches: ``index_cache_path``).
"""

import hashlib
import json
import logging
import os
import time
from typing import Dict, Optional

import numpy as np
import torch

from megatron_ext.data.indexed import bin_path, idx_path
from megatron_ext.data.shard_meta import META_SUFFIX, write_json_atomically

logger = logging.getLogger("megatron_ext")

SCAN_CHUNK_BYTES = 64 << 20  # bounded memory for the comparison with EOD, large enough for speed
SCAN_VERSION = 2  # of the cached scan's content


def shard_key(prefix: str) -> Dict[str, object]:
    """The shard's identity: path, and size and mtime of its .bin and .idx (a rewrite changes
    them)."""
    key = {"version": SCAN_VERSION, "path": os.path.abspath(bin_path(prefix))}
    for name, path in (("bin", bin_path(prefix)), ("idx", idx_path(prefix))):
        stat = os.stat(path)
        key[f"{name}_bytes"], key[f"{name}_mtime_ns"] = stat.st_size, stat.st_mtime_ns
    return key


def index_cache_path(base: str, prefixes) -> str:
    """The directory under ``base`` for the index caches of the shards of these ``prefixes``
    (a text dataset's, or each file of an instruction dataset). megatron-core names its cached
    indices by the dataset's description (shard path, split, seed, sequence length, tokenizer),
    not by what the shard holds: a shard rewritten in place (a resume after the data was
    regenerated, say) would reuse indices of the old one, an IndexError mid-training or other
    samples silently. Keyed by every shard's size and mtime, it is rebuilt instead. Collective
    when torch.distributed is initialised: every rank takes rank 0's, which writes the indices,
    so a node with its own copy of the shards (other mtimes) reads them there too."""
    keys = [shard_key(prefix) for prefix in prefixes]
    digest = hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:20]
    path = [os.path.join(base, f"indices-{digest}")]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(path, src=0)
    return path[0]


def _cache_file(cache_dir: str, key: Dict[str, object]) -> str:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, "shard_scans", f"{digest}.json")


def scan_tokens(shard, eod: int) -> Dict[str, object]:
    """Of a ``shard_checks.Shard``: largest id, occurrences of ``eod`` and documents ending with
    it (one chunked pass over the memory-mapped .bin), and the most frequent last tokens of the documents (a shard written
    with --append-eod ends every document with its own EOD)."""
    size = os.path.getsize(bin_path(shard.prefix))
    dtype = shard.reader.dtype
    tokens = np.memmap(bin_path(shard.prefix), dtype, "r") if size else np.zeros(0, dtype)
    chunk = max(1, SCAN_CHUNK_BYTES // dtype.itemsize)
    max_id, eod_count = -1, 0
    for start in range(0, tokens.size, chunk):
        part = tokens[start:start + chunk]
        max_id = max(max_id, int(part.max()))
        eod_count += int(np.count_nonzero(part == eod))
    last = np.asarray(tokens[np.cumsum(shard.document_tokens)[shard.document_tokens > 0] - 1])
    values, counts = np.unique(last, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:3]
    return {"max_id": max_id,
            "eod_counts": {str(eod): [eod_count, int(np.count_nonzero(last == eod))]},
            "last_tokens": [[int(values[i]), int(counts[i])] for i in order]}


def scanned_facts(shard, eod: int, cache_dir: Optional[str]) -> Dict[str, object]:
    """``scan_tokens``' result, from the cache when this file (path, size, mtime) was scanned
    before for the same EOD id; a new scan is written atomically (ranks may race: same bytes)."""
    key = shard_key(shard.prefix)
    path = _cache_file(cache_dir, key) if cache_dir else None
    cached = None
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = None  # a damaged cache entry is scanned again and rewritten
    if cached and cached.get("key") == key and str(eod) in cached.get("eod_counts", {}):
        logger.info(f"{shard.prefix}: no {META_SUFFIX}; using its "
                    f"scan cached in {path}")
        return cached
    started = time.perf_counter()
    facts = scan_tokens(shard, eod)
    seconds = time.perf_counter() - started
    if cached and cached.get("key") == key:  # same file, another EOD: keep what is known
        facts["eod_counts"] = {**cached.get("eod_counts", {}), **facts["eod_counts"]}
    gigabytes = key["bin_bytes"] / 1e9
    where = f"cached in {path}" if path else "not cached (no --data-cache-path)"
    logger.info(f"{shard.prefix}: no {META_SUFFIX} (a shard of "
                f"Megatron-LM's tool?): scanned {gigabytes:.2f} GB in {seconds:.2f} s, {where}")
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomically(path, {"key": key, **facts, "seconds": round(seconds, 3)})
    return facts
