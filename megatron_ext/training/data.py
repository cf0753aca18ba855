"""Training data: megatron-core's GPTDataset over our shards, sharded across data-parallel ranks.

Every rank (all TP and PP ranks included) reads the micro-batches of its data-parallel rank
itself instead of receiving them by broadcast from TP rank 0: the datasets are deterministic
(seeded, cached indices), so the ranks of a TP group read identical samples, and every pipeline
stage has the token ids it needs to derive document boundaries for variable-length attention.
"""

from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_ext.config import Config
from megatron_ext.training.blend import check_prefixes, parse_blend
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


def build_datasets(config: Config, eod: int, vocab_size: int, split_sizes: List[int]):
    """(train, valid, test) GPTDatasets (None where the split is empty); instruction datasets
    (``--is-instruction-dataset``) instead, padded with ``eod`` (masked, never attended to)."""
    d = config.data
    if d.is_instruction_dataset:
        return build_sft_datasets(config, eod, split_sizes)
    prefixes = None
    if not d.mock_data:
        prefixes, weights = parse_blend(d.data_path)
        check_prefixes(prefixes)
    dataset_config = GPTDatasetConfig(
        random_seed=config.training.seed,
        sequence_length=config.model.seq_length,
        blend=None if d.mock_data else (prefixes, weights),
        split=d.split,
        path_to_cache=d.data_cache_path,
        tokenizer=DatasetTokenizer(eod=eod, vocab_size=vocab_size),
        # Both flags isolate documents (Config.varlen); positions restart with either.
        reset_position_ids=config.varlen,
        # Document isolation is done by variable-length attention, never by a dense [s, s] mask.
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
        mmap_bin_files=d.mmap_bin_files,
    )
    dataset_cls = MockGPTDataset if d.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_cls, split_sizes, lambda: True, dataset_config
    ).build()


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
                    num_workers: int = 0):
    """Validation batches: restart from the beginning when the split is exhausted."""
    while True:
        yield from data_iterator(dataset, 0, micro_batch_size, dp_rank, dp_size, num_workers)
