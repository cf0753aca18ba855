"""What megatron-core's IndexedDataset reads from a `.bin/.idx` pair, to check metadata against."""

import os

import numpy as np

from megatron_ext.data.shard_meta import read_meta


def megatron_core_view(prefix: str) -> dict:
    """The ShardMeta count fields as megatron-core's reader sees the pair."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    values = np.concatenate([dataset[i] for i in range(len(dataset))])
    return dict(num_documents=len(dataset.document_indices) - 1,
                num_tokens=int(dataset.sequence_lengths.sum()),
                max_id=int(values.max()) if values.size else -1,
                bin_bytes=os.path.getsize(prefix + ".bin"),
                idx_bytes=os.path.getsize(prefix + ".idx"))


def assert_meta_matches(prefix: str):
    """The pair's metadata, after checking its counts against megatron-core's reading."""
    meta = read_meta(prefix)
    assert meta is not None, f"no {prefix}.meta.json"
    view = megatron_core_view(prefix)
    assert {name: getattr(meta, name) for name in view} == view
    return meta
