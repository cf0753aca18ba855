"""What a checkpoint records of the data its run drew from, and what a resume says when that
changed.

A resume continues at the checkpoint's consumed samples in the sample order of the resumed
run's data flags: another blend, --split, --seq-length or --seed, or a shard rewritten since the
save, gives other samples than the uninterrupted run would have taken, some seen twice, some
never. Megatron-LM resumes so without a word (its ``check_checkpoint_args`` compares the model
only); here the run goes on too (changing the data mid-run can be intended), and the log names
each change. The flags are saved under Megatron-LM's names where it has them (``split``,
``seed``, ``seq_length``), the blends as resolved (``data_blends``: a ``--data-args-path`` file's
contents, not its name) and the shards' sizes (``data_shards``).
"""

import logging
import os
from typing import Dict, List

from megatron_ext.config import Config
from megatron_ext.config.blend import resolve
from megatron_ext.data.indexed import bin_path, idx_path
from megatron_ext.training.logs import log_once
from megatron_ext.training.shard_checks import data_prefixes

logger = logging.getLogger("megatron_ext")


def shard_sizes(config: Config) -> Dict[str, List[int]]:
    """The bytes of each shard's .bin and .idx, taken at start-up (what the run trains on, and
    no file read again at a save, where a rank that failed alone would leave the others
    waiting); sizes, not mtimes, which a copy of the data changes."""
    if config.data.mock_data:
        return {}
    # Absolute: a resume started elsewhere, or naming the shards by another path, finds them.
    return {os.path.abspath(prefix): [os.path.getsize(bin_path(prefix)),
                                      os.path.getsize(idx_path(prefix))]
            for prefix, _, _ in data_prefixes(config)}


def _blends(config: Config):
    """The run's blends as plain lists (pickled alike whatever the parser built)."""
    def plain(blend):
        return None if blend is None else [list(blend[0]),
                                           None if blend[1] is None else list(blend[1])]
    blends = resolve(config.data)
    return {"blend": plain(blends.blend),
            "per_split": None if blends.per_split is None else [plain(b) for b in blends.per_split]}


# (saved name, how the log names it, the run's value)
_ORDER = (
    ("data_blends", "the datasets and weights (--data-path, --*-data-path, their files)",
     _blends),
    ("split", "--split", lambda c: c.data.split),
    ("seq_length", "--seq-length", lambda c: c.model.seq_length),
    ("seed", "--seed (the datasets' shuffle)", lambda c: c.training.seed),
    ("mock_data", "--mock-data", lambda c: c.data.mock_data),
)


def _shown(name: str, value) -> str:
    """A value as typed: a blend in --data-path's form (``0.7 A 0.3 B``, ``A B``)."""
    if name != "data_blends":
        return repr(value)
    def typed(blend):
        if blend is None:
            return "none"
        prefixes, weights = blend
        return " ".join(prefixes if weights is None else
                        (f"{w:g} {p}" for w, p in zip(weights, prefixes)))
    return "'" + (typed(value["blend"]) if value["per_split"] is None else
                  " | ".join(map(typed, value["per_split"]))) + "'"


def saved_data_args(config: Config, sizes: Dict[str, List[int]]) -> dict:
    """The entries of a checkpoint's ``args`` that fix its run's sample order (``sizes``: the
    run's ``shard_sizes``)."""
    # seq_length is among the model's args already (checkpoint/args.py).
    values = {name: value(config) for name, _, value in _ORDER if name != "seq_length"}
    values["data_shards"] = sizes
    return values


def warn_data_changes(saved_args, config: Config, sizes: Dict[str, List[int]], where) -> None:
    """Name every data flag and every shard (``sizes``: this run's ``shard_sizes``) that differ
    from the run that saved ``where`` (a checkpoint without the entry: not compared)."""
    saved = vars(saved_args) if saved_args is not None else {}
    for name, flag, value in _ORDER:
        if name in saved and saved[name] != value(config):
            log_once(logger, logging.WARNING,  # every rank compares alike
                f"{flag}: {_shown(name, saved[name])} when {where} was saved, "
                f"{_shown(name, value(config))} now: "
                f"training continues over other samples than the saved run's (in another "
                f"order, some seen twice, some never); resume with the saved value to go on "
                f"as the uninterrupted run")
    shards = saved.get("data_shards") or {}
    for prefix, now in sizes.items():
        if prefix in shards and list(shards[prefix]) != now:
            log_once(logger, logging.WARNING,
                f"{prefix}: the shard changed since {where} was saved (.bin/.idx "
                f"{shards[prefix][0]}/{shards[prefix][1]} bytes then, {now[0]}/{now[1]} now): "
                f"training continues over the new contents, its samples not the saved run's")
