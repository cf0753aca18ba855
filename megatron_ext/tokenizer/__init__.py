"""Tokenizers by Megatron-LM's `--tokenizer-type` names, without torch or megatron.

One module per backend: `base` (the interface, NullTokenizer, ByteTokenizer), `sentencepiece`,
`huggingface` (HuggingFaceTokenizer, GPT2BPETokenizer), `tiktoken_bpe` (TikTokenizer).

Preprocessing runs in many processes and must start fast, so this module imports only the
tokenizer backend it needs, when it needs it (`transformers` alone costs ~3 s and torch).

EOD, the id appended after each document with `--append-eod`, per type:
- NullTokenizer: the text is whitespace-separated integer ids in [0, V); EOD = V and
  vocab_size = V + 1 (as Megatron).
- ByteTokenizer: ids are the UTF-8 bytes 0..255; EOD = 256, vocab_size = 257.
- SentencePieceTokenizer: Megatron's ids. The model's `<CLS>`, `<SEP>`, `<EOD>`, `<MASK>` and
  its pad/BOS/EOS pieces are used when present; each missing one gets the next id after the
  model's vocabulary, in that order, so EOD is the model's `<EOD>` piece or a new id (usually
  model size + 2). Unlike Megatron, literal special-token text inside a document is encoded as
  plain text instead of being mapped to the special id.
- GPTSentencePieceTokenizer: EOD = the model's EOS id; no BOS/EOS is added to documents. A
  model trained with `eos_id=-1` is refused.
- Llama2Tokenizer: the same, but every document starts with the model's BOS, as Megatron's
  `tokenize(text)` (bos=True) writes it; a model trained with `bos_id=-1` is refused too.
- HuggingFaceTokenizer (alias PretrainedFromHF): EOD = eos_token_id. Documents are encoded
  with the tokenizer's post-processor, as `tokenizer(text).input_ids` does in Megatron (so a
  Llama-3 tokenizer adds its BOS to every document). `--vocab-size` is ignored, as in
  Megatron-LM: the vocabulary is the tokenizer's (`vocab_size_note` says so once).
- GPT2BPETokenizer (`--vocab-file vocab.json --merge-file merges.txt`): EOD = `<|endoftext|>`,
  vocab_size = the entries of vocab.json; nothing added to documents.
- TikTokenizer (`--tokenizer-model` a rank file, `--tiktoken-pattern v1|v2`): EOD = `</s>`, the
  third of Megatron-LM's special tokens, which take ids 0..N-1 (`tiktoken_bpe`); vocab_size =
  `--vocab-size` (default 131072).

`eos`, the id chat templates place for `{eos}`, is EOD except for SentencePieceTokenizer, whose
EOD is an added `<EOD>` the model never saw: there it is the model's EOS piece (or the `<EOS>`
id Megatron adds when the model has none, as Megatron's `eos`).
`tokenize_without_special_tokens` encodes text alone, without the BOS that Llama2Tokenizer or an
HF post-processor adds: chat templates place BOS/EOS themselves.

`fingerprint` names what a tokenizer does, wherever its files lie: shards record it, and
training refuses a shard made by another tokenizer of the same vocabulary size.
"""

import hashlib
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_ext.tokenizer.base import ByteTokenizer, NullTokenizer, Tokenizer
from megatron_ext.tokenizer.huggingface import GPT2BPETokenizer, HuggingFaceTokenizer
from megatron_ext.tokenizer.sentencepiece import (GPTSentencePieceTokenizer, Llama2Tokenizer,
                                                  SentencePieceTokenizer)
from megatron_ext.tokenizer.tiktoken_bpe import TikTokenizer

TOKENIZER_TYPES = {
    "NullTokenizer": NullTokenizer,
    "ByteTokenizer": ByteTokenizer,
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
    "Llama2Tokenizer": Llama2Tokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "PretrainedFromHF": HuggingFaceTokenizer,
    "GPT2BPETokenizer": GPT2BPETokenizer,
    "TikTokenizer": TikTokenizer,
}


@dataclass(frozen=True)
class TokenizerOptions:
    """The flags only some tokenizer types read (Megatron-LM's names and defaults)."""

    vocab_file: Optional[str] = None  # --vocab-file (GPT2BPETokenizer)
    merge_file: Optional[str] = None  # --merge-file (GPT2BPETokenizer)
    tiktoken_pattern: Optional[str] = None  # --tiktoken-pattern v1|v2 (default v2)
    tiktoken_num_special_tokens: int = 1000  # --tiktoken-num-special-tokens
    special_tokens: Optional[Tuple[str, ...]] = None  # --tokenizer-special-tokens


def add_tokenizer_flags(group) -> None:
    """The tokenizer flags of the offline tools (preprocess_data.py, the dataset inspector),
    with Megatron-LM's names and defaults."""
    group.add_argument("--tokenizer-type", choices=list(TOKENIZER_TYPES))
    group.add_argument("--tokenizer-model", "--tokenizer-name-or-path", dest="tokenizer_model",
                       help="SentencePiece .model, tokenizer.json, a saved HF directory, or a "
                            "TikTokenizer rank file")
    group.add_argument("--vocab-size", type=int,
                       help="NullTokenizer: ids are in [0, V); TikTokenizer: the whole "
                            "vocabulary (default 131072); ignored by the others")
    group.add_argument("--vocab-file", help="GPT2BPETokenizer: GPT-2's vocab.json")
    group.add_argument("--merge-file", help="GPT2BPETokenizer: GPT-2's merges.txt")
    group.add_argument("--tiktoken-pattern", choices=["v1", "v2"],
                       help="TikTokenizer: the pre-tokenization regex (default v2)")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: ids 0..N-1 are special tokens (default 1000)")
    group.add_argument("--tokenizer-special-tokens", "--tiktoken-special-tokens",
                       dest="special_tokens", nargs="+", metavar="TOKEN",
                       help="TikTokenizer: the named special tokens, in id order (must include "
                            "<unk> <s> </s> <mask> <pad> <cls> <sep>, the default)")


def options_from_args(args) -> TokenizerOptions:
    """The TokenizerOptions of flags added by `add_tokenizer_flags`."""
    return TokenizerOptions(args.vocab_file, args.merge_file, args.tiktoken_pattern,
                            args.tiktoken_num_special_tokens,
                            tuple(args.special_tokens) if args.special_tokens else None)


# Text that two different tokenizers almost surely split differently: several scripts, digits,
# punctuation, code and runs of whitespace.
_PROBE = ("The quick brown fox jumps over the lazy dog, 0123456789 times. Grüße, naïve café; "
          "Привет, мир! 日本語のテキスト、中文文本。 def f(x):\n    return x ** 2  # done\n\t}")


def fingerprint(tokenizer: Tokenizer) -> Optional[str]:
    """A digest of the ids ``tokenizer`` gives a fixed text (without the special tokens a
    document gets): equal for the same tokenizer under any path or type name that encodes
    alike, different for another. None for NullTokenizer, whose vocabulary size says it all."""
    if isinstance(tokenizer, NullTokenizer):
        return None
    ids = tokenizer.tokenize_without_special_tokens(_PROBE)
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def vocab_size_note(tokenizer_type: str, vocab_size: Optional[int]) -> Optional[str]:
    """The one line to print when --vocab-size is given to a type that ignores it."""
    if vocab_size is None or tokenizer_type in ("NullTokenizer", "TikTokenizer"):
        return None
    return (f"note: --vocab-size {vocab_size} is ignored with --tokenizer-type {tokenizer_type}, "
            "as in Megatron-LM: the vocabulary size is the tokenizer's")


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None,
                    options: Optional[TokenizerOptions] = None) -> Tokenizer:
    """Build a tokenizer; every configuration error is a ValueError naming the flag."""
    options = options or TokenizerOptions()
    cls = TOKENIZER_TYPES.get(tokenizer_type)
    if cls is None:
        raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of "
                         f"{', '.join(TOKENIZER_TYPES)}")
    if cls is NullTokenizer:
        if vocab_size is None or vocab_size <= 0:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size V (a positive "
                             "int: ids in the text are in [0, V), EOD is V)")
        return NullTokenizer(vocab_size)
    if cls is ByteTokenizer:
        return ByteTokenizer()
    if cls is GPT2BPETokenizer:
        return GPT2BPETokenizer(options.vocab_file, options.merge_file)
    if not tokenizer_model:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model PATH "
                         "(a local file or directory)")
    if not os.path.exists(tokenizer_model):
        hint = (" (a local tokenizer.json or saved directory: hub names are not downloaded)"
                if cls is HuggingFaceTokenizer else "")
        raise ValueError(f"--tokenizer-model {tokenizer_model}: no such file or directory{hint}")
    if cls is TikTokenizer:
        return TikTokenizer(tokenizer_model, options.tiktoken_pattern, vocab_size,
                            options.tiktoken_num_special_tokens, options.special_tokens)
    return cls(tokenizer_model)
