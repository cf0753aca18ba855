"""Packing of instruction conversations into fixed-size training samples.

Not to be confused with ``megatron_ext.training.packing``, which finds the document boundaries
inside a packed micro-batch at training time; this packs at preprocessing time, and the
sequence lengths it returns are the boundaries the instruction shards store.
"""

from typing import List

import numpy as np

# First-fit keeps at most this many samples open; when a conversation fits none and the window
# is full, the fullest open sample is written out. Deterministic for a given input order.
PACK_WINDOW = 64


class Packer:
    """First-fit packing of conversations into samples of ``capacity`` tokens, in input order.

    A conversation is never split. ``add`` returns the samples it closes; ``flush`` the rest.
    A sample is (ids, mask, task ids, sequence lengths, padding): its conversations back to
    back, then the padding (``pad_id``, mask 0, task 0), if any, as a sequence of its own.
    """

    def __init__(self, capacity: int, pad_id: int, window: int = PACK_WINDOW):
        self.capacity, self.pad_id, self.window = capacity, pad_id, window
        self.open: List[list] = []  # each: [used, [(ids, mask, task), ...]]

    def add(self, ids: np.ndarray, mask: np.ndarray, task: np.ndarray) -> list:
        size = ids.size
        if size > self.capacity:
            raise ValueError(f"a conversation of {size} tokens exceeds the sample "
                             f"({self.capacity})")
        closed = []
        target = next((b for b in self.open if b[0] + size <= self.capacity), None)
        if target is None:
            if len(self.open) >= self.window:
                fullest = max(range(len(self.open)), key=lambda i: (self.open[i][0], -i))
                closed.append(self._finish(self.open.pop(fullest)))
            target = [0, []]
            self.open.append(target)
        target[0] += size
        target[1].append((ids, mask, task))
        if target[0] == self.capacity:
            self.open.remove(target)
            closed.append(self._finish(target))
        return closed

    def flush(self) -> list:
        closed = [self._finish(b) for b in self.open]
        self.open = []
        return closed

    def _finish(self, sample):
        used, conversations = sample
        lengths = [ids.size for ids, _, _ in conversations]
        ids, mask, task = (list(parts) for parts in zip(*conversations))
        padding = self.capacity - used
        if padding:
            ids.append(np.full(padding, self.pad_id, np.int64))
            # In the conversations' dtypes, so the sample keeps them.
            mask.append(np.zeros(padding, mask[0].dtype))
            task.append(np.zeros(padding, task[0].dtype))
            lengths.append(padding)
        return (np.concatenate(ids), np.concatenate(mask), np.concatenate(task), lengths,
                padding)
