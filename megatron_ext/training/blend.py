"""``--data-path``: one shard prefix or a weighted blend, and the check that its files exist."""

import os
from typing import List

from megatron_ext.config import ConfigError


def parse_blend(data_path: List[str]):
    """``[A]`` or ``[w1, A, w2, B, ...]`` -> (prefixes, weights or None)."""
    if len(data_path) == 1:
        return [data_path[0]], None
    weights = [float(w) for w in data_path[0::2]]
    return list(data_path[1::2]), weights


def _shards_exist(prefix: str) -> bool:
    return all(os.path.isfile(prefix + suffix) for suffix in (".bin", ".idx"))


def _instruction_hint(prefix: str) -> str:
    """Where ``prefix`` is the --output-prefix of instruction shards, the flag that trains on
    them: a hint or ''."""
    from megatron_ext.data.instruct.pipeline import output_prefixes

    if all(_shards_exist(shard) for shard in output_prefixes(prefix)):
        return (f"; {prefix} holds instruction shards (preprocess_data.py --handler-name): "
                f"train on them with --is-instruction-dataset --data-path {prefix}")
    return ""


def _near(prefix: str) -> str:
    """The prefix meant, where a file name, the --output-prefix or instruction shards were
    given: a hint or ''."""
    hint = _instruction_hint(prefix)
    if hint:
        return hint
    candidates = [prefix[:-len(end)] for end in (".bin", ".idx", ".") if prefix.endswith(end)]
    candidates += [prefix + "_text_document"]
    for candidate in candidates:
        if _shards_exist(candidate):
            return f"; did you mean --data-path {candidate}?"
    return ""


def check_prefixes(prefixes: List[str]) -> None:
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ConfigError(
                    f"--data-path: {prefix + suffix} does not exist; give the prefix written by "
                    f"preprocess_data.py (e.g. PREFIX_text_document, without .bin/.idx)"
                    + _near(prefix))
