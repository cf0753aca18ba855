"""Show what an indexed dataset holds, without torch.

    python -m megatron_ext.data.inspect PREFIX [--doc N] \\
        [--tokenizer-type TYPE --tokenizer-model PATH | --vocab-size V]

Prints counts, dtype and length statistics, then document N's tokens, and its decoded text
when a tokenizer is given (the EOD shows as the tokenizer decodes it, or as its id).
"""

import argparse
import sys

import numpy as np

from megatron_ext.data.indexed import IndexedDatasetReader
from megatron_ext.tokenizer import add_tokenizer_flags, build_tokenizer, options_from_args


def describe(dataset: IndexedDatasetReader) -> str:
    doc_ends = np.asarray(dataset.document_indices)
    sequence_ends = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    doc_lengths = sequence_ends[doc_ends[1:]] - sequence_ends[doc_ends[:-1]]
    lines = [f"{dataset.path_prefix}: {dataset.num_documents} documents, {len(dataset)} "
             f"sequences, {dataset.num_tokens} tokens, dtype {dataset.dtype}"]
    if doc_lengths.size:
        lines.append(f"document length: min {doc_lengths.min()}, mean {doc_lengths.mean():.1f}, "
                     f"max {doc_lengths.max()}, empty {int(np.count_nonzero(doc_lengths == 0))}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="dataset path without .bin/.idx")
    parser.add_argument("--doc", type=int, default=0, help="document to show (default 0)")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="show at most this many tokens of it (0: all)")
    add_tokenizer_flags(parser.add_argument_group("tokenizer (to show the text)"))
    args = parser.parse_args(argv)
    try:
        tokenizer = (build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size,
                                     options_from_args(args))
                     if args.tokenizer_type else None)
        dataset = IndexedDatasetReader(args.prefix)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(describe(dataset))
    if not dataset.num_documents:
        return
    if not -dataset.num_documents <= args.doc < dataset.num_documents:
        sys.exit(f"error: --doc {args.doc} is out of range: {dataset.num_documents} documents")
    index = args.doc % dataset.num_documents
    tokens = dataset.document(index)
    shown = tokens if args.max_tokens <= 0 else tokens[:args.max_tokens]
    more = f" (first {shown.size} shown)" if shown.size < tokens.size else ""
    print(f"document {index}: {tokens.size} tokens{more}")
    print("tokens:", " ".join(map(str, shown.tolist())))
    if tokenizer is not None:
        print("text:", tokenizer.detokenize(shown.tolist()))


if __name__ == "__main__":
    main()
