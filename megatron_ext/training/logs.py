"""What a run prints: log levels per rank, library notices, and messages all ranks share.

``setup`` is called once, by ``pretrain``, before megatron-core is imported (its optional-
dependency warnings fire at import time). Without ``--verbose``:

- progress comes from the last rank (it holds the loss, as in Megatron-LM), the start-up
  summary from rank 0 (``SUMMARY_LOGGER``), problems from every rank;
- megatron-core's INFO dumps (DDP config, the distributed optimizer's bucket listing, the
  dataset builder's steps) are not shown: the summary says what matters of them;
- library warnings that ask nothing of the user are filtered (``_NOTICES``): each group is
  named once, in one line, by rank 0, or dropped when it says nothing about this run. Any other
  warning is shown as Python shows it.

``--verbose`` shows everything, on every rank, as the libraries print it.
"""

import logging
import os
import re
import sys
import warnings

import torch.distributed as dist

from megatron_ext import platform

SUMMARY_LOGGER = "megatron_ext.summary"
FORMAT = "[%(asctime)s] %(message)s"

# (pattern of the warning text, the one line rank 0 prints for the whole group or None to drop
# it, whether it concerns GPUs only). Each is raised by megatron-core or torch about their own
# code or optional packages.
_NOTICES = [
    (r"(Transformer Engine and |)Apex (are|is) not installed",
     "Apex / Transformer Engine not installed: megatron-core uses its torch implementations",
     False),
    # megatron-core's own defaults and calls: nothing for the user to change.
    (r"full scope is deprecated", None, False),
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor", None, False),
    (r"`torch\.distributed\.\w+` is deprecated", None, False),
    # megatron-core's torch_dist loading calls into torch.distributed.checkpoint (every resume).
    (r"`load_state_dict` is deprecated and will be removed", None, False),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", None, False),
    # Advice for overlapping TP communication on CUDA streams (the example scripts follow it).
    (r"CUDA_DEVICE_MAX_CONNECTIONS", "set CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron-core's advice "
                                     "for overlapping tensor-parallel communication)", True),
]
# megatron-core log records of the same kind: --mock-data has no index worth caching.
_DROPPED_RECORDS = [r"Unable to save MockGPTDataset indexes because path_to_cache is None"]


class _Notices:
    """``warnings.showwarning`` that names each known group once (rank 0) and drops the rest."""

    def __init__(self, show, rank: int):
        self.show, self.rank, self.named = show, rank, set()

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        text = str(message)
        for pattern, brief, gpu_only in _NOTICES:
            if re.search(pattern, text):
                if gpu_only and not platform.cuda_available():
                    return
                if brief and self.rank == 0 and brief not in self.named:
                    self.named.add(brief)
                    logging.getLogger("megatron_ext").warning(
                        f"note: {brief} (--verbose shows library warnings)")
                return
        self.show(message, category, filename, lineno, file, line)


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(re.search(pattern, text) for pattern in _DROPPED_RECORDS)


def setup(verbose: bool = False) -> None:
    """Levels, handler and filters for this rank (torchrun's RANK/WORLD_SIZE)."""
    rank = int(os.environ.get("RANK", "0"))
    last_rank = int(os.environ.get("WORLD_SIZE", "1")) - 1
    level = logging.INFO if verbose or rank == last_rank else logging.WARNING
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stdout, force=True)
    # The summary logger passes its records to the root handler whatever the root's level.
    logging.getLogger(SUMMARY_LOGGER).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if verbose:
        return
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    handler = logging.getLogger().handlers[0]
    handler.addFilter(_DropRecords())
    warnings.showwarning = _Notices(warnings.showwarning, rank)


def log_once(logger: logging.Logger, level: int, message: str) -> None:
    """For a message every rank would log alike: the last rank, whose log shows every level
    (``setup``), logs it, the others stay silent (before the process groups exist, the
    launcher's RANK and WORLD_SIZE say which rank this is)."""
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank == world_size - 1:
        logger.log(level, message)
