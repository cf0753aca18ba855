"""Tokenizer contract per type, checked against the backends used directly."""

import subprocess
import sys

import pytest

from megatron_ext.tokenizer import build_tokenizer


def test_null_tokenizer_is_megatrons():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod) == (101, 100)
    assert tok.tokenize("5 7  99\n0") == [5, 7, 99, 0]
    assert tok.tokenize("") == []
    assert tok.detokenize([5, 7]) == "5 7"
    with pytest.raises(ValueError, match=r"token id 100 is outside \[0, 100\)"):
        tok.tokenize("1 100")
    with pytest.raises(ValueError, match=r"token id -1 is outside \[0, 100\)"):
        tok.tokenize("1 -1")
    with pytest.raises(ValueError, match=r"^'0x1' is not an integer token id"):
        tok.tokenize("1 +2 0x1 y")
    with pytest.raises(ValueError, match=r"token id 99999999999999999999 is outside"):
        tok.tokenize("1 99999999999999999999")


def test_byte_tokenizer(docs):
    tok = build_tokenizer("ByteTokenizer")
    assert (tok.vocab_size, tok.eod, tok.eos, tok.pad, tok.bos, tok.hf_tokenizer) == (
        257, 256, 256, None, None, None)
    for text in docs:
        assert tok.tokenize(text) == list(text.encode("utf-8"))
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.tokenize_batch(docs) == [tok.tokenize(t) for t in docs]


@pytest.mark.parametrize("kind, bos", [("GPTSentencePieceTokenizer", False),
                                       ("Llama2Tokenizer", True)])
def test_gpt_sentencepiece_uses_model_eos(kind, bos, sp_model, docs):
    """Megatron's _GPTSentencePieceTokenizer encodes text alone; its _Llama2Tokenizer.tokenize
    (bos=True by default, as preprocess_data.py calls it) puts the model's BOS first."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer(kind, sp_model)
    assert (tok.vocab_size, tok.eod, tok.eos, tok.bos) == (sp.vocab_size(), sp.eos_id(),
                                                           sp.eos_id(), sp.bos_id())
    expected = [[sp.bos_id()] * bos + sp.encode(t) for t in docs]
    assert tok.tokenize_batch(docs) == expected
    for text, ids in zip(docs, expected):
        assert tok.tokenize(text) == ids
        assert tok.tokenize_without_special_tokens(text) == sp.encode(text)
        assert tok.detokenize(tok.tokenize(text)) == sp.decode(sp.encode(text))


def test_llama2_model_without_bos_is_refused(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text("hello world\n" * 50, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=20, hard_vocab_limit=False, bos_id=-1,
                                   num_threads=1, minloglevel=2)
    model = str(tmp_path / "tok.model")
    with pytest.raises(ValueError, match="has no BOS id.*GPTSentencePieceTokenizer"):
        build_tokenizer("Llama2Tokenizer", model)
    assert build_tokenizer("GPTSentencePieceTokenizer", model).bos is None


def test_sentencepiece_tokenizer_adds_megatron_special_ids(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    n = sp.vocab_size()
    # Model has <unk>, <s>, </s> and no pad: <CLS>=n, <SEP>=n+1, <EOD>=n+2, <MASK>=n+3, <PAD>=n+4.
    assert (tok.eod, tok.pad, tok.bos, tok.vocab_size) == (n + 2, n + 4, sp.bos_id(), n + 5)
    assert tok.eos == sp.eos_id() == sp.piece_to_id("</s>")  # the model's EOS, not the <EOD>
    assert tok.tokenize("hello") == tok.tokenize_without_special_tokens("hello") == sp.encode(
        "hello")
    assert tok.detokenize(tok.tokenize("hello") + [tok.eod]) == "hello"


def test_hf_tokenizer_json_and_directory_match_transformers(hf_tokenizer_json,
                                                           hf_tokenizer_dir, docs):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(hf_tokenizer_dir, local_files_only=True)
    for path in (hf_tokenizer_json, hf_tokenizer_dir):
        for kind in ("HuggingFaceTokenizer", "PretrainedFromHF"):
            tok = build_tokenizer(kind, path)
            assert tok.eod == tok.eos == reference.eos_token_id == \
                reference.convert_tokens_to_ids("<|endoftext|>")
            assert tok.vocab_size == len(reference)
            assert tok.tokenize_batch(docs) == [reference(t).input_ids for t in docs]
            for text in docs:
                assert tok.detokenize(tok.tokenize(text)) == reference.decode(
                    reference(text).input_ids)
            assert tok.hf_tokenizer.eos_token_id == tok.eod
    directory = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    assert directory.pad == reference.pad_token_id and directory.bos == reference.bos_token_id


@pytest.mark.parametrize("args, flag", [
    (("BertWordPieceLowerCase",), "--tokenizer-type"),
    (("NullTokenizer",), "--vocab-size"),
    (("GPTSentencePieceTokenizer",), "--tokenizer-model"),
    (("GPTSentencePieceTokenizer", "/no/such/tokenizer.model"), "--tokenizer-model"),
    (("HuggingFaceTokenizer", "meta-llama/Llama-2-7b-hf"), "hub names are not downloaded"),
])
def test_configuration_errors_name_the_flag(args, flag):
    with pytest.raises(ValueError, match=flag):
        build_tokenizer(*args)


def test_not_a_model_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        build_tokenizer("GPTSentencePieceTokenizer", str(bogus))
    bogus_json = tmp_path / "tokenizer.json"
    bogus_json.write_text("{}")
    with pytest.raises(ValueError, match="is not a tokenizers JSON"):
        build_tokenizer("HuggingFaceTokenizer", str(bogus_json))


def test_model_without_eos_has_no_eod(sp_model_without_eos):
    with pytest.raises(ValueError, match="has no EOS id.*SentencePieceTokenizer"):
        build_tokenizer("GPTSentencePieceTokenizer", sp_model_without_eos)
    # Megatron's SentencePieceTokenizer brings its own <EOD>, so this one works; its EOS is
    # the <EOS> it adds last (after <CLS> <SEP> <EOD> <MASK> <PAD>), as Megatron's `eos`.
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=sp_model_without_eos).vocab_size()
    tok = build_tokenizer("SentencePieceTokenizer", sp_model_without_eos)
    assert (tok.eod, tok.eos, tok.vocab_size) == (n + 2, n + 5, n + 6)


def test_hf_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(ValueError, match="defines no EOS token"):
        build_tokenizer("HuggingFaceTokenizer", str(path))


def test_import_is_light(repo_root):
    code = ("import sys, megatron_ext.tokenizer as t; t.build_tokenizer('ByteTokenizer');"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'megatron', 'transformers', 'sentencepiece', 'tokenizers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=repo_root)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "PretrainedFromHF"])
def test_hf_tokenizer_on_the_wrong_path_says_what_it_looked_for(kind, tmp_path, sp_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--tokenizer-model .*empty: no tokenizer files in this "
                       r"directory \(looked for tokenizer.json and tokenizer_config.json\)"):
        build_tokenizer(kind, str(empty))
    # A SentencePiece model, alone in a directory or named outright: which types read it.
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "tokenizer.model").write_bytes(open(sp_model, "rb").read())
    with pytest.raises(ValueError, match=r"holds a SentencePiece tokenizer.model: for it use "
                       r"--tokenizer-type GPTSentencePieceTokenizer .* --tokenizer-model "
                       r".*llama/tokenizer.model"):
        build_tokenizer(kind, str(llama))
    with pytest.raises(ValueError, match=r"tok.model is a SentencePiece model, not a "
                       r"tokenizer.json .*use --tokenizer-type GPTSentencePieceTokenizer"):
        build_tokenizer(kind, sp_model)
    # and the way back: a tokenizer.json given to a SentencePiece type names the HF type
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--tokenizer-type HuggingFaceTokenizer"):
        build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "tokenizer.json"))
