"""Tasks of multi-task fine-tuning (MFTCoder): which task each conversation belongs to.

A record names its task in ``data_name`` (MFTCoder's key); a record without it belongs to its
dataset's unnamed task, which training calls after the dataset (``PREFIX``'s file name), so a
blend of untagged datasets is one task per dataset, as MFTCoder's one dataset per task.
``preprocess_data.py --handler-name`` writes, beside the two Megatron shards:

- ``PREFIX_task_ids_document.bin/.idx``: a third Megatron indexed dataset (uint16) with the
  sequences and documents of the other two, holding each token's task id (the conversation's;
  the padding of a packed sample gets 0 and is never trained on), so a packed sample keeps the
  task of every conversation in it;
- ``PREFIX_tasks.json``: the task-name table, ``{"tasks": ["", "code", ...], "conversations":
  [0, 120, ...]}`` (id = index; ``""`` is the unnamed task; how many conversations each has),
  written last and atomically.

Shards written before tasks existed have neither file: all their conversations are the
dataset's unnamed task. megatron-core never reads these files.
"""

import os
from typing import Dict, List, Optional

import numpy as np

from megatron_ext.data.shard_meta import read_versioned_json, write_json_atomically

TASK_KEY = "data_name"
TASK_DTYPE = np.uint16
TASKS_FORMAT = "megatron-ext-tasks"
TASKS_VERSION = 1
# The log line separates fields with "|" and names from values with ":" (metrics.parse_log).
_FORBIDDEN = "|:\n\r"


def task_ids_prefix(prefix: str) -> str:
    return f"{prefix}_task_ids_document"


def tasks_path(prefix: str) -> str:
    return f"{prefix}_tasks.json"


def record_task(record) -> str:
    """The task a record names (``data_name``), "" when it names none; ValueError when the
    name cannot be one (the caller adds file and line)."""
    if not isinstance(record, dict) or record.get(TASK_KEY) is None:
        return ""
    name = record[TASK_KEY]
    if not isinstance(name, str):
        raise ValueError(f"key {TASK_KEY!r} is {type(name).__name__}, not a string")
    name = name.strip()
    if not name or any(c in name for c in _FORBIDDEN):
        raise ValueError(f"key {TASK_KEY!r} = {record[TASK_KEY]!r}: a task name must be "
                         "non-empty, without '|', ':' or line breaks (it is a log field)")
    return name


class TaskTable:
    """Task names in order of first appearance (the unnamed task "" is always id 0)."""

    def __init__(self):
        self.names: List[str] = [""]
        self._ids: Dict[str, int] = {"": 0}

    def id(self, name: str) -> int:
        found = self._ids.get(name)
        if found is None:
            if len(self.names) > np.iinfo(TASK_DTYPE).max:
                raise ValueError(f"more than {np.iinfo(TASK_DTYPE).max} tasks ({TASK_KEY})")
            found = self._ids[name] = len(self.names)
            self.names.append(name)
        return found


def write_tasks(prefix: str, names: List[str], conversations: List[int]) -> None:
    """``PREFIX_tasks.json``, atomically (a reader sees the old file or the new one)."""
    write_json_atomically(tasks_path(prefix), {
        "format": TASKS_FORMAT, "version": TASKS_VERSION, "tasks": names,
        "conversations": conversations})


def read_tasks(prefix: str) -> Optional[List[Optional[str]]]:
    """The task names of ``prefix`` by id, None for a task without conversations (None for
    all: shards without tasks); ValueError naming the file."""
    path = tasks_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        raw = read_versioned_json(path, TASKS_FORMAT, TASKS_VERSION)
        names, counts = raw["tasks"], raw["conversations"]
        if not (isinstance(names, list) and names and names[0] == ""
                and all(isinstance(n, str) for n in names)):
            raise ValueError("'tasks' must list names, the unnamed task \"\" first")
        if not (isinstance(counts, list) and len(counts) == len(names)
                and all(isinstance(c, int) for c in counts)):
            raise ValueError("'conversations' must count each task's conversations")
        return [name if count else None for name, count in zip(names, counts)]
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"{path}: unreadable task table ({error}); rewrite the data with "
                         "preprocess_data.py --handler-name ...") from None


def dataset_task_names(prefix: str, names: Optional[List[Optional[str]]]) -> List[Optional[str]]:
    """A dataset's task names for training (``read_tasks``): its unnamed task takes the
    dataset's name; None stays for a task without conversations."""
    return [os.path.basename(prefix) if n == "" else n for n in (names or [""])]
