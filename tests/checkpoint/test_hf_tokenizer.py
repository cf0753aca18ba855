"""convert_ckpt.py --save-model-type hf without --tokenizer-model: the HF folder gets the
tokenizer the checkpoint's args name, and transformers' AutoTokenizer on it encodes a corpus as
megatron_ext's tokenizer of that checkpoint does, texts with repeated, leading and trailing
spaces included, for a Llama-like SentencePiece model (no whitespace folding) and for one
trained with sentencepiece's defaults (NFKC, repeated spaces collapsed), where a fast
LlamaTokenizer converted from the same file encodes otherwise."""

import json
import os
import random
import warnings

import pytest

from megatron_ext.checkpoint import format as fmt
from megatron_ext.tokenizer import build_tokenizer
from tests.checkpoint.conftest import make_tokenizer_json, run_convert

WORDS = ("the model reads long documents and learns to predict each next token from the ones "
         "before it while the data loader packs them into rows").split()
SPACED = ["two  spaces here", "  leading and trailing  ", "runs   of    spaces", "tab\tand\nnewline",
          "ﬁne Ｆull width", "x  y", " a", ""]


def _corpus(count=300):
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(count)]


def _sentencepiece(tmp_path, name, **options):
    import sentencepiece as spm

    text = tmp_path / f"{name}.txt"
    text.write_text("\n".join(_corpus()) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / name),
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, num_threads=1, minloglevel=2,
                                   **options)
    return tmp_path / f"{name}.model"


def _mg_checkpoint(hf_llama, tmp_path, tokenizer_type, tokenizer_model):
    """hf_llama converted to Megatron, its args naming the tokenizer as a training run's do."""
    mg = run_convert("hf", "mg", hf_llama, tmp_path / "mg")
    path = fmt.rank_file(mg, 1, 0, 0, 1)
    payload = fmt.load_rank_file(path, mmap=False)
    payload["args"].tokenizer_type = tokenizer_type
    payload["args"].tokenizer_model = str(tokenizer_model)
    fmt.save_rank_file(path, payload)
    return mg


def _auto_tokenizer(path):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("normalization, tokenizer_type", [
    ("identity", "GPTSentencePieceTokenizer"),
    ("nmt_nfkc", "Llama2Tokenizer"),
])
def test_sentencepiece_export_encodes_as_ours(hf_llama, tmp_path, capsys, normalization,
                                              tokenizer_type):
    folding = normalization == "nmt_nfkc"  # sentencepiece's defaults: NFKC, spaces folded
    model = _sentencepiece(tmp_path, normalization, normalization_rule_name=normalization,
                           remove_extra_whitespaces=folding)
    out = run_convert("mg", "hf", _mg_checkpoint(hf_llama, tmp_path, tokenizer_type, model),
                      tmp_path / "hf")
    assert f"tokenizer: the checkpoint's {tokenizer_type} {model} as tokenizer.model" in (
        capsys.readouterr().err)
    assert (out / "tokenizer.model").read_bytes() == model.read_bytes()
    ours = build_tokenizer(tokenizer_type, str(model))
    theirs = _auto_tokenizer(out)
    texts = _corpus(100) + SPACED + [f"{a}   {b}" for a, b in zip(_corpus(20), _corpus(40))]
    for text in texts:
        assert theirs(text).input_ids == ours.tokenize(text), repr(text)
    assert theirs.eos_token_id == ours.eod and (theirs.bos_token_id == ours.bos)

    # A fast LlamaTokenizer converted from the same file: what the folder would give without
    # its tokenizer_config.json, and what these texts tell apart from sentencepiece.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.model").write_bytes(model.read_bytes())
    (plain / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    converted = _auto_tokenizer(plain)
    differ = [t for t in SPACED if converted(t, add_special_tokens=False).input_ids
              != ours.tokenize_without_special_tokens(t)]
    if folding:  # repeated spaces: kept there, folded by sentencepiece
        assert "two  spaces here" in differ and "runs   of    spaces" in differ, differ
    else:  # leading spaces only: split differently
        assert differ and all(text.startswith(" ") for text in differ), differ


@pytest.mark.parametrize("tokenizer_type", ["Llama2Tokenizer", "GPTSentencePieceTokenizer"])
def test_explicit_sentencepiece_model_is_exported_as_the_checkpoints(hf_llama, tmp_path,
                                                                      capsys, tokenizer_type):
    """--tokenizer-model naming a bare SentencePiece file (any name) writes what the
    checkpoint's own tokenizer would: tokenizer.model and the same tokenizer_config.json."""
    model = _sentencepiece(tmp_path, "nmt_nfkc")  # sentencepiece's defaults: spaces folded
    bare = tmp_path / "bare" / "spm.model"
    bare.parent.mkdir()
    bare.write_bytes(model.read_bytes())
    mg = _mg_checkpoint(hf_llama, tmp_path, tokenizer_type, model)
    implicit = run_convert("mg", "hf", mg, tmp_path / "implicit")
    explicit = run_convert("mg", "hf", mg, tmp_path / "explicit", "--tokenizer-model", bare)
    assert f"tokenizer: --tokenizer-model {bare} as tokenizer.model" in capsys.readouterr().err
    names = sorted(n for n in os.listdir(explicit) if n.startswith("tokenizer"))
    assert names == ["tokenizer.model", "tokenizer_config.json"]
    for name in names:
        assert (explicit / name).read_bytes() == (implicit / name).read_bytes(), name
    ours = build_tokenizer(tokenizer_type, str(model))
    theirs = _auto_tokenizer(explicit)
    for text in _corpus(50) + SPACED:
        assert theirs(text).input_ids == ours.tokenize(text), repr(text)


def test_hf_tokenizer_files_are_copied(hf_llama, tmp_path, capsys):
    source = make_tokenizer_json(tmp_path / "tok" / "tokenizer.json")
    out = run_convert("mg", "hf", _mg_checkpoint(hf_llama, tmp_path, "HuggingFaceTokenizer",
                                                 source.parent), tmp_path / "hf")
    assert (out / "tokenizer.json").read_bytes() == source.read_bytes()
    assert "tokenizer: the checkpoint's HuggingFaceTokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("tokenizer_type, tokenizer_model, said", [
    ("GPTSentencePieceTokenizer", "gone/tokenizer.model", "is not here"),
    ("NullTokenizer", None, "--tokenizer-type NullTokenizer has no Hugging Face export here"),
])
def test_no_tokenizer_written_is_said_with_the_way_out(hf_llama, tmp_path, capsys,
                                                       tokenizer_type, tokenizer_model, said):
    out = run_convert("mg", "hf", _mg_checkpoint(hf_llama, tmp_path, tokenizer_type,
                                                 tokenizer_model), tmp_path / "hf")
    err = capsys.readouterr().err
    assert said in err and "pass --tokenizer-model PATH to add one" in err
    assert not [name for name in os.listdir(out) if name.startswith("tokenizer")]
