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


def _near(prefix: str) -> str:
    """The prefix meant, where a file name or the --output-prefix was given: a hint or ''."""
    candidates = [prefix[:-len(end)] for end in (".bin", ".idx", ".") if prefix.endswith(end)]
    candidates += [prefix + "_text_document"]
    for candidate in candidates:
        if all(os.path.isfile(candidate + suffix) for suffix in (".bin", ".idx")):
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
