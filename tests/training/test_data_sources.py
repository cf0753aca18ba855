"""Megatron-LM's dataset flags: unweighted blends (``--data-path A B``), datasets per split
(``--train/--valid/--test-data-path``) and the lists read from files (``--data-args-path``,
``--per-split-data-args-path``), checked against megatron-core itself: its own parser of the
lists (``get_blend_from_list``) and its builder give the samples our run gives, sample for
sample; and against single-dataset runs, of which an unweighted blend is one epoch each.
"""

import collections
import json
import logging

import numpy as np
import pytest
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import get_blend_from_list

from megatron_ext.config import ConfigError, parse_args
from megatron_ext.tokenizer import build_tokenizer
from megatron_ext.training.data import DatasetTokenizer, build_datasets
from megatron_ext.training.shard_checks import ShardError, check_data
from tests.training import test_data
from tests.training.test_data import EOD, FLAGS, SEQ, VOCAB, _documents, _write

pytestmark = pytest.mark.usefixtures("tmp_cwd", "one_rank_group")  # dataset caches there

shards = test_data.shards  # the fixture: A ids 1..99, B ids 100..199, docs k = id k + 1
SIZES = [200, 40, 0]  # samples of train, valid, test asked for (as the Trainer asks)


def _ours(flags, sizes=SIZES):
    config = parse_args(FLAGS + ["--eval-iters", "1", *flags], world_size=1)
    return config, build_datasets(config, EOD, VOCAB, sizes,
                                  check_data(config, build_tokenizer("NullTokenizer", None, 255)))


def _megatron_core(config, sizes=SIZES, **blends):
    """megatron-core's datasets for the lists as megatron-core parses them."""
    dataset_config = GPTDatasetConfig(
        random_seed=config.training.seed, sequence_length=SEQ,
        path_to_cache=config.data.data_cache_path,
        tokenizer=DatasetTokenizer(eod=EOD, vocab_size=VOCAB), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mid_level_dataset_surplus=0.005, **blends)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, dataset_config).build()


def _rows(dataset):
    if dataset is None:
        return None
    return [tuple(np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]]).tolist())
            for s in (dataset[i] for i in range(len(dataset)))]


@pytest.mark.parametrize("names", [["A", "B"], ["A", "B", "docs"], ["0.3", "A", "0.7", "B"]])
def test_blend_equals_megatron_core(shards, names):
    """Unweighted (even and odd counts) and weighted lists: megatron-core's own reading of the
    list, built by its builder, gives our datasets sample for sample, train and valid."""
    data_path = [shards.get(n, n) for n in names]
    config, ours = _ours(["--data-path", *data_path, "--split", "90,10,0"])
    reference = _megatron_core(config, blend=get_blend_from_list(data_path), split="90,10,0")
    assert (get_blend_from_list(data_path)[1] is None) == ("0.3" not in names)
    assert ours[2] is None and reference[2] is None
    for mine, theirs in zip(ours[:2], reference[:2]):
        assert _rows(mine) == _rows(theirs)


def test_unweighted_blend_is_one_epoch_of_each_dataset(shards):
    """A B without weights: every sample of one epoch of A alone and of B alone, each once, so
    weighed by the datasets' sizes (an independent single-dataset reference)."""
    sizes = [None, 0, 0]  # one epoch
    _, (blend, _, _) = _ours(["--data-path", shards["A"], shards["B"], "--split", "100,0,0"],
                             sizes)
    alone = [_ours(["--data-path", shards[n], "--split", "100,0,0"], sizes)[1][0] for n in "AB"]
    assert len(blend) == len(alone[0]) + len(alone[1])
    assert collections.Counter(_rows(blend)) == collections.Counter(
        _rows(alone[0]) + _rows(alone[1]))


def test_unweighted_blend_shorter_than_the_run_is_refused(shards):
    with pytest.raises(ConfigError, match=r"--data-path: the unweighted blend of 2 datasets "
                                          r"holds \d+ training samples .* the run draws 100000"):
        _ours(["--data-path", shards["A"], shards["B"], "--split", "100,0,0"], [100000, 0, 0])


def test_datasets_per_split_equal_megatron_core(shards, tmp_path):
    """Each split's datasets used whole: the flags, the same lists in the JSON file, and
    megatron-core's blend_per_split of them give the same samples; validation reads every
    document of its shard and only those."""
    train, valid = [shards["A"], shards["B"]], ["1", shards["docs"]]
    config, ours = _ours(["--train-data-path", *train, "--valid-data-path", *valid])
    reference = _megatron_core(config, split=None, blend_per_split=[
        get_blend_from_list(train), get_blend_from_list(valid), None])
    path = tmp_path / "per_split.json"
    path.write_text(json.dumps({"train": " ".join(train), "valid": valid, "test": None}))
    _, from_file = _ours(["--per-split-data-args-path", str(path)])
    for i in range(3):
        assert _rows(ours[i]) == _rows(reference[i]) == _rows(from_file[i])
    assert ours[2] is None
    assert _documents(ours[1]) == set(range(90))  # the whole shard, not a --split part


def test_data_args_path_reads_the_data_path_list(shards, tmp_path):
    listed = ["0.4", shards["A"], "0.6", shards["B"]]
    path = tmp_path / "blend.txt"
    path.write_text("  ".join(listed[:2]) + "\n" + "\t".join(listed[2:]) + "\n")
    flags = ["--split", "90,10,0"]
    _, from_file = _ours(["--data-args-path", str(path), *flags])
    _, given = _ours(["--data-path", *listed, *flags])
    assert [_rows(d) for d in from_file] == [_rows(d) for d in given]


@pytest.mark.parametrize("flags, expected", [
    (["--train-data-path", "{A}", "--split", "90,10,0"], "--split 90,10,0 with --train-data-path"),
    (["--data-path", "{A}", "--train-data-path", "{B}"], "--data-path, --train-data-path: give "
     "one source of data"),
    (["--data-path", "{A}", "--data-args-path", "{file}"], "--data-path and --data-args-path"),
    (["--valid-data-path", "{B}"], "no training datasets; give --train-data-path"),
    (["--train-data-path"], "--train-data-path lists no datasets"),
    (["--train-data-path", "{A}", "--valid-data-path", "{A}x"], "--valid-data-path: {A}x.bin "
     "does not exist"),
    (["--per-split-data-args-path", "{file}"], "a JSON object with the keys train, valid and test"),
    (["--data-args-path", "{file}x"], "--data-args-path {file}x: cannot read it"),
    (["--train-data-path", "{A}", "--mock-data"], "give one source of data"),
])
def test_malformed_sources_name_the_flag(shards, tmp_path, flags, expected):
    path = tmp_path / "lists.json"
    path.write_text(json.dumps({"train": [shards["A"]], "valid": None}))  # no "test"
    names = dict(A=shards["A"], B=shards["B"], file=str(path))
    with pytest.raises(ConfigError) as info:
        _ours([f.format(**names) for f in flags])
    assert expected.format(**names) in str(info.value)


@pytest.mark.parametrize("value", [5, {"A": 1}])
def test_a_split_of_the_per_split_file_that_is_no_list_is_named(shards, tmp_path, value):
    path = tmp_path / "lists.json"
    path.write_text(json.dumps({"train": [shards["A"]], "valid": value, "test": None}))
    with pytest.raises(ConfigError, match=rf"--per-split-data-args-path {path}: valid is "
                                          rf".*; give a list of datasets"):
        _ours(["--per-split-data-args-path", str(path)])


def test_shard_checks_cover_every_split(tmp_path, shards):
    """The tokenizer checks reach a validation-only dataset: one written with ids beyond this
    run's vocabulary is refused naming --valid-data-path, before any dataset is built."""
    wide = _write(str(tmp_path / "wide_text_document"), [[300, 301, 302]] * 20)
    with pytest.raises(ShardError, match=rf"--valid-data-path {wide}: largest token id 302"):
        _ours(["--train-data-path", shards["A"], "--valid-data-path", wide])


@pytest.mark.parametrize("flag", ["--data-path", "--train-data-path"])
def test_unweighted_blend_with_a_dataset_shorter_than_a_sample_is_refused(tmp_path, shards,
                                                                           flag):
    """megatron-core weighs an unweighted blend by each dataset's samples in one epoch and
    asserts every weight > 0: a shard of fewer than --seq-length + 1 tokens is named first."""
    short = _write(str(tmp_path / "short_text_document"), [[1, 2, 3]] * 3)  # 12 tokens
    split = ["--split", "100,0,0"] if flag == "--data-path" else []
    with pytest.raises(ShardError, match=r"12 tokens, less than one sample \(17 tokens\) for "
                                         r"the unweighted blend"):
        _ours([flag, shards["A"], short, "--eval-iters", "0", *split], [8, 0, 0])
    _ours([flag, "1", shards["A"], "1", short, "--eval-iters", "0", *split], [8, 0, 0])


def test_a_per_split_dataset_shorter_than_a_sample_is_said(tmp_path, shards, caplog):
    """A --valid-data-path dataset of 12 tokens (< --seq-length 16 + 1): megatron-core fills
    each validation sample by repeating it, which is said as for a --split part that short."""
    short = _write(str(tmp_path / "short_text_document"), [[1, 2, 3]] * 3)  # 12 tokens
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        config, ours = _ours(["--train-data-path", shards["A"], "--valid-data-path", short])
    assert (f"--valid-data-path {short} holds 12 tokens (3 documents), less than one sample of "
            f"--seq-length {SEQ} + 1: each sample repeats them") in caplog.text, caplog.text
    reference = _megatron_core(config, split=None, blend_per_split=[([shards["A"]], None),
                                                                     ([short], None), None])
    assert _rows(ours[1]) == _rows(reference[1]) and len(_rows(ours[1])[0]) == SEQ + 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        _ours(["--train-data-path", shards["A"], "--valid-data-path", shards["B"]])
    assert "less than one sample" not in caplog.text, caplog.text


def test_data_path_without_split_is_cut_by_the_legacy_default_and_said(shards):
    """Megatron-LM warns and cuts 969,30,1; so here (the datasets per split take no --split)."""
    config = parse_args(FLAGS + ["--data-path", shards["A"]], world_size=1)
    assert config.data.split == "969,30,1"
    assert "--data-path without --split: cut by the legacy default 969,30,1" in config.notices[0]
    for flags in (["--data-path", shards["A"], "--split", "98,2,0"],
                  ["--train-data-path", shards["A"]]):
        assert not parse_args(FLAGS + flags, world_size=1).notices
