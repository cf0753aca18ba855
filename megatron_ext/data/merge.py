"""Concatenate indexed datasets into one, like Megatron's `tools/merge_datasets.py`.

    python -m megatron_ext.data.merge --input-prefixes A B DIR --output-prefix OUT

Documents keep their order: all of A, then all of B, then every pair in DIR (sorted).
``OUT.meta.json`` counts what was written; it keeps the tokenizer the inputs' metadata files
agree on, and says nothing of the tokenizer (None) when one input has none or they differ.
"""

import argparse
import os
import sys
from typing import List, Sequence

from megatron_ext.data.indexed import (IndexedDatasetReader, IndexedDatasetWriter, bin_path,
                                       idx_path)
from megatron_ext.data.outputs import prepare_output_dir
from megatron_ext.data.shard_meta import TOOL, meta_path, read_meta

_TOKENIZER_FIELDS = ("tokenizer_type", "tokenizer_model", "vocab_size", "eod",
                     "tokenizer_fingerprint")


def expand_prefixes(prefixes: Sequence[str]) -> List[str]:
    """A directory stands for every `NAME.idx` in it that has its `NAME.bin`, sorted."""
    expanded = []
    for prefix in prefixes:
        if os.path.isdir(prefix):
            names = sorted(n[:-4] for n in os.listdir(prefix) if n.endswith(".idx"))
            found = [os.path.join(prefix, n) for n in names
                     if os.path.isfile(os.path.join(prefix, n + ".bin"))]
            if not found:
                raise ValueError(f"--input-prefixes {prefix}: no .idx/.bin pairs in directory")
            expanded.extend(found)
        else:
            expanded.append(prefix)
    return expanded


def _made_with(prefixes: Sequence[str], log) -> dict:
    """The ShardMeta fields on how the inputs were made that hold for the merged dataset."""
    def note(text):
        if log is not None:
            print(f"note: {text}", file=log)

    metas = []
    for prefix in prefixes:
        meta = read_meta(prefix)
        if meta is not None and (meta.bin_bytes, meta.idx_bytes) != (
                os.path.getsize(bin_path(prefix)), os.path.getsize(idx_path(prefix))):
            note(f"{meta_path(prefix)} describes another pair (its sizes differ): not used")
            meta = None
        metas.append(meta)
    fields = {"tool": f"{TOOL} --merge"}
    lacking = [p for p, m in zip(prefixes, metas) if m is None]
    if lacking:
        note(f"{', '.join(lacking)}: no metadata, so the merged one names no tokenizer")
        return fields
    eod_appended = {m.eod_appended for m in metas}
    fields["eod_appended"] = eod_appended.pop() if len(eod_appended) == 1 else None
    made = {name: {getattr(m, name) for m in metas} for name in _TOKENIZER_FIELDS}
    differ = [name for name, values in made.items() if len(values) > 1]
    if differ:
        note(f"the inputs differ in {', '.join(differ)}, so the merged metadata names no "
             "tokenizer")
        return fields
    return {**fields, **{name: values.pop() for name, values in made.items()}}


def merge_datasets(prefixes: Sequence[str], output_prefix: str, log=None) -> IndexedDatasetReader:
    """Write `output_prefix.bin/.idx` = the datasets concatenated; returns a reader of it.

    Every input is opened and checked (both files present, sizes consistent, one dtype)
    before the output is started.
    """
    prefixes = expand_prefixes(prefixes)
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise ValueError(f"--output-prefix {output_prefix} is also an input")
    readers = [IndexedDatasetReader(p) for p in prefixes]
    dtypes = {r.dtype for r in readers}
    if len(dtypes) > 1:
        listing = ", ".join(f"{r.path_prefix} ({r.dtype})" for r in readers)
        raise ValueError(f"cannot merge datasets of different dtypes: {listing}; they were "
                         "made with tokenizers of different vocabulary sizes")
    if not sum(r.num_tokens for r in readers):
        # As preprocess_data.py: megatron-core cannot memory-map an empty .bin.
        raise ValueError(f"--input-prefixes {' '.join(prefixes)}: the datasets hold no tokens; "
                         "a shard without tokens cannot be read by megatron-core, so none is "
                         "written")
    del readers  # the writer reopens each one; no maps should stay open meanwhile
    made_with = _made_with(prefixes, log)
    prepare_output_dir(output_prefix)
    with IndexedDatasetWriter(output_prefix, dtypes.pop(), log) as writer:
        for prefix in prefixes:
            writer.append_dataset(prefix)
    writer.write_meta(**made_with)
    merged = IndexedDatasetReader(output_prefix)
    if log is not None:
        print(f"merged {len(prefixes)} datasets into {output_prefix}.bin/.idx/.meta.json: "
              f"{merged.num_documents} documents, {merged.num_tokens} tokens", file=log)
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-prefixes", nargs="+", required=True, metavar="PREFIX")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        merge_datasets(args.input_prefixes, args.output_prefix, log=sys.stderr)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
