"""The tokenizer of a Hugging Face output (``convert_ckpt.py --save-model-type hf``).

With ``--tokenizer-model PATH`` its files are copied in (``hf_io.tokenizer_files``), but for a
SentencePiece model file alone, exported as the checkpoint's own below. Without it the
checkpoint's own tokenizer is used, the one its ``args`` name as Megatron-LM saves them
(``tokenizer_type``, ``tokenizer_model``, ``checkpoint/args.py``), so that the HF folder
encodes text as the model was trained on:

- HuggingFaceTokenizer (PretrainedFromHF): its files, copied in.
- SentencePiece types (GPTSentencePieceTokenizer, Llama2Tokenizer, SentencePieceTokenizer):
  the model as ``tokenizer.model`` and a ``tokenizer_config.json`` naming transformers'
  ``SentencePieceBackend`` (transformers >= 5) in ``legacy`` mode, which calls sentencepiece
  itself: the ids are ours, repeated spaces and the model's normalization included. A fast
  ``LlamaTokenizer`` converted from the same file is not: it keeps repeated spaces and skips
  the normalization of a model trained with sentencepiece's defaults (``nmt_nfkc``,
  ``remove_extra_whitespaces``), and splits leading spaces differently. BOS is added as our
  type adds it (Llama2Tokenizer only). Left different, and said in the log: text that spells a
  special token (``<s>``) is that token there, plain text here; transformers 4 has no
  ``SentencePieceBackend`` (its slow ``LlamaTokenizer``, ``legacy=True``, encodes alike).
- Other types (GPT2BPETokenizer, TikTokenizer, NullTokenizer, ByteTokenizer), a checkpoint
  without tokenizer args, or a tokenizer file no longer there: no tokenizer is written, said
  in the log with the flag to pass.
"""

import json
import os
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

from megatron_ext.checkpoint.args import saved_value
from megatron_ext.checkpoint.hf import ConversionError
from megatron_ext.checkpoint.hf_io import tokenizer_files

HF_TYPES = ("HuggingFaceTokenizer", "PretrainedFromHF")
# SentencePiece types: whether each starts a document with BOS (megatron_ext.tokenizer).
SENTENCEPIECE_TYPES = {"GPTSentencePieceTokenizer": False, "Llama2Tokenizer": True,
                       "SentencePieceTokenizer": False}
CONFIG_FILENAME = "tokenizer_config.json"
WAY_OUT = "pass --tokenizer-model PATH to add one"


class TokenizerExport:
    """The files to copy into the HF output (source, name there), the ``tokenizer_config.json``
    to write (or None), and the line the log says about it."""

    def __init__(self, files: List[Tuple[Path, str]], config: Optional[dict], note: str):
        self.files, self.config, self.note = files, config, note

    def write(self, out: Path) -> None:
        for source, name in self.files:
            shutil.copy2(source, out / name)
        if self.config is not None:
            (out / CONFIG_FILENAME).write_text(json.dumps(self.config, indent=2) + "\n")


def tokenizer_export(tokenizer_model: Optional[Path], args) -> TokenizerExport:
    """What the HF output gets: ``--tokenizer-model``'s files, else the checkpoint's tokenizer."""
    kind, path = saved_value(args, "tokenizer_type"), saved_value(args, "tokenizer_model")
    if tokenizer_model is not None:
        files = tokenizer_files(tokenizer_model)
        # A SentencePiece model alone has no tokenizer_config.json to say how to load it:
        # exported as the checkpoint's, else transformers converts it to a fast tokenizer.
        sp = _sentencepiece(tokenizer_model) if files == [tokenizer_model] else None
        if sp is not None:
            return _sentencepiece_export(tokenizer_model, sp, kind, "--tokenizer-model")
        return TokenizerExport([(f, f.name) for f in files], None,
                               f"tokenizer: {', '.join(f.name for f in files)} of "
                               f"--tokenizer-model {tokenizer_model}")
    if kind is None:
        return TokenizerExport([], None, f"tokenizer: none written (the checkpoint's args "
                                         f"name no tokenizer); {WAY_OUT}")
    if kind not in HF_TYPES and kind not in SENTENCEPIECE_TYPES:
        return TokenizerExport([], None, f"tokenizer: none written (the checkpoint's "
                                         f"--tokenizer-type {kind} has no Hugging Face "
                                         f"export here); {WAY_OUT}")
    if not path or not os.path.exists(path):
        return TokenizerExport([], None, f"tokenizer: none written (the checkpoint's "
                                         f"--tokenizer-model {path} is not here); {WAY_OUT}")
    if kind in HF_TYPES:
        try:
            files = tokenizer_files(path)
        except ConversionError:
            return TokenizerExport([], None, f"tokenizer: none written (the checkpoint's "
                                             f"--tokenizer-model {path} holds no tokenizer "
                                             f"files); {WAY_OUT}")
        return TokenizerExport([(f, f.name) for f in files], None,
                               f"tokenizer: the checkpoint's {kind} {path} "
                               f"({', '.join(f.name for f in files)})")
    sp = _sentencepiece(Path(path))
    if sp is None:
        return TokenizerExport([], None, f"tokenizer: none written (the checkpoint's "
                                         f"--tokenizer-model {path} is not a SentencePiece "
                                         f"model); {WAY_OUT}")
    return _sentencepiece_export(Path(path), sp, kind, f"the checkpoint's {kind}")


def _sentencepiece(path: Path):
    """The SentencePiece model in file ``path``, or None where it holds none."""
    import sentencepiece

    if not path.is_file():
        return None
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        return None


def _sentencepiece_export(path: Path, sp, kind: Optional[str], source: str) -> TokenizerExport:
    """``path`` as tokenizer.model with the tokenizer_config.json that loads it as sentencepiece
    encodes; BOS first as the checkpoint's --tokenizer-type adds it (none for another type)."""
    add_bos = SENTENCEPIECE_TYPES.get(kind, False)
    return TokenizerExport(
        [(path, "tokenizer.model")], _sentencepiece_config(sp, add_bos),
        f"tokenizer: {source} {path} as tokenizer.model ({'with' if add_bos else 'no'} BOS, "
        f"as --tokenizer-type {kind if kind in SENTENCEPIECE_TYPES else 'SentencePieceTokenizer'}),"
        f" loaded by transformers >= 5 as SentencePieceBackend (legacy), which encodes as "
        f"sentencepiece and megatron_ext do, repeated spaces included (a fast LlamaTokenizer "
        f"converted from it may not); only text that spells a special token differs (a token "
        f"there, plain text here); transformers 4: LlamaTokenizer.from_pretrained(DIR, "
        f"legacy=True, use_fast=False)")


def _sentencepiece_config(sp, add_bos: bool) -> dict:
    # transformers 5 adds BOS by special_tokens_pattern; 4's LlamaTokenizer by add_bos_token.
    config = {"tokenizer_class": "SentencePieceBackend", "legacy": True,
              "add_bos_token": add_bos, "add_eos_token": False}
    if add_bos:
        config["special_tokens_pattern"] = "bos"
    for name, index in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()),
                        ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id())):
        if index >= 0:
            config[name] = sp.id_to_piece(index)
    return config
