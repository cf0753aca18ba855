"""A corpus and a SentencePiece tokenizer built from text every Python install has.

Examples, tests and benches need real-looking text and a real tokenizer without a download:
the standard library's own sources are a few MB of English docstrings and code on every
machine. The corpus is deterministic for a given Python version (files in sorted order).

    python -m megatron_ext.data.default_corpus --output-dir DIR [--vocab-size 8000]
"""

import argparse
import json
import os
import sys
import sysconfig

DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_VOCAB_SIZE = 8000
# Test suites and the IDE are large and repetitive; they would dominate a few-MB corpus.
_SKIPPED_TOP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
# Documents are groups of top-level blocks up to this size, so that sizes vary like real
# documents instead of one huge document per module.
_DOC_TARGET_BYTES = 4096


def _stdlib_sources():
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        top = rel.split(os.sep)[0]
        if top in _SKIPPED_TOP_DIRS:
            dirnames[:] = []
            continue
        dirnames.sort()  # os.walk order is filesystem order; sorting makes the corpus stable
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _documents(source: str):
    """Split a module at unindented lines that follow a blank line, then regroup pieces."""
    blocks, current = [], []
    previous_blank = False
    for line in source.splitlines():
        if previous_blank and line[:1] not in ("", " ", "\t") and current:
            blocks.append("\n".join(current).strip("\n"))
            current = []
        current.append(line)
        previous_blank = not line.strip()
    if current:
        blocks.append("\n".join(current).strip("\n"))

    doc = ""
    for block in blocks:
        if doc and len(doc) + len(block) > _DOC_TARGET_BYTES:
            yield doc
            doc = ""
        doc = f"{doc}\n\n{block}" if doc else block
    if doc:
        yield doc


def iter_documents():
    """Yield the corpus's documents (str) in a fixed order."""
    for path in _stdlib_sources():
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        yield from _documents(source)


def build_corpus(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Write `{"text": ...}` JSON lines to `path` until about `max_bytes`; repeats the
    standard library when it is smaller than asked. Returns the number of documents."""
    written = count = 0
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            while written < max_bytes:
                before = count
                for doc in iter_documents():
                    line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                    out.write(line)
                    written += len(line.encode("utf-8"))
                    count += 1
                    if written >= max_bytes:
                        break
                if count == before:
                    raise RuntimeError("no standard-library sources found to build a corpus from")
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: a partial corpus must not stay behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


def train_tokenizer(corpus: str, model_prefix: str, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    model_type: str = "bpe", max_sentences: int = 200_000) -> str:
    """Train a SentencePiece model on the `text` of a JSONL corpus; returns the .model path.

    Settings suit code and prose alike: no whitespace folding (indentation survives a round
    trip), byte fallback (any text encodes), and `eos_id` set, so GPTSentencePieceTokenizer
    and Llama2Tokenizer have an EOD. One thread and a fixed seed make it repeatable.
    """
    import sentencepiece as spm

    def sentences():
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                for sentence in json.loads(line)["text"].split("\n"):
                    if sentence.strip():
                        yield sentence

    spm.set_random_generator_seed(1234)
    with open(os.devnull, "w") as devnull:
        # SentencePiece logs every step to stderr from C++; silence it unless it fails.
        saved = os.dup(2)
        os.dup2(devnull.fileno(), 2)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_prefix=model_prefix,
                vocab_size=vocab_size, model_type=model_type,
                input_sentence_size=max_sentences, shuffle_input_sentence=True,
                num_threads=1, character_coverage=1.0, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                split_digits=True, allow_whitespace_only_pieces=True,
                user_defined_symbols=["\n", "\t"], max_sentence_length=1 << 14,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return f"{model_prefix}.model"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="approximate corpus size in bytes (default %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    args = parser.parse_args(argv)

    os.makedirs(args.output_dir, exist_ok=True)
    corpus = os.path.join(args.output_dir, "corpus.jsonl")
    model_prefix = os.path.join(args.output_dir, "tokenizer")
    if os.path.exists(corpus):
        print(f"exists: {corpus}", file=sys.stderr)
    else:
        count = build_corpus(corpus, args.max_bytes)
        print(f"wrote {corpus} ({count} documents)", file=sys.stderr)
    if os.path.exists(model_prefix + ".model"):
        print(f"exists: {model_prefix}.model", file=sys.stderr)
    else:
        train_tokenizer(corpus, model_prefix, args.vocab_size, args.model_type)
        print(f"wrote {model_prefix}.model (vocab {args.vocab_size})", file=sys.stderr)


if __name__ == "__main__":
    main()
