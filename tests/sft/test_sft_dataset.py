"""The training side: samples from instruction shards, splits and blends, get_batch's
PackedSeqParams from the data's boundaries, and the flags that cannot work."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

import pretrain_gpt
from megatron_ext.config import ConfigError, parse_args
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.data.instruct.pipeline import output_prefixes
from megatron_ext.training.sft_dataset import build_sample
from megatron_ext.training.data import build_datasets, data_iterator

pytestmark = pytest.mark.usefixtures("tmp_cwd", "one_rank_group")  # dataset caches there

SEQ = 9  # rows of 10 tokens
EOD, VOCAB = 255, 256
FLAGS = (f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length {SEQ} "
         "--tokenizer-type NullTokenizer --vocab-size 255 --is-instruction-dataset").split()


def _conversation(first, n, answer):
    """ids first, first+1, ...; the last ``answer`` tokens trained on."""
    return np.arange(first, first + n), np.array([0] * (n - answer) + [1] * answer, np.uint8)


def _write(prefix, documents, packed=True):
    """documents: lists of conversations; packed documents are padded to SEQ + 1 with 0."""
    ids_prefix, mask_prefix = output_prefixes(prefix)
    with IndexedDatasetWriter(ids_prefix, np.uint16) as ids_w, \
            IndexedDatasetWriter(mask_prefix, np.uint8) as mask_w:
        for conversations in documents:
            ids = [c[0] for c in conversations]
            mask = [c[1] for c in conversations]
            lengths = [len(c[0]) for c in conversations]
            if packed and sum(lengths) < SEQ + 1:
                padding = SEQ + 1 - sum(lengths)
                ids.append(np.zeros(padding, np.int64))
                mask.append(np.zeros(padding, np.uint8))
                lengths.append(padding)
            ids_w.add_document(np.concatenate(ids), lengths)
            mask_w.add_document(np.concatenate(mask), lengths)
    return prefix


def test_writer_documents_of_several_sequences_read_by_megatron_core(tmp_path):
    prefix = _write(str(tmp_path / "d"), [[_conversation(1, 4, 2), _conversation(20, 3, 1)],
                                          [_conversation(40, 10, 5)]])
    ids = IndexedDataset(output_prefixes(prefix)[0])
    assert list(ids.document_indices) == [0, 3, 4]
    assert list(ids.sequence_lengths) == [4, 3, 3, 10]
    assert ids[1].tolist() == [20, 21, 22] and ids[2].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="do not split a document of 3 tokens"):
        IndexedDatasetWriter(str(tmp_path / "x"), np.uint16).add_document([1, 2, 3], [1, 1])


def test_packed_row_becomes_shifted_sample_with_segments():
    a, b = _conversation(1, 4, 2), _conversation(20, 3, 1)  # + 3 padding
    ids = np.concatenate([a[0], b[0], [0, 0, 0]])
    mask = np.concatenate([a[1], b[1], [0, 0, 0]]).astype(np.uint8)
    sample = build_sample(ids, mask, [4, 3, 3], SEQ, pad=0)
    assert sample["tokens"].tolist() == [1, 2, 3, 4, 20, 21, 22, 0, 0]
    assert sample["labels"].tolist() == [2, 3, 4, 20, 21, 22, 0, 0, 0]
    # label 20 (b's first token) after a's last input is masked; b's answer (22) is trained
    assert sample["loss_mask"].tolist() == [0, 1, 1, 0, 0, 1, 0, 0, 0]
    assert sample["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert sample["seq_lengths"].tolist() == [4, 3, 2, 0, 0, 0, 0, 0, 0]


def test_unpacked_conversations_are_padded_or_truncated():
    ids, mask = _conversation(1, 4, 2)
    sample = build_sample(ids, mask, [4], SEQ, pad=7)
    assert sample["tokens"].tolist() == [1, 2, 3, 4, 7, 7, 7, 7, 7]
    assert sample["loss_mask"].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert sample["seq_lengths"].tolist()[:3] == [4, 5, 0]  # the padding is its own segment
    ids, mask = _conversation(1, 14, 8)
    sample = build_sample(ids, mask, [14], SEQ, pad=7)
    assert sample["tokens"].tolist() == list(range(1, 10))
    assert sample["labels"].tolist() == list(range(2, 11))
    assert sample["seq_lengths"].tolist()[:2] == [9, 0]


def _datasets(data_path, sizes, *extra, world_size=1):
    config = parse_args(FLAGS + ["--data-path", *data_path, *extra], world_size=world_size)
    return config, build_datasets(config, EOD, VOCAB, sizes)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sft_shards")
    rng = np.random.default_rng(0)
    documents = []
    for d in range(20):  # document d: conversations of ids 10 d + ...
        sizes = [int(rng.integers(2, 5)) for _ in range(2)]
        documents.append([_conversation(10 * d + 1 + 5 * k, n, 1) for k, n in enumerate(sizes)])
    packed = _write(str(directory / "packed"), documents)
    other = _write(str(directory / "other"), [[_conversation(230, 10, 3)]] * 5)
    single = _write(str(directory / "single"), [[_conversation(1, n, 1)] for n in (3, 12, 5)],
                    packed=False)
    return {"packed": packed, "other": other, "single": single}


def test_splits_cover_the_documents_once_per_epoch(shards):
    _, (train, valid, test) = _datasets([shards["packed"]], [32, 4, 0], "--split", "80,20,0")
    assert test is None
    first = lambda sample: int(sample["tokens"][0]) // 10  # noqa: E731 (the document)
    train_docs = [first(train[i]) for i in range(len(train))]
    assert len(train) == 32 and sorted(train_docs[:16]) == list(range(16))  # epoch 1, shuffled
    assert sorted(train_docs[16:]) == list(range(16)) and train_docs[:16] != train_docs[16:]
    assert sorted(first(valid[i]) for i in range(len(valid))) == [16, 17, 18, 19]
    for i in range(len(train)):
        sample = train[i]
        assert int(sample["seq_lengths"].sum()) == SEQ
        assert sample["position_ids"][0] == 0 and sample["loss_mask"].sum() >= 1


def test_no_shuffle_keeps_the_file_order_in_every_epoch(shards):
    """MindSpeed-LLM's --no-shuffle: each epoch in file order (the shuffled run above is not)."""
    _, (train, _, _) = _datasets([shards["packed"]], [32, 0, 0], "--split", "80,20,0",
                                 "--no-shuffle")
    assert [int(train[i]["tokens"][0]) // 10 for i in range(32)] == list(range(16)) * 2


def test_weighted_blend_of_instruction_datasets(shards):
    _, (train, _, _) = _datasets(["0.5", shards["packed"], "0.5", shards["other"]], [40, 0, 0],
                                 "--split", "100,0,0")
    sources = ["other" if int(train[i]["tokens"][0]) == 230 else "packed" for i in range(40)]
    assert sources.count("other") == 20


def test_batches_carry_boundaries_and_get_batch_builds_packed_seq_params(shards):
    config, (train, _, _) = _datasets([shards["packed"]], [4, 0, 0], "--split", "100,0,0",
                                      "--micro-batch-size", "2")
    batch = next(data_iterator(train, 0, 2, 0, 1))
    rows = [batch["seq_lengths"][r][batch["seq_lengths"][r] > 0].tolist() for r in range(2)]
    out = pretrain_gpt.get_batch(config, EOD, iter([batch]))
    assert "seq_lengths" not in out and out["tokens"].shape == (1, 2 * SEQ)
    ends = np.cumsum(rows[0] + rows[1]).tolist()  # row 1 offset by SEQ: (b, s) order
    assert out["packed_seq_params"].cu_seqlens_q.tolist() == [0] + ends
    assert out["packed_seq_params"].cu_seqlens_q.dtype == torch.int32
    assert out["packed_seq_params"].max_seqlen_q == max(rows[0] + rows[1])
    assert ends[len(rows[0]) - 1] == SEQ


def test_unpacked_shards_truncate_long_conversations(shards, caplog):
    _, (train, _, _) = _datasets([shards["single"]], [3, 0, 0], "--split", "100,0,0")
    lengths = sorted(tuple(train[i]["seq_lengths"][:2].tolist()) for i in range(3))
    assert lengths == [(3, 6), (5, 4), (9, 0)]
    assert "1 of 3 conversations exceed --seq-length + 1 = 10 tokens" in caplog.text


def test_no_mmap_bin_files_reads_the_same_samples_with_file_reads(shards):
    """--no-mmap-bin-files: megatron-core reads both shards with file reads, not a memory map
    (its _FileBinReader), and the samples are those of the memory-mapped shards."""
    from megatron.core.datasets.indexed_dataset import _FileBinReader, _MMapBinReader

    def build(*extra):
        train = _datasets([shards["packed"]], [8, 0, 0], "--split", "100,0,0", *extra)[1][0]
        shards_of = getattr(train, "datasets", [train])[0].dataset
        return train, {type(shards_of.ids.bin_reader), type(shards_of.mask.bin_reader)}

    mapped, mapped_readers = build()
    read, read_readers = build("--no-mmap-bin-files")
    assert mapped_readers == {_MMapBinReader} and read_readers == {_FileBinReader}
    for i in range(8):
        for key, value in mapped[i].items():
            assert torch.equal(read[i][key], value), (i, key)


def test_packed_with_another_seq_length_is_refused(shards):
    with pytest.raises(ConfigError, match=r"packed to 10 tokens \(preprocess_data.py --pack "
                                          r"--seq-length 9\), but --seq-length is 12"):
        _datasets([shards["packed"]], [4, 0, 0], "--split", "100,0,0", "--seq-length", "12")


def test_missing_or_mismatched_shards(shards, tmp_path):
    with pytest.raises(ConfigError, match="give the prefix without _input_ids_document: "
                                          f"--data-path {shards['packed']}$"):
        _datasets([output_prefixes(shards["packed"])[0]], [4, 0, 0])
    with pytest.raises(ConfigError, match="missing; write them with preprocess_data.py"):
        _datasets([str(tmp_path / "nothing")], [4, 0, 0])
    # The two formats mixed up: pretraining data as instruction data, and the other way round.
    text = str(tmp_path / "corpus_text_document")
    with IndexedDatasetWriter(text, np.uint16) as writer:
        writer.add_document(np.arange(1, 30), [29])
    with pytest.raises(ConfigError, match=f"{text} is pretraining data .*: drop "
                                          "--is-instruction-dataset"):
        _datasets([text], [4, 0, 0])
    pretraining = [a for a in FLAGS if a != "--is-instruction-dataset"]
    with pytest.raises(ConfigError, match=f"{shards['packed']} holds instruction shards .*: "
                       f"train on them with --is-instruction-dataset --data-path "
                       f"{shards['packed']}$"):
        build_datasets(parse_args(pretraining + ["--data-path", shards["packed"]],
                                  world_size=1), EOD, VOCAB, [4, 0, 0])
    # a loss mask written for other documents
    prefix = str(tmp_path / "mixed")
    _write(prefix, [[_conversation(1, 10, 2)]])
    _write(str(tmp_path / "two"), [[_conversation(1, 5, 2)], [_conversation(1, 5, 2)]])
    for ext in (".bin", ".idx"):
        src = output_prefixes(str(tmp_path / "two"))[1] + ext
        open(output_prefixes(prefix)[1] + ext, "wb").write(open(src, "rb").read())
    with pytest.raises(ValueError, match="describe different sequences or documents"):
        _datasets([prefix], [1, 0, 0], "--split", "100,0,0")


def test_empty_split_that_is_needed_is_refused(shards):
    with pytest.raises(ConfigError, match=r"the valid split has no samples \(3 in all, "
                                          r"--split 99,1,0\)"):
        _datasets([shards["single"]], [3, 2, 0], "--split", "99,1,0")


@pytest.mark.parametrize("flags, message", [
    (["--mock-data"], "--is-instruction-dataset .* cannot be used with --mock-data"),
    ([], "--is-instruction-dataset needs --data-path PREFIX"),
    (["--data-path", "x", "--eod-mask-loss"], "--eod-mask-loss cannot be used with "
                                              "--is-instruction-dataset"),
    (["--data-path", "x", "--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--micro-batch-size", "1"], r"--micro-batch-size 1 x --seq-length 9 tokens over "
                                  r"--tensor-model-parallel-size 2"),
])
def test_flags_that_cannot_work(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(FLAGS + flags, world_size=2)


def test_a_shard_rewritten_in_place_gets_fresh_indices(tmp_path):
    """As pretraining data's (training/test_data.py): an unweighted blend (one epoch of each
    dataset, megatron-core's cached blend indices sized by their documents), one rewritten in
    place with fewer conversations: the old indices would point past its end. The reference:
    the same shards built into an empty cache."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write(a, [[_conversation(1 + d, 4, 1)] for d in range(30)])
    _write(b, [[_conversation(200 + d, 4, 1)] for d in range(10)])
    cache = ["--split", "100,0,0", "--data-cache-path", str(tmp_path / "cache")]
    old = _datasets([a, b], [20, 0, 0], *cache)[1][0]
    _write(a, [[_conversation(100 + d, 4, 1)] for d in range(12)])
    new = _datasets([a, b], [20, 0, 0], *cache)[1][0]
    fresh = _datasets([a, b], [20, 0, 0], "--split", "100,0,0", "--data-cache-path",
                      str(tmp_path / "empty"))[1][0]
    assert len(old) == len(new) == len(fresh) == 20
    for i in range(len(fresh)):
        assert new[i]["tokens"].tolist() == fresh[i]["tokens"].tolist(), i
    assert len(list((tmp_path / "cache").glob("indices-*"))) == 2  # one per set of shard files
