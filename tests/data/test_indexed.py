"""The writer against megatron-core's own builder and reader (the oracle)."""

import os

import numpy as np
import pytest

from megatron_ext.data.indexed import (IndexedDatasetReader, IndexedDatasetWriter,
                                       as_token_array, best_dtype)

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")

DOCS = [[1, 2, 3], [], [65000], list(range(100)), [7]]


def _write_megatron(prefix, docs, dtype):
    import torch

    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_files_are_byte_identical_to_megatron_builder(tmp_path, dtype):
    docs = [[t % 200 for t in d] for d in DOCS] if dtype == np.uint8 else DOCS
    with IndexedDatasetWriter(str(tmp_path / "ours"), dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
    _write_megatron(str(tmp_path / "theirs"), docs, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


def test_megatron_reader_reads_what_we_write(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document(DOCS[0])
        writer.add_documents(np.concatenate([np.array(d, np.int64) for d in DOCS[1:]]),
                             [len(d) for d in DOCS[1:]])
    dataset = indexed_dataset.IndexedDataset(prefix)
    assert len(dataset) == len(DOCS)
    assert list(dataset.document_indices) == list(range(len(DOCS) + 1))
    for i, doc in enumerate(DOCS):
        assert dataset[i].tolist() == doc
        assert dataset[i].dtype == np.uint16
    ours = IndexedDatasetReader(prefix)
    assert ours.num_documents == len(DOCS) and ours.num_tokens == sum(map(len, DOCS))
    assert [ours.document(i).tolist() for i in range(len(DOCS))] == DOCS


def test_add_documents_equals_add_document(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "a"), np.int32) as writer:
        for doc in DOCS:
            writer.add_document(doc)
    with IndexedDatasetWriter(str(tmp_path / "b"), np.int32) as writer:
        writer.add_documents(sum(DOCS, []), [len(d) for d in DOCS])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_empty_dataset_matches_megatron_layout(tmp_path):
    # megatron-core cannot memory-map a 0-byte .bin, so compare bytes and read with ours.
    with IndexedDatasetWriter(str(tmp_path / "ours"), np.uint16):
        pass
    _write_megatron(str(tmp_path / "theirs"), [], np.uint16)
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()
    assert IndexedDatasetReader(str(tmp_path / "ours")).num_documents == 0


@pytest.mark.parametrize("vocab", [1, 256, 65499, 65500, 65536, 152064])
def test_best_dtype_matches_megatron(vocab):
    assert best_dtype(vocab) == indexed_dataset.DType.optimal_dtype(vocab)


def test_ids_that_do_not_fit_are_refused_not_wrapped():
    with pytest.raises(ValueError, match="70000 does not fit uint16"):
        as_token_array(np.array([1, 70000]), np.uint16)
    with pytest.raises(ValueError, match="-1 does not fit"):
        as_token_array([3, -1], np.uint16)
    assert as_token_array(np.array([65535]), np.uint16).tolist() == [65535]


def test_exception_inside_writer_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "ds"), np.uint16) as writer:
            writer.add_document([1, 2])
            assert len(os.listdir(tmp_path)) == 1  # only the temporary .bin so far
            raise RuntimeError("crash half-way")
    assert os.listdir(tmp_path) == []


def test_files_appear_only_at_finalize_and_replace_old_ones(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1])
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([5, 6, 7])
    assert IndexedDatasetReader(prefix).document(0).tolist() == [1]  # old pair intact
    writer.finalize()
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    dataset = indexed_dataset.IndexedDataset(prefix)  # must outlive its arrays: it unmaps on del
    assert dataset[0].tolist() == [5, 6, 7]


def test_reader_detects_inconsistent_pair(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="has 8 bytes, the index describes 6"):
        IndexedDatasetReader(prefix)
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" * 4)
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="bad magic"):
        IndexedDatasetReader(str(tmp_path / "bad"))


@pytest.mark.parametrize("add, tokens, lengths, message", [
    ("add_document", [1, 2, 3], [1, 1], r"\[1, 1\] do not split a document of 3 tokens"),
    ("add_document", [1, 2, 3], [4, -1], r"\[ 4, -1\] do not split a document of 3 tokens"),
    ("add_document", [], [], r"\[\] do not split a document of 0 tokens"),
    ("add_documents", [1, 2, 3], [2, 2], r"\[2, 2\] do not split 3 tokens"),
    ("add_documents", [1, 2, 3], [4, -1], r"\[ 4, -1\] do not split 3 tokens"),
])
def test_lengths_that_do_not_split_the_tokens_are_refused(tmp_path, add, tokens, lengths,
                                                          message):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        with pytest.raises(ValueError, match=message):
            getattr(writer, add)(tokens, lengths)
        writer.add_documents([7, 8, 9], [1, 0, 2])  # nothing of the refused call was written
    dataset = IndexedDatasetReader(prefix)
    assert [dataset.document(i).tolist() for i in range(dataset.num_documents)] == [
        [7], [], [8, 9]]
