"""Concatenate indexed datasets into one, like Megatron's `tools/merge_datasets.py`.

    python -m megatron_ext.data.merge --input-prefixes A B DIR --output-prefix OUT

Documents keep their order: all of A, then all of B, then every pair in DIR (sorted).
"""

import argparse
import os
import sys
from typing import List, Sequence

from megatron_ext.data.indexed import IndexedDatasetReader, IndexedDatasetWriter


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
    del readers  # the writer reopens each one; no maps should stay open meanwhile
    if os.path.dirname(output_prefix):
        os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
    with IndexedDatasetWriter(output_prefix, dtypes.pop()) as writer:
        for prefix in prefixes:
            writer.append_dataset(prefix)
    merged = IndexedDatasetReader(output_prefix)
    if log is not None:
        print(f"merged {len(prefixes)} datasets into {output_prefix}.bin/.idx: "
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
