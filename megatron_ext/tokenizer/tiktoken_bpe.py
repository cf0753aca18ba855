"""Megatron-LM's TikTokenizer: a local BPE rank file run by the `tiktoken` package.

Ids as Megatron-LM lays them out: the special tokens first (ids 0..N-1, N =
`--tiktoken-num-special-tokens`, default 1000): the `--tokenizer-special-tokens` in their order
(default `<unk> <s> </s> <mask> <pad> <cls> <sep>`, which any custom list must contain), then
`<SPECIAL_i>` fillers up to N; then BPE rank r as id N + r, for the first
`--vocab-size - N` ranks (`--vocab-size` defaults to 131072 and is the whole vocabulary).
EOD is `</s>`; BOS `<s>`; `tokenize` adds neither, as Megatron-LM's preprocess_data.py writes
documents. Special-token text inside a document is encoded as plain text (Megatron-LM's legacy
TikTokenizer does so; its newer one maps it to the special id: see docs/megatron-compat.md).

The rank file is Megatron-LM's JSON (a list of `{"rank", "token_bytes" (base64), "token_str"}`,
ranks 0..255 the single bytes in order) or tiktoken's own `.tiktoken` text format (`base64 rank`
per line, as `tiktoken.load.load_tiktoken_bpe` reads).
"""

import base64
import binascii
import json
from typing import Dict, List, Optional, Sequence

from megatron_ext.tokenizer.base import Tokenizer

PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
REQUIRED_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
DEFAULT_VOCAB_SIZE = 2 ** 17
DEFAULT_NUM_SPECIAL_TOKENS = 1000


def read_ranks(path: str) -> List[bytes]:
    """The BPE tokens of `path` in rank order (Megatron-LM's JSON or a .tiktoken file)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.lstrip()[:1] == b"[":
        try:
            entries = json.loads(raw)
            tokens = [base64.b64decode(entry["token_bytes"]) for entry in entries]
            ranks = [entry["rank"] for entry in entries]
        except (ValueError, TypeError, KeyError, binascii.Error) as e:
            raise ValueError(f"--tokenizer-model {path}: not Megatron-LM's tiktoken JSON (a list "
                             f"of {{rank, token_bytes, token_str}}): {e}") from None
        if ranks != list(range(len(ranks))):
            raise ValueError(f"--tokenizer-model {path}: ranks must be 0, 1, 2, ... in order")
        bad = next((i for i in range(min(256, len(tokens))) if tokens[i] != bytes([i])), None)
        if bad is not None:
            raise ValueError(f"--tokenizer-model {path}: rank {bad} must be the single byte "
                             f"{bad} (Megatron-LM's layout)")
        return tokens
    by_rank: Dict[int, bytes] = {}
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            by_rank[int(rank)] = base64.b64decode(token, validate=True)
        except (ValueError, binascii.Error):
            raise ValueError(f"--tokenizer-model {path}:{number}: expected 'base64 rank' (a "
                             ".tiktoken file) or Megatron-LM's JSON list") from None
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(f"--tokenizer-model {path}: ranks must be 0..{len(by_rank) - 1}, "
                         "each once")
    return [by_rank[i] for i in range(len(by_rank))]


class TikTokenizer(Tokenizer):
    def __init__(self, path: str, pattern: Optional[str] = None, vocab_size: Optional[int] = None,
                 num_special_tokens: Optional[int] = None,
                 special_tokens: Optional[Sequence[str]] = None):
        try:
            import tiktoken
        except ImportError:
            raise ValueError("--tokenizer-type TikTokenizer needs the `tiktoken` package: pip "
                             "install tiktoken (or megatron-ext[hf])") from None
        pattern = pattern or "v2"  # megatron-core's default when --tiktoken-pattern is not given
        if pattern not in PATTERNS:
            raise ValueError(f"--tiktoken-pattern {pattern!r}: choose v1 or v2")
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        n = DEFAULT_NUM_SPECIAL_TOKENS if num_special_tokens is None else num_special_tokens
        special = list(special_tokens or REQUIRED_SPECIAL_TOKENS)
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in special]
        if missing or len(set(special)) != len(special):
            raise ValueError(f"--tokenizer-special-tokens must list each of "
                             f"{' '.join(REQUIRED_SPECIAL_TOKENS)} once (missing: "
                             f"{' '.join(missing) or 'none'}; repeated tokens are not allowed)")
        if not len(special) <= n < vocab_size:
            raise ValueError(f"--tiktoken-num-special-tokens {n} must be at least the "
                             f"{len(special)} special tokens and below --vocab-size {vocab_size}")
        special += [f"<SPECIAL_{i}>" for i in range(len(special), n)]
        tokens = read_ranks(path)
        if len(tokens) < vocab_size - n:
            raise ValueError(
                f"--vocab-size {vocab_size} leaves {vocab_size - n} ids for BPE ranks after "
                f"--tiktoken-num-special-tokens {n}, but --tokenizer-model {path} has only "
                f"{len(tokens)}; pass --vocab-size {len(tokens) + n} (Megatron-LM's default is "
                f"{DEFAULT_VOCAB_SIZE})")
        ranks = {token: n + i for i, token in enumerate(tokens[:vocab_size - n])}
        if len(ranks) != vocab_size - n:
            raise ValueError(f"--tokenizer-model {path}: a token appears at two ranks")
        self._encoding = tiktoken.Encoding(
            name="megatron_ext_tiktoken", pat_str=PATTERNS[pattern], mergeable_ranks=ranks,
            special_tokens={token: i for i, token in enumerate(special)})
        self.special_tokens = special
        self.vocab_size = vocab_size
        self.bos = special.index("<s>")
        self.eod = special.index("</s>")
        self.pad = special.index("<pad>")

    def tokenize(self, text: str) -> List[int]:
        return self._encoding.encode_ordinary(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # One thread per process: preprocessing parallelises over processes.
        return self._encoding.encode_ordinary_batch(list(texts), num_threads=1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids], errors="replace")
