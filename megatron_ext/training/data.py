"""Training data: megatron-core's GPTDataset over our shards, sharded across data-parallel ranks.

Every rank (all TP and PP ranks included) reads the micro-batches of its data-parallel rank
itself instead of receiving them by broadcast from TP rank 0: the datasets are deterministic
(seeded, cached indices), so the ranks of a TP group read identical samples, and every pipeline
stage has the token ids it needs to derive document boundaries for variable-length attention.

Index caches (the shuffled document/sample indices) are written once: megatron-core builds
them on global rank 0 only, and the other ranks load the files after a barrier. That is right
when the cache is on a filesystem every node sees (`--data-cache-path` on shared storage, or
the default beside the data). With a node-local cache the other nodes would find no files and
fail inside megatron-core, so the build is split in two (`build_datasets`): rank 0 first, then
every rank checks that it sees rank 0's files, and all ranks stop alike, naming the flag, if
one does not; only then do the other ranks load. On one node nothing changes.
"""

import os

from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_ext import platform
from megatron_ext.config import Config, ConfigError
from megatron_ext.config.blend import check_prefixes, resolve
from megatron_ext.training.shard_scan import index_cache_path
from megatron_ext.training.sft_dataset import build_sft_datasets


@dataclass
class DatasetTokenizer:
    """What GPTDataset needs of a tokenizer. ``pad=-1`` never matches a real id, so no real
    token (an EOD that doubles as pad in many HF tokenizers, say) loses its loss."""

    eod: int
    vocab_size: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> dict:
        # Part of the dataset description that names the cached index files.
        return {"eod": self.eod, "vocab_size": self.vocab_size, "pad": self.pad}


def build_datasets(config: Config, eod: int, vocab_size: int, split_sizes: List[int],
                   split_matrix=None):
    """(train, valid, test) GPTDatasets (None where the split is empty; valid a list of one per
    dataset with ``--multiple-validation-sets``); instruction datasets
    (``--is-instruction-dataset``) instead, padded with ``eod`` (masked, never attended to).
    ``split_matrix`` (from ``shard_checks.check_data``) replaces the one of ``--split``, less
    the splits that the run does not read."""
    d = config.data
    if d.is_instruction_dataset:
        return build_sft_datasets(config, eod, split_sizes, split_matrix)
    blends = resolve(d)  # empty with --mock-data
    check_prefixes(blends.prefixes())
    per_split = blends.per_split
    if per_split is not None and split_matrix is not None:
        # Whole datasets per split; those of a split the run does not read are not built.
        per_split = [b if bounds is not None else None for b, bounds in zip(per_split, split_matrix)]
    cache = d.data_cache_path and index_cache_path(d.data_cache_path,
                                                    [p for p, _ in blends.prefixes()])
    dataset_config = GPTDatasetConfig(
        random_seed=config.training.seed,
        sequence_length=config.model.seq_length,
        blend=blends.blend,
        blend_per_split=per_split,
        split=None if per_split is not None else d.split,
        path_to_cache=cache,
        tokenizer=DatasetTokenizer(eod=eod, vocab_size=vocab_size),
        # Both flags isolate documents (Config.varlen); positions restart with either.
        reset_position_ids=config.varlen,
        # Document isolation is done by variable-length attention, never by a dense [s, s] mask.
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
        mmap_bin_files=d.mmap_bin_files,
        # One validation dataset per --valid-data-path prefix, each built as if it were the
        # only one (megatron-core's builder; the sizes stay those of --eval-iters).
        multiple_validation_sets=d.multiple_validation_sets,
        full_validation=False,
    )
    if split_matrix is not None and per_split is None:
        dataset_config.split_matrix = split_matrix
    dataset_cls = MockGPTDataset if d.mock_data else GPTDataset

    def build(on_rank):
        train, valid, test = BlendedMegatronDatasetBuilder(
            dataset_cls, split_sizes, on_rank, dataset_config).build()
        if d.multiple_validation_sets and valid is not None and not isinstance(valid, list):
            valid = [valid]  # the builder gives one prefix its dataset alone
        return [train, valid, test]

    if d.mock_data or not torch.distributed.is_initialized():
        return check_one_epoch(blends, build(lambda: True), split_sizes)
    build(lambda: torch.distributed.get_rank() == 0)  # writes the cache: rank 0, once
    cache_dirs = ([cache] if cache else
                  [os.path.join(prefix, "cache", "GPTDataset_indices")
                   for prefix, _ in blends.prefixes()])
    check_cache_visible(cache_dirs)
    return check_one_epoch(blends, build(lambda: True), split_sizes)  # loads rank 0's files


def check_one_epoch(blends, datasets, split_sizes: List[int]):
    """``datasets``, unless an unweighted blend (``A B``: megatron-core builds one epoch of
    each dataset) holds fewer training samples than the run draws: the loader would run dry
    mid-training. Every rank builds the same datasets, so every rank raises alike."""
    train, flags = datasets[0], blends.flags
    if hasattr(train, "datasets") and split_sizes[0] and len(train) < split_sizes[0]:
        flag = flags[0] if flags else "--data-path"
        raise ConfigError(
            f"{flag}: the unweighted blend of {len(train.datasets)} datasets holds "
            f"{len(train)} training samples (one epoch of each), the run draws "
            f"{split_sizes[0]} (--train-iters x --global-batch-size); give weights (0.5 A 0.5 "
            f"B: epochs repeat as needed) or train for fewer iterations")
    return datasets


def check_cache_visible(cache_dirs: List[str]) -> None:
    """Raise on every rank alike unless every rank finds, in its own cache directories, the
    index files rank 0 has in its."""
    names = [[(i, n) for i, c in enumerate(cache_dirs) if os.path.isdir(c)
              for n in sorted(os.listdir(c))]]
    torch.distributed.broadcast_object_list(names, src=0)
    missing = next((os.path.join(cache_dirs[i], n) for i, n in names[0]
                    if not os.path.exists(os.path.join(cache_dirs[i], n))), None)
    flag = torch.tensor([0 if missing else 1], device=platform.device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    if flag.item() == 0:
        where = (f"rank {torch.distributed.get_rank()} does not see {missing}" if missing else
                 "a rank on another node does not see them")
        raise RuntimeError(
            f"the dataset index cache written by rank 0 ({', '.join(cache_dirs)}) is not shared "
            f"by every node: {where}. megatron-core writes the indices on global rank 0 only; "
            "put --data-cache-path on a filesystem all nodes mount")


class PretrainingSampler:
    """Megatron-LM's sampler: consecutive global batches; DP rank r takes slice r of each
    ``micro_batch_size x dp`` block, so the global batch does not depend on the DP size."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.block = micro_batch_size * dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.block

    def __iter__(self) -> Iterator[List[int]]:
        offset = self.dp_rank * self.micro_batch_size
        for block_start in range(self.consumed_samples, self.total_samples - self.block + 1,
                                 self.block):
            start = block_start + offset
            yield list(range(start, start + self.micro_batch_size))


def data_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int, num_workers: int = 0) -> Optional[Iterator[dict]]:
    if dataset is None:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, pin_memory=False, num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Its own generator: creating the iterator would otherwise draw from the global torch
        # RNG and shift dropout after a resume (the samples themselves are seeded indices).
        generator=torch.Generator().manual_seed(0),
    )
    return iter(loader)


def cyclic_iterator(dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                    consumed_samples: int = 0, num_workers: int = 0):
    """Validation batches: from ``consumed_samples`` on (where a resumed run's evaluations
    stopped), restarting from the beginning when the split is exhausted."""
    block = micro_batch_size * dp_size
    per_pass = len(dataset) // block * block  # what one pass of the sampler yields
    if per_pass == 0:
        raise ValueError(f"the evaluation split has {len(dataset)} samples, fewer than "
                         f"--micro-batch-size x data-parallel size = {block}")
    start = consumed_samples % per_pass
    while True:
        yield from data_iterator(dataset, start, micro_batch_size, dp_rank, dp_size,
                                 num_workers)
        start = 0


def per_chunk(chunks: int, make_iterator):
    """The iterator ``make_iterator`` builds, or one per model chunk: megatron-core's
    interleaved schedule reads each micro-batch once per chunk (as Megatron-LM's iterators)."""
    return make_iterator() if chunks == 1 else [make_iterator() for _ in range(chunks)]
