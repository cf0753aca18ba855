"""A shard's EOD against the run's under --reset-position-ids/--reset-attention-mask/
--eod-mask-loss, and its tokenizer against the run's (shard_checks.check_tokens): from the
shard's .meta.json or, without it, from a scan of its tokens, the same verdict; the numbers
read back with megatron-core's ``IndexedDataset``."""

import os
import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.config import parse_args
from megatron_ext.data.shard_meta import write_meta
from megatron_ext.tokenizer import build_tokenizer
from megatron_ext.training.shard_checks import ShardError, check_data
from tests.training import test_shard_checks as checks
from tests.training.test_shard_checks import (DOCS, SP_EOD, SP_VOCAB, TINY, _check, _meta_of,
                                              _sp_docs, _write)

shard = checks.shard  # the 810-document shard of test_shard_checks (a fixture)


@pytest.mark.parametrize("flag", ["--reset-position-ids", "--reset-attention-mask",
                                  "--eod-mask-loss"])
def test_eod_of_another_tokenizer(shard, flag):
    # Without metadata, from the scan: 8000 never occurs, all 810 documents end with 2.
    with pytest.raises(ShardError) as error:
        _check(shard, flag)
    message = str(error.value)
    for part in (shard, "EOD id 8000", "occurs 0 times", f"{DOCS} with id {SP_EOD}", flag):
        assert part in message, message
    _check(shard)  # without the flag, EOD delimits nothing: no error
    write_meta(shard, _meta_of(shard))
    with pytest.raises(ShardError, match=rf"the shard's EOD is id {SP_EOD} .*the run's is 8000"):
        _check(shard, flag)


def test_eod_id_inside_the_text_of_another_tokenizer(tmp_path):
    """A shard of another tokenizer (no metadata) where the run's EOD id is an ordinary token:
    it occurs, but no document ends with it (megatron-core reads them back); the EOD flags
    would cut documents at random places, so the run stops as when the id never occurs."""
    rng = np.random.default_rng(1)
    other_eod = 7  # the shard's tokenizer's EOD; the run's (NullTokenizer 8000) is 8000
    docs = [list(rng.integers(8, 8000, 40)) + [8000] + list(rng.integers(8, 8000, 9))
            + [other_eod] for _ in range(50)]
    prefix = _write(str(tmp_path / "other_text_document"), docs)
    stored = IndexedDataset(prefix)
    assert all(stored[i][-1] == other_eod and 8000 in stored[i] for i in range(len(stored)))
    with pytest.raises(ShardError) as error:
        _check(prefix, "--eod-mask-loss", vocab="8000")
    for part in ("EOD id 8000", "occurs 50 times and ends 0 of its 50", "50 with id 7",
                 "--eod-mask-loss would find no document's end"):
        assert part in str(error.value), str(error.value)
    _check(prefix, vocab="8000")  # without the EOD flags EOD delimits nothing: no error


def test_shard_of_another_tokenizer_with_the_same_vocabulary(tmp_path):
    """Two SentencePiece models of 400 pieces and EOD 2 (BPE and unigram on one corpus): a shard
    preprocess_data.py wrote with one is refused for a run with the other, which reads the same
    text as other ids (checked here with the tokenizers themselves); the same model under another
    path or type name that encodes alike is accepted."""
    from megatron_ext.data.cli import main as preprocess
    from megatron_ext.data.default_corpus import build_corpus, train_tokenizer

    corpus = str(tmp_path / "corpus.jsonl")
    build_corpus(corpus, max_bytes=100_000)
    bpe = train_tokenizer(corpus, str(tmp_path / "bpe"), vocab_size=400)
    unigram = train_tokenizer(corpus, str(tmp_path / "unigram"), vocab_size=400,
                              model_type="unigram")
    prefix = str(tmp_path / "bpe")
    preprocess(["--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
                "GPTSentencePieceTokenizer", "--tokenizer-model", bpe, "--append-eod"])
    prefix += "_text_document"

    def check(tokenizer_type, model):
        argv = TINY + ["--tokenizer-type", tokenizer_type, "--tokenizer-model", model,
                       "--data-path", prefix, "--reset-position-ids"]
        return check_data(parse_args(argv, world_size=1), build_tokenizer(tokenizer_type, model))

    a, b = (build_tokenizer("GPTSentencePieceTokenizer", m) for m in (bpe, unigram))
    assert (a.vocab_size, a.eod) == (b.vocab_size, b.eod) == (400, 2)
    text = "def main(argv):\n    return parse_args(argv)"
    assert a.tokenize(text) != b.tokenize(text)
    with pytest.raises(ShardError, match=rf"{prefix}: made with another tokenizer than this "
                                         rf"run's --tokenizer-type GPTSentencePieceTokenizer "
                                         rf"--tokenizer-model {unigram} \(the shard was made "
                                         rf"with GPTSentencePieceTokenizer {bpe}"):
        check("GPTSentencePieceTokenizer", unigram)
    moved = shutil.copy(bpe, tmp_path / "moved.model")
    check("GPTSentencePieceTokenizer", str(moved))
    check("Llama2Tokenizer", bpe)


def test_shard_written_without_append_eod_is_refused_with_or_without_metadata(tmp_path):
    """preprocess_data.py without --append-eod: under an EOD flag the run stops, its
    .meta.json (eod_appended false) or, without it, the scan of its tokens saying so alike."""
    from megatron_ext.data.cli import main as preprocess
    from megatron_ext.data.default_corpus import build_corpus, train_tokenizer

    corpus = str(tmp_path / "corpus.jsonl")
    build_corpus(corpus, max_bytes=100_000)
    model = train_tokenizer(corpus, str(tmp_path / "sp"), vocab_size=400)
    prefix = str(tmp_path / "noeod")
    preprocess(["--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
                "GPTSentencePieceTokenizer", "--tokenizer-model", model])
    prefix += "_text_document"
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", model)
    stored = IndexedDataset(prefix)
    assert not any(stored[i][-1] == tokenizer.eod for i in range(len(stored)))

    def check(*flags):
        argv = TINY + ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
                       model, "--data-path", prefix, "--split", "90,10,0", *flags]
        return check_data(parse_args(argv, world_size=1), tokenizer)

    check()  # without the EOD flags EOD delimits nothing
    for with_meta in (True, False):
        assert os.path.exists(prefix + ".meta.json") == with_meta
        with pytest.raises(ShardError) as error:
            check("--reset-position-ids", "--eod-mask-loss")
        for part in (f"--data-path {prefix}:", "--reset-position-ids/--eod-mask-loss would find "
                     "no document's end", "preprocess_data.py --append-eod"):
            assert part in str(error.value), str(error.value)
        os.remove(prefix + ".meta.json") if with_meta else None


def test_eod_matching_the_run_passes(tmp_path):
    # NullTokenizer --vocab-size 8000: EOD 8000, so a shard ending documents with it is right.
    docs = [doc[:-1] + [SP_VOCAB] for doc in _sp_docs(50)]
    _check(_write(str(tmp_path / "null"), docs), "--reset-position-ids", "--split", "8,1,1")
