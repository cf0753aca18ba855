"""HuggingFace tokenizers: a local tokenizer.json or saved directory; GPT-2 vocab.json + merges.txt."""

import json
import os
from typing import List, Sequence

from megatron_ext.tokenizer.base import Tokenizer


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


class HuggingFaceTokenizer(Tokenizer):
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


class GPT2BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE from its two files (`--vocab-file vocab.json --merge-file
    merges.txt`), run by the `tokenizers` package. As Megatron-LM's: vocab_size is the number of
    entries in vocab.json, EOD is `<|endoftext|>`, nothing is added to a document, and that text
    inside a document is plain text (Megatron-LM's GPT-2 tokenizer has no special tokens)."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str):
        try:
            from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise ValueError("--tokenizer-type GPT2BPETokenizer needs the `tokenizers` package: "
                             "pip install tokenizers (or megatron-ext[hf])") from None
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path:
                raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file "
                                 "vocab.json and --merge-file merges.txt (GPT-2's format)")
            if not os.path.isfile(path):
                raise ValueError(f"{flag} {path}: no such file")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"--vocab-file {vocab_file} / --merge-file {merge_file} are not "
                             f"GPT-2 vocab.json / merges.txt: {e}") from None
        if self.EOD_TOKEN not in vocab:
            raise ValueError(f"--vocab-file {vocab_file} has no {self.EOD_TOKEN} entry, so "
                             "GPT2BPETokenizer has no EOD; add it or use HuggingFaceTokenizer")
        self._tok = RustTokenizer(model)
        # GPT-2's own splitting regex and byte-to-unicode alphabet; no leading space added.
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self.vocab_size = len(vocab)
        self.eod = vocab[self.EOD_TOKEN]

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [encoding.ids for encoding in self._tok.encode_batch(list(texts))]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
