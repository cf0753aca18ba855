"""Merge equals concatenation; inspect and the default corpus do what they say."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_ext.data.default_corpus import build_corpus
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.data.merge import merge_datasets

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")

PARTS = [[[1, 2], [], [3]], [[4, 5, 6]], [[], [7]]]


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)


def test_merge_equals_concatenation(tmp_path):
    prefixes = []
    for i, docs in enumerate(PARTS):
        prefixes.append(str(tmp_path / "parts" / f"p{i}"))
        os.makedirs(tmp_path / "parts", exist_ok=True)
        _write(prefixes[-1], docs)
    expected = [d for docs in PARTS for d in docs]
    _write(str(tmp_path / "whole"), expected)

    merge_datasets(prefixes, str(tmp_path / "merged"))
    for ext in (".bin", ".idx"):  # identical to writing the concatenation in one go
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"whole{ext}").read_bytes()
    dataset = indexed_dataset.IndexedDataset(str(tmp_path / "merged"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected

    merged_dir = merge_datasets([str(tmp_path / "parts")], str(tmp_path / "from_dir"))
    assert merged_dir.num_documents == len(expected)


def test_merge_matches_megatron_builder_add_index(tmp_path):
    prefixes = [str(tmp_path / f"p{i}") for i in range(len(PARTS))]
    for prefix, docs in zip(prefixes, PARTS):
        _write(prefix, docs)
    builder = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), np.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "theirs.idx"))
    merge_datasets(prefixes, str(tmp_path / "ours"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


def test_merge_refuses_mixed_dtypes_before_writing(tmp_path):
    _write(str(tmp_path / "a"), [[1]], np.uint16)
    _write(str(tmp_path / "b"), [[2]], np.int32)
    with pytest.raises(ValueError, match=r"different dtypes: .*a \(uint16\), .*b \(int32\)"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]
    with pytest.raises(FileNotFoundError, match="needs both"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "nope")], str(tmp_path / "out"))


def test_merge_cli_both_entry_points(tmp_path, repo_root):
    for i, docs in enumerate(PARTS):
        _write(str(tmp_path / f"p{i}"), docs)
    inputs = [str(tmp_path / f"p{i}") for i in range(len(PARTS))]
    for command in (["preprocess_data.py", "--merge"], ["-m", "megatron_ext.data.merge"]):
        out = str(tmp_path / f"out{len(command)}")
        result = subprocess.run([sys.executable, *command, "--input-prefixes", *inputs,
                                 "--output-prefix", out], capture_output=True, text=True,
                                cwd=repo_root)
        assert result.returncode == 0, result.stderr
        assert "6 documents, 7 tokens" in result.stderr
        dataset = indexed_dataset.IndexedDataset(out)
        assert [dataset[i].tolist() for i in range(len(dataset))] == sum(PARTS, [])


def test_inspect_prints_counts_tokens_and_text(tmp_path, repo_root, sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    text = "def hello(world):\n    return 42"
    prefix = str(tmp_path / "ds")
    _write(prefix, [[5], sp.encode(text) + [sp.eos_id()]])
    result = subprocess.run(
        [sys.executable, "-m", "megatron_ext.data.inspect", prefix, "--doc", "1",
         "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model],
        capture_output=True, text=True, cwd=repo_root, check=True)
    n = len(sp.encode(text)) + 1
    assert f"2 documents, 2 sequences, {n + 1} tokens, dtype uint16" in result.stdout
    assert f"document 1: {n} tokens" in result.stdout
    assert " ".join(map(str, sp.encode(text))) in result.stdout
    assert f"text: {text}" in result.stdout


def test_default_corpus_is_deterministic_and_sized(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    count = build_corpus(str(first), max_bytes=200_000)
    build_corpus(str(second), max_bytes=200_000)
    assert first.read_bytes() == second.read_bytes()
    assert 200_000 <= first.stat().st_size < 200_000 + 64_000
    with open(first) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == count and all(set(r) == {"text"} and r["text"] for r in records)


def test_default_corpus_cli_is_idempotent(tmp_path, repo_root):
    command = [sys.executable, "-m", "megatron_ext.data.default_corpus", "--output-dir",
               str(tmp_path), "--max-bytes", "150000", "--vocab-size", "500"]
    subprocess.run(command, check=True, capture_output=True, cwd=repo_root)
    mtimes = {p: os.stat(tmp_path / p).st_mtime_ns for p in ("corpus.jsonl", "tokenizer.model")}
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=repo_root)
    assert "exists" in result.stderr
    assert mtimes == {p: os.stat(tmp_path / p).st_mtime_ns for p in mtimes}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.vocab_size() == 500 and sp.eos_id() >= 0
    code = "    if x:\n\treturn 'naïve 😀'\n"
    assert sp.decode(sp.encode(code)) == code  # whitespace and any UTF-8 survive


def test_tokenizer_training_is_repeatable(small_corpus, sp_model, tmp_path):
    from megatron_ext.data.default_corpus import train_tokenizer

    again = train_tokenizer(small_corpus, str(tmp_path / "again"), vocab_size=600)
    # The .model differs only in the model_prefix it records; the vocabularies must match.
    with open(sp_model[:-len(".model")] + ".vocab", "rb") as a, \
            open(again[:-len(".model")] + ".vocab", "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("failure", ["error half-way", "no sources"])
def test_build_corpus_leaves_no_temporary_file_on_failure(tmp_path, monkeypatch, failure):
    from megatron_ext.data import default_corpus

    def documents():
        if failure == "error half-way":
            yield "one document"
            raise KeyboardInterrupt
        yield from ()

    monkeypatch.setattr(default_corpus, "iter_documents", documents)
    with pytest.raises(KeyboardInterrupt if failure == "error half-way" else RuntimeError):
        build_corpus(str(tmp_path / "corpus.jsonl"), max_bytes=1000)
    assert os.listdir(tmp_path) == []
