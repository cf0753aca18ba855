"""Shards checked against the run before any process group exists (shard_checks.py).

Each bad case stops the run with an error naming the file, the numbers and the flag; the
numbers are read independently with megatron-core's ``IndexedDataset``. One bad case runs
through ``torchrun pretrain_gpt.py`` with the flags a user would give: every rank stops before
iteration 1 (the other cases take the same path from ``check_data``).

The shard: 810 documents of ids 3..7999, each ending with EOD 2, as a SentencePiece 8k
tokenizer with ``--append-eod`` writes them (GPTSentencePieceTokenizer: EOD = EOS = 2).
"""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.config import parse_args
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.data.shard_meta import ShardMeta, write_meta
from megatron_ext.tokenizer import build_tokenizer
from megatron_ext.training.shard_checks import ShardError, check_data
from tests.launcher import launch, pretrain_records
from tests.training.test_launch import RUN_TIMEOUT_S, _torchrun

SP_EOD, SP_VOCAB, DOCS = 2, 8000, 810
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --global-batch-size 4 --train-iters 2 --log-interval 1 "
        "--eval-interval 1 --eval-iters 1 --lr 1e-3 --seed 3").split()


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
    return prefix


def _sp_docs(count=DOCS, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, SP_VOCAB, int(rng.integers(5, 60)))) + [SP_EOD]
            for _ in range(count)]


def _meta_of(prefix, eod=SP_EOD, vocab=SP_VOCAB):
    """Metadata as preprocess_data.py writes it, from megatron-core's reading of the pair."""
    ds = IndexedDataset(prefix)
    tokens = np.concatenate([ds[i] for i in range(len(ds))])
    return ShardMeta(num_documents=len(ds.document_indices) - 1, num_tokens=int(tokens.size),
                     max_id=int(tokens.max()), bin_bytes=os.path.getsize(prefix + ".bin"),
                     idx_bytes=os.path.getsize(prefix + ".idx"),
                     tokenizer_type="GPTSentencePieceTokenizer",
                     tokenizer_model="tokenizer.model", vocab_size=vocab, eod=eod,
                     eod_appended=True, tool="test")


@pytest.fixture
def shard(tmp_path):
    return _write(str(tmp_path / "sp8k_text_document"), _sp_docs())


def _check(prefix, *flags, vocab="8000"):
    argv = TINY + ["--tokenizer-type", "NullTokenizer", "--vocab-size", vocab,
                   "--data-path", prefix, *flags]
    config = parse_args(argv, world_size=1)
    return check_data(config, build_tokenizer("NullTokenizer", None, int(vocab)))


def _bin_bytes_per_megatron(prefix) -> int:
    """What megatron-core reads: the last sequence's pointer + its length x itemsize."""
    ds = IndexedDataset(prefix)
    pointer = int(ds.index.sequence_pointers[-1])
    return pointer + int(ds.index.sequence_lengths[-1]) * ds.index.dtype().itemsize


def test_a_good_shard_passes_and_its_scan_is_cached(shard, tmp_path, caplog):
    cache = str(tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="megatron_ext")
    matrix = _check(shard, "--data-cache-path", cache)
    assert matrix[0] is not None and matrix[1] is not None
    assert "scanned" in caplog.text and "cached in" in caplog.text
    [entry] = os.listdir(os.path.join(cache, "shard_scans"))
    with open(os.path.join(cache, "shard_scans", entry)) as f:
        scan = json.load(f)
    ds = IndexedDataset(shard)
    tokens = np.concatenate([ds[i] for i in range(len(ds))])
    assert scan["max_id"] == int(tokens.max())
    assert scan["key"]["path"] == os.path.abspath(shard + ".bin")
    caplog.clear()
    _check(shard, "--data-cache-path", cache)
    assert "using its scan cached" in caplog.text and "scanned" not in caplog.text
    # A rewritten shard (new mtime, same path) is scanned again.
    os.utime(shard + ".bin", ns=(1, 1))
    caplog.clear()
    _check(shard, "--data-cache-path", cache)
    assert "scanned" in caplog.text


def test_largest_id_beyond_the_vocabulary(shard):
    ds = IndexedDataset(shard)
    largest = int(max(ds[i].max() for i in range(len(ds))))
    with pytest.raises(ShardError) as error:
        _check(shard, vocab="1000")
    message = str(error.value)
    for part in (shard, f"largest token id {largest}", "vocabulary of 1001 ids",
                 "--tokenizer-type NullTokenizer --vocab-size 1000"):
        assert part in message, message
    # The metadata's largest id is used as is, and names the tokenizer the shard was made with.
    write_meta(shard, _meta_of(shard))
    with pytest.raises(ShardError, match="made with GPTSentencePieceTokenizer tokenizer.model"):
        _check(shard, vocab="1000")


@pytest.mark.parametrize("delta_fraction", [-0.01, 0.01])
def test_bin_shorter_or_longer_than_the_index(shard, delta_fraction):
    expected = _bin_bytes_per_megatron(shard)
    size = expected + 2 * int(delta_fraction * expected / 2)  # whole uint16 tokens
    with open(shard + ".bin", "r+b") as f:
        f.truncate(size)
    with pytest.raises(ShardError) as error:
        _check(shard)
    message = str(error.value)
    assert f"{shard}.bin has {size} bytes" in message and str(expected) in message, message


def test_truncated_and_foreign_index(shard, tmp_path):
    idx = shard + ".idx"
    original = open(idx, "rb").read()
    open(idx, "wb").write(original[:len(original) // 2])
    with pytest.raises(ShardError, match=rf"{idx} is truncated"):
        _check(shard)
    open(idx, "wb").write(b'{"not": "an index"}' + bytes(100))
    with pytest.raises(ShardError, match=rf"{idx} is not a Megatron index file"):
        _check(shard)
    open(idx, "wb").write(original + bytes(8))  # longer than its header describes
    with pytest.raises(ShardError, match=rf"{idx} has {len(original) + 8} bytes"):
        _check(shard)


def test_pair_from_two_runs(shard, tmp_path):
    other = _write(str(tmp_path / "other"), _sp_docs(seed=1))
    # Without metadata, the sizes disagree: the .idx of one run beside the .bin of another.
    shutil.copy(other + ".idx", shard + ".idx")
    with pytest.raises(ShardError, match=rf"{shard}.bin has \d+ bytes"):
        _check(shard)
    # With metadata, the pair must be the one it describes: a rerun overwrote .bin and .idx
    # (both consistent with each other) but left the metadata of the first run.
    shard = _write(shard, _sp_docs())
    write_meta(shard, _meta_of(shard))
    shutil.copy(other + ".bin", shard + ".bin")
    shutil.copy(other + ".idx", shard + ".idx")
    with pytest.raises(ShardError, match=rf"{shard}.meta.json describes {DOCS} documents, \d+ "
                                          r"tokens.*the pair holds.*different runs"):
        _check(shard)


def test_zero_document_shard(tmp_path):
    empty = _write(str(tmp_path / "empty"), [])  # a valid index of 0 documents, empty .bin
    with pytest.raises(ShardError, match=rf"{empty} holds no documents"):
        _check(empty)


def test_a_file_name_or_output_prefix_for_data_path_names_the_prefix(shard):
    from megatron_ext.config import ConfigError

    for given in (shard + ".bin", shard + ".idx", shard[:-len("_text_document")]):
        with pytest.raises(ConfigError, match=rf"does not exist; .*did you mean --data-path "
                                              rf"{shard}\?$"):
            _check(given)
    with pytest.raises(ConfigError, match=r"without \.bin/\.idx\)$"):  # nothing near: no guess
        _check(shard + "_other")


def test_no_validation_split_is_said(shard, caplog):
    """--split 100,0,0 with evaluation on: trained without validation, as Megatron-LM, and a
    warning says so (none with --eval-iters 0)."""
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        assert _check(shard, "--split", "100,0,0", "--eval-interval", "5")[1] is None
    assert "--split 100,0,0 has no validation part: --eval-interval 5 evaluates nothing" in (
        caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        _check(shard, "--split", "100,0,0", "--eval-iters", "0")
    assert "validation" not in caplog.text


def test_warnings_are_said_once_by_the_last_rank(shard, caplog, monkeypatch):
    """Every rank checks the same files: of 2 ranks, the last one says what it found."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", False), ("1", True)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megatron_ext"):
            _check(shard, "--split", "100,0,0", "--eval-interval", "5")
        assert ("--split 100,0,0 has no validation part" in caplog.text) == said, (rank,
                                                                                    caplog.text)


def test_gpt2_tokenizer_is_named_by_its_files(shard, tmp_path):
    """GPT2BPETokenizer reads --vocab-file/--merge-file: the error names those, not a
    --tokenizer-model it ignores."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a small corpus of words"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(str(tmp_path))
    vocab, merges = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    argv = TINY + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                   "--merge-file", merges, "--tokenizer-model", "unused.model",
                   "--data-path", shard]
    tokenizer = build_tokenizer("GPT2BPETokenizer", None, None, parse_args(
        argv, world_size=1).data.tokenizer_options())
    with pytest.raises(ShardError) as error:
        check_data(parse_args(argv, world_size=1), tokenizer)
    message = str(error.value)
    assert (f"does not fit the vocabulary of {tokenizer.vocab_size} ids of --tokenizer-type "
            f"GPT2BPETokenizer --vocab-file {vocab} --merge-file {merges};") in message, message


def test_a_split_shorter_than_one_sample_is_said(tmp_path, caplog):
    """--split 99.9,0.1,0 of 810 documents: the validation split is the last one alone (as
    megatron-core cuts it), 6 tokens here, less than one sample of --seq-length 16 + 1, which
    megatron-core fills by repeating it: trained on, with a warning naming the split."""
    docs = _sp_docs()
    docs[-1] = docs[-1][:5] + [SP_EOD]
    prefix = _write(str(tmp_path / "short_text_document"), docs)
    last = IndexedDataset(prefix)[len(docs) - 1]
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        assert _check(prefix, "--split", "99.9,0.1,0")[1] is not None
    assert (f"the valid split of {prefix} holds {last.size} tokens (1 documents), less than one "
            f"sample of --seq-length 16 + 1") in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        _check(prefix, "--split", "98,2,0")  # 16 documents: several samples
    assert "less than one sample" not in caplog.text, caplog.text


def test_empty_splits(shard):
    # megatron-core cuts documents round(810 x 0.9999) = 810 onwards: valid and test are empty.
    with pytest.raises(ShardError) as error:
        _check(shard, "--split", "99990,8,2")
    message = str(error.value)
    for part in ("--split 99990,8,2", "valid split", shard, "train 810, valid 0, test 0",
                 "--eval-iters 0"):
        assert part in message, message
    # Without evaluation neither is read: both are left out instead of built (and hanging).
    assert _check(shard, "--split", "99990,8,2", "--eval-iters", "0")[1:] == [None, None]
    # An empty test split is not evaluated; a non-empty one is built.
    matrix = _check(shard, "--split", "98,1.95,0.05")
    assert matrix[1] is not None and matrix[2] is None
    assert _check(shard, "--split", "98,1,1")[2] is not None


def test_instruction_shards_are_checked(tmp_path):
    prefix = str(tmp_path / "sft")
    docs = _sp_docs(40)
    _write(prefix + "_input_ids_document", docs)
    _write(prefix + "_loss_mask_document", [[1] * len(d) for d in docs], np.uint8)
    argv = TINY + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--data-path",
                   prefix, "--is-instruction-dataset", "--split", "8,1,1"]
    tokenizer = build_tokenizer("NullTokenizer", None, 1000)
    with pytest.raises(ShardError, match=rf"{prefix}_input_ids_document: largest token id"):
        check_data(parse_args(argv, world_size=1), tokenizer)
    argv[argv.index("1000")] = "8000"
    with open(prefix + "_loss_mask_document.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(ShardError, match=rf"{prefix}_loss_mask_document.bin has"):
        check_data(parse_args(argv, world_size=1), build_tokenizer("NullTokenizer", None, 8000))


# -- through torchrun: every rank stops before iteration 1 with the message -------------------
def _fails_on_both_ranks(flags, *expected):
    # A hang would show after RUN_TIMEOUT_S; FAIL_TIMEOUT_S is too tight on a loaded machine
    # for a run that also reads its shards.
    result = _torchrun(2, TINY + flags, RUN_TIMEOUT_S, launcher_flags=["--monitor-interval", "5"])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # Each rank checks alone, before any process group; on a loaded machine the agent may stop
    # the slower rank (after --monitor-interval) before it prints, so one message suffices.
    assert "] invalid data: " in output, output
    for part in expected:
        assert part in output, output
    assert "iteration        1/" not in output


def test_torchrun_vocabulary_tp2(shard):
    # The case: TP 2 would zero the out-of-range ids and train.
    _fails_on_both_ranks(["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
                          "--tensor-model-parallel-size", "2", "--data-path", shard],
                         "largest token id 7999", "vocabulary of 1001 ids", "--vocab-size 1000")


def test_test_split_is_evaluated_when_not_empty(shard):
    argv = TINY + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "8000", "--data-path",
                   shard]
    records = launch(pretrain_records, 1, argv + ["--split", "98,1,1"])[0][1]
    tests = [r for r in records if r["split"] == "test"]
    valid = [r for r in records if r["split"] == "validation" and r["iteration"] == "2"]
    assert len(tests) == 1 and tests[0]["iteration"] == "2", records
    assert valid and tests[0]["lm loss value"] != valid[0]["lm loss value"]  # another split
