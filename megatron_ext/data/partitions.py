"""Megatron-LM's `--partitions`: which document goes where, and the final order.

Megatron-LM splits the input lines round robin into N partition files, tokenizes each into its
own dataset and concatenates those in partition order. Here the documents are routed to N
temporary datasets as they come (the workers serve all partitions) and concatenated the same
way, so the output holds the same documents in the same order under the same names.
"""

import os
import tempfile
from contextlib import ExitStack
from typing import List

import numpy as np

from megatron_ext.data.indexed import IndexedDatasetWriter


def select_documents(arrays: tuple, documents: np.ndarray) -> tuple:
    """The (tokens, lengths, per_document) of the documents where `documents` is True."""
    tokens, lengths, per_document = arrays
    if per_document is None:
        per_document = np.ones(len(lengths), np.int64)
    sequences = np.repeat(documents, per_document)
    return (tokens[np.repeat(sequences, lengths)], lengths[sequences],
            per_document[documents])


class Outputs:
    """The writers of one run. With `partitions` N > 1, Megatron-LM's round robin: document i
    goes to partition i mod N, and the final dataset is partition 0, then 1, ..., N-1 (Megatron's
    order of documents); the partitions are temporary datasets beside the output, concatenated
    at the end and removed whatever happens. `final` holds the writers of the outputs."""

    def __init__(self, stack: ExitStack, prefixes: List[str], dtype, partitions: int, log):
        self.prefixes, self.dtype, self.partitions, self._log = prefixes, dtype, partitions, log
        self.documents = 0
        if partitions == 1:
            self.final = [stack.enter_context(IndexedDatasetWriter(p, dtype, log))
                          for p in prefixes]
            self.writers = [[writer] for writer in self.final]
            return
        self._outer = stack
        directory = os.path.dirname(prefixes[0]) or "."
        self._parts = stack.enter_context(tempfile.TemporaryDirectory(
            dir=directory, prefix=f".{os.path.basename(prefixes[0])}.partitions-"))
        self._stack = stack.enter_context(ExitStack())
        self.writers = [[self._stack.enter_context(IndexedDatasetWriter(
            self._part(k, p), dtype)) for p in range(partitions)] for k in range(len(prefixes))]

    def _part(self, key: int, partition: int) -> str:
        return os.path.join(self._parts, f"{key}_{partition}")

    def add(self, key: int, arrays: tuple) -> None:
        tokens, lengths, per_document = arrays
        count = len(lengths) if per_document is None else len(per_document)
        if self.partitions == 1:
            parts = [(self.writers[key][0], arrays)]
        else:
            partition = (self.documents + np.arange(count)) % self.partitions
            parts = [(writer, select_documents(arrays, partition == p))
                     for p, writer in enumerate(self.writers[key])]
        for writer, (tokens, lengths, per_document) in parts:
            writer.add_documents(tokens, lengths, per_document)
        if key == len(self.prefixes) - 1:
            self.documents += count

    def finish(self) -> None:
        """Concatenate the partitions into the outputs (finalized as the run's `with` ends)."""
        if self.partitions == 1:
            return
        self._stack.close()  # finalizes every partition
        self.final = []
        for key, prefix in enumerate(self.prefixes):
            writer = self._outer.enter_context(IndexedDatasetWriter(prefix, self.dtype, self._log))
            for p in range(self.partitions):
                writer.append_dataset(self._part(key, p))
            self.final.append(writer)
