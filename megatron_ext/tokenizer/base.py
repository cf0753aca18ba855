"""The tokenizer interface; NullTokenizer and ByteTokenizer, which need no model file."""

import re
from typing import List, Optional, Sequence

import numpy as np


class Tokenizer:
    vocab_size: int
    eod: int
    pad: Optional[int] = None
    bos: Optional[int] = None

    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def tokenize_without_special_tokens(self, text: str) -> List[int]:
        """Ids of ``text`` alone, without the special tokens ``tokenize`` adds to a document."""
        return self.tokenize(text)

    @property
    def eos(self) -> int:
        return self.eod

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.tokenize(text) for text in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def hf_tokenizer(self):
        return None


# What int() reads in base 10 (Unicode digits included, as `\d`), for naming a bad token.
_INTEGER = re.compile(r"[+-]?\d+(?:_\d+)*")


class NullTokenizer(Tokenizer):
    def __init__(self, vocab_size: int):
        self._base = vocab_size
        self.vocab_size = vocab_size + 1
        self.eod = vocab_size

    def tokenize(self, text: str) -> List[int]:
        tokens = text.split()
        try:
            ids = np.array(tokens, dtype=np.int64)  # int() of every token, in C
        except (ValueError, OverflowError):  # a token int() cannot read, or one past int64
            bad = next((t for t in tokens if not _INTEGER.fullmatch(t)), None)
            if bad is not None:
                raise ValueError(f"{bad!r} is not an integer token id (NullTokenizer reads "
                                 "whitespace-separated ids)") from None
            bad = next(t for t in tokens if not -2**63 <= int(t) < 2**63)
            raise ValueError(self._outside(bad)) from None
        # An id past the vocabulary would silently wrap around in a uint16 .bin file.
        outside = (ids < 0) | (ids >= self._base)
        if outside.any():
            raise ValueError(self._outside(ids[outside.argmax()]))
        return ids.tolist()

    def _outside(self, token_id) -> str:
        return f"token id {token_id} is outside [0, {self._base}) given by --vocab-size"

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


class ByteTokenizer(Tokenizer):
    vocab_size = 257
    eod = 256

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

