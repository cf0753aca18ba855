"""Training samples from instruction shards (``preprocess_data.py --handler-name ...``).

``--is-instruction-dataset --data-path PREFIX`` reads ``PREFIX_input_ids_document`` and
``PREFIX_loss_mask_document`` with megatron-core's ``IndexedDataset``. One document is one
sample: the conversations of a packed sample, or one conversation. A sample of
``seq_length + 1`` tokens (longer ones truncated, shorter ones padded; a packed sample has
exactly that many) becomes, as in Megatron's GPTDataset:

- ``tokens`` = row[:-1], ``labels`` = row[1:], ``loss_mask`` = mask[1:] (the stored mask,
  shifted with the labels: 1 where the label is an assistant token or its end token);
- ``position_ids``: restarting at 0 at every conversation (and at the padding);
- ``seq_lengths`` [seq_length] int32: the lengths of the row's segments (each conversation, then
  the padding as a segment of its own) over the ``seq_length`` input positions, zero-filled.
  ``pretrain_gpt.get_batch`` turns them into ``PackedSeqParams`` (variable-length attention):
  a conversation attends only to itself, exactly as if it were trained alone;
- ``task_ids`` [seq_length] int64: the task of each label (its conversation's; an index into
  ``task_names(config)``, the tasks of all blended datasets), for the multi-task loss
  (``megatron_ext.training.multitask``);
- ``sample_ids`` [seq_length] int64: the index of each label's conversation in the row (the
  padding's segment included), for the sample-level loss modes.

A conversation's last input position predicts the next conversation's first token; that label
is always masked (a conversation starts with an untrained prompt), so a packed sample trains
exactly what its conversations would train one by one. Samples are drawn by megatron-core's
``BlendedMegatronDatasetBuilder`` (``--split`` over documents, weighted ``--data-path`` blends),
shuffled per epoch with ``--seed``.
"""

import logging
import math
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset

from megatron_ext.config import Config, ConfigError
from megatron_ext.data.instruct.pipeline import output_prefixes
from megatron_ext.data.instruct.tasks import (dataset_task_names, read_tasks, task_ids_prefix,
                                              tasks_path)
from megatron_ext.config.blend import resolve
from megatron_ext.training.shard_scan import index_cache_path

logger = logging.getLogger("megatron_ext")


def shard_prefixes(prefix: str) -> List[str]:
    """The .bin/.idx pairs of the instruction dataset ``prefix``: token ids, loss mask, and the
    task ids where its tasks file says they were written."""
    shards = list(output_prefixes(prefix))
    if os.path.exists(tasks_path(prefix)):  # written last: its task-id shard must be there
        shards.append(task_ids_prefix(prefix))
    return shards


def check_prefix(prefix: str) -> None:
    """ConfigError naming --data-path unless both shards of ``prefix`` exist."""
    shards = shard_prefixes(prefix)
    missing = [p + suffix for p in shards for suffix in (".bin", ".idx")
               if not os.path.isfile(p + suffix)]
    if not missing:
        return
    hint = "; write them with preprocess_data.py --handler-name ... --output-prefix PREFIX"
    if all(os.path.isfile(prefix + suffix) for suffix in (".bin", ".idx")):
        hint = (f"; {prefix} is pretraining data (one Megatron text dataset, no loss mask): "
                f"drop --is-instruction-dataset to pretrain on it, or write instruction shards "
                f"with preprocess_data.py --handler-name ... --output-prefix PREFIX")
    for key in ("_input_ids_document", "_loss_mask_document"):
        if prefix.endswith(key):
            hint = f"; give the prefix without {key}: --data-path {prefix[:-len(key)]}"
    raise ConfigError(f"--data-path {prefix} (--is-instruction-dataset): "
                      f"{', '.join(missing)} missing{hint}")


class InstructionShards:
    """The low-level dataset: token ids, loss mask and (when written) task ids, checked to
    describe the same documents; ``task_names`` are the run's tasks (``task_names``).
    ``build_sft_datasets`` has checked that the shards exist (``check_prefix``). ``mmap``:
    False (``--no-mmap-bin-files``) reads the .bin files with file reads, as for pretraining."""

    def __init__(self, prefix: str, task_names: List[str], mmap: bool = True):
        ids_prefix, mask_prefix = output_prefixes(prefix)
        self.prefix = prefix
        self.ids = IndexedDataset(ids_prefix, mmap=mmap)
        self.mask = IndexedDataset(mask_prefix, mmap=mmap)
        names = read_tasks(prefix)
        # This dataset's task ids -> the run's (several datasets share a name's task; a task
        # without conversations, e.g. the padding's unnamed one, is never trained on).
        self.task_map = np.array([0 if n is None else task_names.index(n)
                                  for n in dataset_task_names(prefix, names)], np.int64)
        self.tasks = IndexedDataset(task_ids_prefix(prefix), mmap=mmap) if names is not None else None
        for other in (self.mask, self.tasks):
            if other is not None and (
                    not np.array_equal(self.ids.sequence_lengths, other.sequence_lengths)
                    or not np.array_equal(self.ids.document_indices, other.document_indices)):
                raise ValueError(f"--data-path {prefix}: {ids_prefix} and {other.path_prefix} "
                                 "describe different sequences or documents; write them "
                                 "together (preprocess_data.py --handler-name ...)")
        doc_index = np.asarray(self.ids.document_indices, np.int64)
        lengths = np.asarray(self.ids.sequence_lengths, np.int64)
        ends = np.concatenate([[0], np.cumsum(lengths)])
        self.document_lengths = ends[doc_index[1:]] - ends[doc_index[:-1]]
        self.sequences_per_document = np.diff(doc_index)
        # --pack writes several sequences (conversations, padding) per document.
        self.packed = bool(self.sequences_per_document.size
                           and self.sequences_per_document.max() > 1)

    def __len__(self) -> int:
        return self.document_lengths.size

    def document(self, index: int):
        """(ids int64, mask, run task ids int64, sequence lengths) of document ``index``."""
        first = int(self.ids.document_indices[index])
        last = int(self.ids.document_indices[index + 1])
        ids = np.concatenate(self.ids[first:last]).astype(np.int64)
        mask = np.concatenate(self.mask[first:last])
        if self.tasks is None:
            tasks = np.full(ids.size, self.task_map[0], np.int64)
        else:
            tasks = self.task_map[np.concatenate(self.tasks[first:last]).astype(np.int64)]
        return ids, mask, tasks, [int(n) for n in self.ids.sequence_lengths[first:last]]


@dataclass
class SFTDatasetConfig(BlendedMegatronDatasetConfig):
    pad: int = 0  # token id of the padding (never trained, never attended to)
    task_names: tuple = ()  # the run's tasks (task_names)
    shuffle: bool = True  # False: --no-shuffle, every epoch in file order


class SFTDataset(MegatronDataset):
    """One split of one instruction dataset: ``num_samples`` samples, whole epochs of its
    documents, each epoch in its own seeded random order."""

    def __init__(self, dataset: InstructionShards, dataset_path: Optional[str],
                 indices: np.ndarray, num_samples: Optional[int], index_split, config):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.seq_length = config.sequence_length
        row = self.seq_length + 1
        if dataset.packed and (dataset.document_lengths != row).any():
            sizes = sorted(set(dataset.document_lengths.tolist()))[:3]
            raise ConfigError(
                f"--data-path {dataset.prefix} holds samples packed to {sizes[0]} tokens "
                f"(preprocess_data.py --pack --seq-length {sizes[0] - 1}), but --seq-length is "
                f"{self.seq_length}: pack with the training --seq-length")
        indices = np.asarray(indices if indices is not None else np.arange(len(dataset)), np.int64)
        if indices.size == 0:
            if num_samples:
                raise ConfigError(
                    f"--data-path {dataset.prefix}: the {index_split.name} split has no samples "
                    f"({len(dataset)} in all, --split {config.split}) but {num_samples} are "
                    "needed; change --split (or --eval-iters 0)")
            self.sample_index = indices
            return
        epochs = max(1, math.ceil((num_samples or 0) / indices.size))
        rng = np.random.RandomState(config.random_seed)
        self.sample_index = np.concatenate([rng.permutation(indices) if config.shuffle
                                            else indices for _ in range(epochs)])
        overlong = int((dataset.document_lengths[indices] > row).sum())
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if overlong and rank0:
            logger.warning(f"{dataset.prefix} ({index_split.name}): {overlong} of {indices.size} "
                           f"conversations exceed --seq-length + 1 = {row} tokens and are "
                           "truncated (preprocess with --seq-length to drop or count them)")

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: InstructionShards) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config) -> InstructionShards:
        return InstructionShards(dataset_path, list(config.task_names), config.mmap_bin_files)

    def __len__(self) -> int:
        return self.sample_index.size

    def __getitem__(self, idx: int) -> dict:
        ids, mask, tasks, segments = self.dataset.document(int(self.sample_index[idx]))
        return build_sample(ids, mask, segments, self.seq_length, self.config.pad, tasks)


def build_sample(ids: np.ndarray, mask: np.ndarray, segments: List[int], seq_length: int,
                 pad: int, tasks: Optional[np.ndarray] = None) -> dict:
    """One training sample from a row of conversations (see the module docstring); ``tasks``:
    each token's task (None: all task 0)."""
    row = seq_length + 1
    if tasks is None:
        tasks = np.zeros(ids.size, np.int64)
    if ids.size > row:  # an unpacked conversation longer than the sample: truncate
        ids, mask, tasks = ids[:row], mask[:row], tasks[:row]
        ends = np.minimum(np.cumsum(segments), row)
        segments = [int(n) for n in np.diff(np.concatenate([[0], ends])) if n > 0]
    elif ids.size < row:  # pad; the padding is a segment of its own
        padding = row - ids.size
        ids = np.concatenate([ids, np.full(padding, pad, np.int64)])
        mask = np.concatenate([mask, np.zeros(padding, mask.dtype)])
        tasks = np.concatenate([tasks, np.zeros(padding, tasks.dtype)])
        segments = list(segments) + [padding]
    segments = [n for n in segments if n > 0]
    # Each label's conversation (segment of the row), for sample-level loss modes.
    sample_ids = np.repeat(np.arange(len(segments), dtype=np.int64), segments)[1:]
    # The inputs are the first seq_length tokens: the last segment loses its last token.
    segments[-1] -= 1
    if segments[-1] == 0:
        segments.pop()
    seq_lengths = np.zeros(seq_length, np.int32)
    seq_lengths[:len(segments)] = segments
    position_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in segments])
    return {
        "tokens": torch.from_numpy(ids[:-1].copy()),
        "labels": torch.from_numpy(ids[1:].copy()),
        "loss_mask": torch.from_numpy(mask[1:].astype(np.float32)),
        "position_ids": torch.from_numpy(position_ids),
        "seq_lengths": torch.from_numpy(seq_lengths),
        "task_ids": torch.from_numpy(tasks[1:].astype(np.int64)),
        "sample_ids": torch.from_numpy(sample_ids),
    }


def task_names(config: Config) -> List[str]:
    """The run's tasks: those of every ``--data-path`` dataset in order, each name once (a
    dataset's untagged conversations are the task named after the dataset)."""
    names: List[str] = []
    for prefix in resolve(config.data).blend[0]:
        try:
            found = read_tasks(prefix)
        except ValueError as error:
            raise ConfigError(f"--data-path {prefix}: {error}") from None
        for name in dataset_task_names(prefix, found):
            if name is not None and name not in names:
                names.append(name)
    return names


def build_sft_datasets(config: Config, pad: int, split_sizes: List[int], split_matrix):
    """(train, valid, test) instruction datasets for ``--is-instruction-dataset`` (None where
    the split is empty); ``split_matrix`` as in ``data.build_datasets``; the index caches lie
    in the directory of these shard files, as pretraining data's."""
    d = config.data
    prefixes, weights = resolve(d).blend  # validate: no per-split instruction datasets
    # Here, not in InstructionShards: every prefix is checked on every rank before the builder
    # starts building (and synchronising ranks).
    for prefix in prefixes:
        check_prefix(prefix)
    cache = d.data_cache_path and index_cache_path(
        d.data_cache_path, [shard for prefix in prefixes for shard in shard_prefixes(prefix)])
    dataset_config = SFTDatasetConfig(
        random_seed=config.training.seed,
        sequence_length=config.model.seq_length,
        blend=(prefixes, weights),
        split=d.split,
        path_to_cache=cache,
        mid_level_dataset_surplus=0.005,
        mmap_bin_files=d.mmap_bin_files,
        pad=pad,
        task_names=tuple(task_names(config)),
        shuffle=not config.mindspeed.no_shuffle,
    )
    if split_matrix is not None:
        dataset_config.split_matrix = split_matrix
    return BlendedMegatronDatasetBuilder(
        SFTDataset, split_sizes, lambda: True, dataset_config
    ).build()
