"""Training data over real shards: blend weights, data-parallel sharding, train/valid split and
missing files, through ``build_datasets`` with a ``Config`` from the command line (as the Trainer
builds them).

Shards are written with ``IndexedDatasetWriter``; their tokens say where a sample came from:
dataset A uses ids 1..99, dataset B ids 100..199, and every document ends with EOD 255
(``--tokenizer-type NullTokenizer --vocab-size 255``: EOD = 255, vocabulary 256). In the split
shard, document k consists of the id k + 1 only.
"""

import collections
import os

import numpy as np
import pytest

from megatron_ext.config import ConfigError, parse_args
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.training.data import PretrainingSampler, build_datasets, data_iterator

pytestmark = pytest.mark.usefixtures("tmp_cwd", "one_rank_group")  # dataset caches there

EOD, VOCAB = 255, 256  # NullTokenizer(255): eod = 255, vocab_size = 256
SEQ = 16
FLAGS = (f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length {SEQ} "
         "--micro-batch-size 2 --tokenizer-type NullTokenizer --vocab-size 255").split()


def _write(prefix, documents):
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in documents:
            writer.add_document(list(doc) + [EOD])
    return prefix


def _random_docs(rng, low, high, count):
    return [rng.integers(low, high + 1, int(rng.integers(5, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    a = _write(str(directory / "A_text_document"), _random_docs(rng, 1, 99, 200))
    b = _write(str(directory / "B_text_document"), _random_docs(rng, 100, 199, 200))
    # Document k is (k + 1) repeated: a sample's tokens name the documents it was cut from.
    docs = _write(str(directory / "docs_text_document"),
                  [[k + 1] * int(rng.integers(3, 30)) for k in range(90)])
    return {"A": a, "B": b, "docs": docs}


def _datasets(data_path, split, sizes, world_size=1, extra=()):
    config = parse_args(FLAGS + ["--data-path", *data_path, "--split", split, *extra],
                        world_size=world_size)
    return build_datasets(config, EOD, VOCAB, sizes)


def _source(sample) -> str:
    """'A' or 'B' from the token ids alone; a sample never mixes datasets."""
    ids = np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]])
    ids = ids[ids != EOD]
    assert ids.size, "a sample of EODs only"
    in_a = (ids >= 1) & (ids <= 99)
    in_b = (ids >= 100) & (ids <= 199)
    assert in_a.all() or in_b.all(), f"sample mixes or leaves the datasets: {ids}"
    return "A" if in_a.all() else "B"


# Tolerance. megatron-core's BlendedDataset does not draw datasets at random: sample i goes to
# the dataset furthest behind its target weight x (i + 1) (build_blending_indices), so after any
# n samples each of two datasets is within 1 sample of weight x n, and any window of samples
# (a difference of two such prefixes) within 2. We allow 1% of all 2000 samples (20) and 3 in
# each window of 100 (one global batch): loose against that bound, yet 20x (resp. 6x) tighter
# than the gap to a blend that ignored the weights (50/50), and a blend with the weights
# swapped misses by 0.4.
N_SAMPLES, WINDOW = 2000, 100


@pytest.mark.parametrize("weights, fraction_a", [
    (("0.3", "0.7"), 0.3), (("0.7", "0.3"), 0.7), (("1", "3"), 0.25),  # unnormalized weights
])
def test_blend_weights_are_honoured(shards, weights, fraction_a):
    train, valid, test = _datasets([weights[0], shards["A"], weights[1], shards["B"]],
                                   "100,0,0", [N_SAMPLES, 0, 0])
    assert valid is None and test is None
    assert len(train) == N_SAMPLES
    sources = [_source(train[i]) for i in range(N_SAMPLES)]
    # The content agrees with the dataset id megatron-core reports.
    assert all((s == "B") == bool(train[i]["dataset_id"]) for i, s in enumerate(sources[:200]))
    count_a = sources.count("A")
    assert abs(count_a - fraction_a * N_SAMPLES) <= 0.01 * N_SAMPLES, count_a
    for start in range(0, N_SAMPLES, WINDOW):
        window_a = sources[start:start + WINDOW].count("A")
        assert abs(window_a - fraction_a * WINDOW) <= 3, (start, window_a)


def _rows(batches):
    """Samples as hashable rows (tokens and the last label: all SEQ + 1 ids)."""
    rows = []
    for batch in batches:
        full = np.concatenate([batch["tokens"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)
        rows += [tuple(row) for row in full.tolist()]
    return rows


@pytest.mark.parametrize("consumed_samples", [0, 24])  # from the start, and resumed mid-run
def test_data_parallel_ranks_split_the_global_batch(shards, consumed_samples):
    micro, global_batch, steps = 2, 8, 4
    train, _, _ = _datasets(["0.3", shards["A"], "0.7", shards["B"]], "100,0,0",
                            [(steps + 3) * global_batch, 0, 0])

    def global_batches(dp_rank, dp_size):
        it = data_iterator(train, consumed_samples, micro, dp_rank, dp_size)
        per_step = global_batch // (micro * dp_size)  # micro-batches per step on this rank
        return [_rows(next(it) for _ in range(per_step)) for _ in range(steps)]

    reference = global_batches(0, 1)  # one DP rank reads the whole global batch
    rank0, rank1 = global_batches(0, 2), global_batches(1, 2)
    for step in range(steps):
        assert len(rank0[step]) == len(rank1[step]) == global_batch // 2
        assert not set(rank0[step]) & set(rank1[step]), f"step {step}: ranks share a sample"
        assert sorted(rank0[step] + rank1[step]) == sorted(reference[step]), step
        # The reference reads consecutive samples: step k is [consumed + 8k, consumed + 8k + 8).
        first = consumed_samples + step * global_batch
        assert reference[step] == _rows(
            [{k: v[None] for k, v in train[i].items() if k in ("tokens", "labels")}
             for i in range(first, first + global_batch)])
    # Consecutive steps do not repeat samples.
    assert len(set(sum(reference, []))) == steps * global_batch


def test_pretraining_sampler_indices():
    """Independent of any dataset: DP rank r takes slice r of each micro x dp block."""
    micro, dp = 2, 3
    samplers = [PretrainingSampler(30, 6, micro, rank, dp) for rank in range(dp)]
    batches = [list(s) for s in samplers]
    assert all(len(b) == len(s) == 4 for b, s in zip(batches, samplers))  # (30 - 6) // 6
    assert batches[0] == [[6, 7], [12, 13], [18, 19], [24, 25]]
    assert batches[1] == [[8, 9], [14, 15], [20, 21], [26, 27]]
    assert batches[2] == [[10, 11], [16, 17], [22, 23], [28, 29]]
    # A trailing partial block is dropped on every rank alike.
    assert [list(PretrainingSampler(11, 0, 2, r, 2)) for r in range(2)] == [
        [[0, 1], [4, 5]], [[2, 3], [6, 7]]]


def _documents(dataset):
    seen = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        ids = np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()])
        seen.update(int(t) - 1 for t in ids if t != EOD)
    return seen


def test_split_gives_disjoint_train_and_valid_documents(shards):
    # 90 documents, 80/20: train takes documents [0, 72), valid [72, 90); the sample counts ask
    # for several epochs of each split so that every document shows up.
    train, valid, test = _datasets([shards["docs"]], "80,20,0", [400, 200, 0])
    assert test is None
    train_docs, valid_docs = _documents(train), _documents(valid)
    assert not train_docs & valid_docs
    assert train_docs == set(range(72))
    assert valid_docs == set(range(72, 90))


def test_missing_prefix_names_data_path_and_the_file(shards, tmp_path):
    missing = str(tmp_path / "nowhere_text_document")
    with pytest.raises(ConfigError) as info:
        _datasets([missing], "100,0,0", [8, 0, 0])
    assert "--data-path" in str(info.value) and missing + ".bin" in str(info.value)
    # In a blend, the missing one is named (not the present one).
    with pytest.raises(ConfigError) as info:
        _datasets(["0.5", shards["A"], "0.5", missing], "100,0,0", [8, 0, 0])
    assert missing + ".bin" in str(info.value) and shards["A"] not in str(info.value)


def test_missing_index_file_is_named(shards, tmp_path):
    prefix = _write(str(tmp_path / "lonely_text_document"), [[1, 2, 3]])
    os.remove(prefix + ".idx")
    with pytest.raises(ConfigError) as info:
        _datasets([prefix], "100,0,0", [8, 0, 0])
    assert "--data-path" in str(info.value) and prefix + ".idx" in str(info.value)


@pytest.mark.parametrize("weight", ["0", "-0.5"])
def test_non_positive_blend_weight_names_data_path(shards, weight):
    with pytest.raises(ConfigError, match="--data-path"):
        _datasets([weight, shards["A"], "1", shards["B"]], "100,0,0", [8, 0, 0])


def test_dataset_counts_by_source_sum_to_size(shards):
    """Sanity of the fixture itself: the two shards are told apart by ids alone."""
    train, _, _ = _datasets(["0.5", shards["A"], "0.5", shards["B"]], "100,0,0", [100, 0, 0])
    counts = collections.Counter(_source(train[i]) for i in range(len(train)))
    assert counts["A"] + counts["B"] == 100 and counts["A"] == 50


@pytest.mark.parametrize("flag", ["--reset-position-ids", "--reset-attention-mask"])
def test_either_document_flag_restarts_positions_after_each_eod(shards, flag):
    """Position ids restart after every EOD with either flag (both mean isolated documents):
    checked against positions counted by hand from the sample's own EOD tokens."""
    train, _, _ = _datasets([shards["A"]], "100,0,0", [8, 0, 0], extra=[flag])
    assert any(EOD in train[i]["tokens"].tolist()[:-1] for i in range(len(train)))
    for index in range(len(train)):
        sample = train[index]
        tokens = sample["tokens"].tolist()
        expected, position = [], 0
        for token in tokens:
            expected.append(position)
            position = 0 if token == EOD else position + 1
        assert sample["position_ids"].tolist() == expected


@pytest.mark.parametrize("save", [False, True])
def test_dataset_caches_go_beside_the_run_never_beside_the_shards(tmp_path, tmp_cwd, save):
    # A blend of fresh shards (so the cache is built, not hit): megatron-core's own default
    # would write PREFIX/cache/GPTDataset_indices/ beside each prefix.
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    rng = np.random.default_rng(1)
    a = _write(str(shard_dir / "A_text_document"), _random_docs(rng, 1, 99, 50))
    b = _write(str(shard_dir / "B_text_document"), _random_docs(rng, 100, 199, 50))
    before = sorted(os.listdir(shard_dir))
    extra = ["--save", str(tmp_path / "ckpt")] if save else []
    train, valid, _ = _datasets(["0.5", a, "0.5", b], "90,10,0", [40, 8, 0], extra=extra)
    assert train is not None and valid is not None
    assert sorted(os.listdir(shard_dir)) == before
    cache = (tmp_path / "ckpt" if save else tmp_cwd / ".cache") / "data_cache"
    written = sorted(path.name for path in cache.glob("indices-*/*"))
    # GPTDataset indices of both prefixes and the BlendedDataset indices, train and valid.
    assert any("GPTDataset-train" in name for name in written), written
    assert any("BlendedDataset-train" in name for name in written), written
    assert any("GPTDataset-valid" in name for name in written), written


def test_a_shard_rewritten_in_place_gets_fresh_indices(tmp_path):
    """Same path, other documents (fewer): the cached indices of the old shard would point past
    its end. The reference: the same shard built into an empty cache."""
    rng = np.random.default_rng(2)
    prefix = str(tmp_path / "A_text_document")
    _write(prefix, _random_docs(rng, 1, 99, 120))
    cache = ["--data-cache-path", str(tmp_path / "cache")]
    old, = _datasets([prefix], "100,0,0", [200, 0, 0], extra=cache)[:1]
    _write(prefix, _random_docs(rng, 1, 99, 40))
    new, = _datasets([prefix], "100,0,0", [200, 0, 0], extra=cache)[:1]
    fresh, = _datasets([prefix], "100,0,0", [200, 0, 0],
                       extra=["--data-cache-path", str(tmp_path / "empty")])[:1]
    assert len(new) == len(fresh) != len(old)
    for i in range(len(fresh)):
        assert new[i]["tokens"].tolist() == fresh[i]["tokens"].tolist(), i


def test_explicit_or_mock_data_cache_path(tmp_path):
    config = parse_args(FLAGS + ["--data-path", "x", "--data-cache-path", str(tmp_path)])
    assert config.data.data_cache_path == str(tmp_path)
    # Mock data reads no shard: megatron-core caches nothing for it.
    assert parse_args(FLAGS + ["--mock-data"]).data.data_cache_path is None
