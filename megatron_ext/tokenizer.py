"""Tokenizers by Megatron-LM's `--tokenizer-type` names, without torch or megatron.

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
  Llama-3 tokenizer adds its BOS to every document).

`eos`, the id chat templates place for `{eos}`, is EOD except for SentencePieceTokenizer, whose
EOD is an added `<EOD>` the model never saw: there it is the model's EOS piece (or the `<EOS>`
id Megatron adds when the model has none, as Megatron's `eos`).
`tokenize_without_special_tokens` encodes text alone, without the BOS that Llama2Tokenizer or an
HF post-processor adds: chat templates place BOS/EOS themselves.
"""

import json
import os
import re
from typing import List, Optional, Sequence

import numpy as np


class _Tokenizer:
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


class NullTokenizer(_Tokenizer):
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


class ByteTokenizer(_Tokenizer):
    vocab_size = 257
    eod = 256

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class GPTSentencePieceTokenizer(_Tokenizer):
    # Each process tokenizes on one thread: preprocessing parallelises over processes.
    threads = 1
    add_bos = False  # whether `tokenize` starts a document with BOS

    def __init__(self, model_path: str):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"--tokenizer-model {model_path} is not a SentencePiece model: {e} "
                             "(a tokenizer.json or a saved HF directory is read by "
                             "--tokenizer-type HuggingFaceTokenizer)") from None
        self.vocab_size = self._sp.vocab_size()
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eod = self._eod_id(model_path)
        if self.add_bos and self.bos is None:
            # sentencepiece would fail on every document, each a skippable record error.
            raise ValueError(
                f"--tokenizer-model {model_path} has no BOS id (trained with bos_id=-1), so "
                f"{type(self).__name__} cannot start documents with BOS; use "
                "--tokenizer-type GPTSentencePieceTokenizer or a model with a BOS piece")

    def _eod_id(self, model_path: str) -> int:
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"--tokenizer-model {model_path} has no EOS id (trained with eos_id=-1), so "
                f"{type(self).__name__} has no EOD; use --tokenizer-type SentencePieceTokenizer "
                "(adds its own <EOD>) or a model with an EOS piece")
        return self._sp.eos_id()

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text, add_bos=self.add_bos)

    def tokenize_without_special_tokens(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts), add_bos=self.add_bos, num_threads=self.threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if i < self._sp.vocab_size()])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron's `_Llama2Tokenizer.tokenize(s, bos=True, eos=False)`, which its
    preprocess_data.py calls with the defaults: BOS, then the text's ids."""

    add_bos = True


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    def _eod_id(self, model_path: str) -> int:
        vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.vocab_size())}

        def special(piece: str) -> int:
            if piece not in vocab:
                vocab[piece] = len(vocab)
            return vocab[piece]

        def piece_of(index: int, fallback: str) -> str:
            return self._sp.id_to_piece(index) if index >= 0 else fallback

        # Megatron's order of additions; it fixes the ids that missing pieces get.
        special("<CLS>")
        special("<SEP>")
        eod = special("<EOD>")
        special("<MASK>")
        self.pad = special(piece_of(self._sp.pad_id(), "<PAD>"))
        self.bos = special(piece_of(self._sp.bos_id(), "<BOS>"))
        self._eos = special(piece_of(self._sp.eos_id(), "<EOS>"))
        self.vocab_size = len(vocab)
        return eod

    @property
    def eos(self) -> int:
        return self._eos


_SENTENCEPIECE_TYPES = ("use --tokenizer-type GPTSentencePieceTokenizer (EOD = its EOS), "
                        "Llama2Tokenizer (BOS before every document, as Megatron) or "
                        "SentencePieceTokenizer (Megatron's own added <EOD>)")


def _is_sentencepiece(path: str) -> bool:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError):
        return False
    return True


class HuggingFaceTokenizer(_Tokenizer):
    """A local `tokenizer.json`, or a directory saved by transformers; never a hub name."""

    # Used only for a bare tokenizer.json, which does not say which token is EOS.
    _KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
    # What a directory needs: a fast tokenizer's tokenizer.json, or transformers' config with
    # the vocabulary files of a slow (Python) tokenizer.
    LOOKED_FOR = ("tokenizer.json", "tokenizer_config.json")

    def __init__(self, path: str):
        self._path = path
        self._hf = None
        self._tok = None
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        json_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name))
                                           for name in self.LOOKED_FOR):
            sp_model = os.path.join(path, "tokenizer.model")
            hint = (f"; it holds a SentencePiece tokenizer.model: for it "
                    f"{_SENTENCEPIECE_TYPES} with --tokenizer-model {sp_model}"
                    if os.path.isfile(sp_model) else
                    "; give the directory save_pretrained() wrote, or a tokenizer.json")
            raise ValueError(f"--tokenizer-model {path}: no tokenizer files in this directory "
                             f"(looked for {' and '.join(self.LOOKED_FOR)}){hint}")
        special = _special_tokens_from_config(directory)
        if os.path.isfile(json_file):
            # `tokenizers` loads in milliseconds; transformers would import torch.
            import tokenizers

            try:
                self._tok = tokenizers.Tokenizer.from_file(json_file)
            except Exception as e:
                if _is_sentencepiece(json_file):
                    raise ValueError(
                        f"--tokenizer-model {json_file} is a SentencePiece model, not a "
                        f"tokenizer.json or a saved HF directory; {_SENTENCEPIECE_TYPES}"
                    ) from None
                raise ValueError(f"--tokenizer-model {json_file} is not a tokenizers JSON: "
                                 f"{e}") from None
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            ids = {name: self._tok.token_to_id(tok) for name, tok in special.items()}
            if "eos" not in special:
                known = [self._tok.token_to_id(t) for t in self._KNOWN_EOS]
                ids["eos"] = next((i for i in known if i is not None), None)
        else:
            try:
                hf = self.hf_tokenizer  # a directory with only a slow (Python) tokenizer
            except Exception as e:  # transformers raises several types for what is missing
                raise ValueError(f"--tokenizer-model {path}: no tokenizer.json, and transformers "
                                 f"cannot load a slow tokenizer from its tokenizer_config.json "
                                 f"({type(e).__name__}: {e})") from None
            self.vocab_size = len(hf)
            ids = {"eos": hf.eos_token_id, "pad": hf.pad_token_id, "bos": hf.bos_token_id}
        if ids.get("eos") is None:
            raise ValueError(
                f"--tokenizer-model {path} defines no EOS token, so there is no EOD; save the "
                "tokenizer with an eos_token (tokenizer_config.json) or pick another tokenizer")
        self.eod = ids["eos"]
        self.pad = ids.get("pad")
        self.bos = ids.get("bos")

    def tokenize(self, text: str) -> List[int]:
        if self._tok is None:
            return self._hf(text).input_ids
        return self._tok.encode(text).ids

    def tokenize_without_special_tokens(self, text: str) -> List[int]:
        """Without what the post-processor adds (a Llama-3 BOS per call)."""
        if self._tok is None:
            return self._hf(text, add_special_tokens=False).input_ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self._tok is None:
            return self._hf(list(texts)).input_ids
        return [encoding.ids for encoding in self._tok.encode_batch(list(texts))]

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._tok is None:
            return self._hf.decode(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def hf_tokenizer(self):
        """The transformers tokenizer (for chat templates), loaded on first use."""
        if self._hf is None:
            import transformers

            if os.path.isdir(self._path):
                self._hf = transformers.AutoTokenizer.from_pretrained(
                    self._path, local_files_only=True)
            else:
                self._hf = transformers.PreTrainedTokenizerFast(
                    tokenizer_file=self._path,
                    eos_token=self._tok.id_to_token(self.eod))
        return self._hf


def _special_tokens_from_config(directory: str) -> dict:
    """eos/bos/pad token strings from transformers' config files, when they are there."""
    found = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not directory or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        for key in ("eos", "bos", "pad"):
            value = config.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


TOKENIZER_TYPES = {
    "NullTokenizer": NullTokenizer,
    "ByteTokenizer": ByteTokenizer,
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
    "Llama2Tokenizer": Llama2Tokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "PretrainedFromHF": HuggingFaceTokenizer,
}


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> _Tokenizer:
    """Build a tokenizer; every configuration error is a ValueError naming the flag."""
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
    if not tokenizer_model:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model PATH "
                         "(a local file or directory)")
    if not os.path.exists(tokenizer_model):
        hint = (" (a local tokenizer.json or saved directory: hub names are not downloaded)"
                if cls is HuggingFaceTokenizer else "")
        raise ValueError(f"--tokenizer-model {tokenizer_model}: no such file or directory{hint}")
    return cls(tokenizer_model)
