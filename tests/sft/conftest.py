"""Fixtures for the fine-tuning tests: a character-level HF tokenizer whose ids are predictable.

Every printable ASCII character and the newline is one token; the special tokens of the
templates (``<s>``, ``</s>``, ``<|im_start|>``, ...) are added tokens, matched before the text
is split, as in real tokenizers. ``char_ids`` is the independent oracle: it turns a string into
the ids the tokenizer must produce.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
VOCAB = {token: i for i, token in enumerate(SPECIALS + CHARS)}
BOS, EOS, PAD = VOCAB["<s>"], VOCAB["</s>"], VOCAB["<pad>"]

# ChatML as a jinja chat_template (as Qwen2 ships it, without the default system prompt).
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def char_ids(text: str) -> list:
    """The oracle: special tokens first (longest match), else one id per character."""
    ids, i = [], 0
    specials = sorted(SPECIALS, key=len, reverse=True)
    while i < len(text):
        match = next((s for s in specials if text.startswith(s, i)), None)
        if match:
            ids.append(VOCAB[match])
            i += len(match)
        else:
            ids.append(VOCAB[text[i]])
            i += 1
    return ids


def expected(segments) -> tuple:
    """(ids, mask) of ``[(text, trained), ...]``."""
    ids, mask = [], []
    for text, trained in segments:
        piece = char_ids(text)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


@pytest.fixture(scope="session")
def char_tokenizer_dir(tmp_path_factory):
    """A saved transformers tokenizer (tokenizer.json + config, with a ChatML chat_template)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = CHATML_JINJA
    directory = tmp_path_factory.mktemp("char_tok") / "tokenizer"
    hf.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A small SentencePiece BPE with <unk>, <s>, </s> (ids 0, 1, 2), trained on the stdlib."""
    from megatron_ext.data.default_corpus import build_corpus, train_tokenizer

    directory = tmp_path_factory.mktemp("sp")
    corpus = str(directory / "corpus.jsonl")
    build_corpus(corpus, max_bytes=100_000)
    return train_tokenizer(corpus, str(directory / "tok"), vocab_size=600)
