"""Session fixtures: small tokenizers of every kind, trained or built here, once."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron_ext.data.default_corpus import build_corpus, train_tokenizer  # noqa: E402

# Documents that stress tokenizers and the format: empty, whitespace, several scripts,
# emoji (4-byte UTF-8), combining marks, control characters, quotes and backslashes.
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "",
    "   ",
    "Grüße aus Köln — naïve café, ½ × ¾ ≠ π.",
    "日本語のテキストと中文文本。한국어 텍스트.",
    "Emoji: 😀🚀👩‍💻 and flags 🇫🇷🇯🇵.",
    "line one\nline two\ttabbed\r\nwindows line",
    'quotes " and \\ backslashes \\n (literal)',
    "e\u0301 combining, \u200b zero width, \x00 nul, \x7f del",
    "def f(x):\n    return x * 2  # code\n",
    "a" * 3000,
]


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def docs():
    return list(DOCS)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    build_corpus(str(path), max_bytes=300_000)
    return str(path)


@pytest.fixture(scope="session")
def sp_model(small_corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sp") / "tok"
    return train_tokenizer(small_corpus, str(prefix), vocab_size=600)


@pytest.fixture(scope="session")
def sp_model_without_eos(tmp_path_factory):
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("sp_noeos")
    text = directory / "text.txt"
    text.write_text("\n".join(DOCS[:1] * 50 + ["hello world"] * 50), encoding="utf-8")
    prefix = directory / "tok"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=34,
                                   hard_vocab_limit=False, eos_id=-1, num_threads=1, minloglevel=2)
    return f"{prefix}.model"


@pytest.fixture(scope="session")
def hf_tokenizer_json(small_corpus, tmp_path_factory):
    """A byte-level BPE with `<|endoftext|>`, saved as a bare tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    with open(small_corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok.train_from_iterator(texts, trainer)
    path = tmp_path_factory.mktemp("hf_json") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(hf_tokenizer_json, tmp_path_factory):
    """The same tokenizer saved by transformers, with eos/pad/bos in its config."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=hf_tokenizer_json, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<pad>")
    directory = tmp_path_factory.mktemp("hf_dir") / "tok"
    tok.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def tokenizer_configs(sp_model, hf_tokenizer_json, hf_tokenizer_dir):
    """(type, model, vocab_size) for every tokenizer type, for parametrised round trips."""
    return {
        "NullTokenizer": ("NullTokenizer", None, 70000),
        "ByteTokenizer": ("ByteTokenizer", None, None),
        "SentencePieceTokenizer": ("SentencePieceTokenizer", sp_model, None),
        "GPTSentencePieceTokenizer": ("GPTSentencePieceTokenizer", sp_model, None),
        "Llama2Tokenizer": ("Llama2Tokenizer", sp_model, None),
        "HuggingFaceTokenizer-json": ("HuggingFaceTokenizer", hf_tokenizer_json, None),
        "PretrainedFromHF-dir": ("PretrainedFromHF", hf_tokenizer_dir, None),
    }
