"""The datasets of a run as Megatron-LM reads its flags, and the check that their files exist.

Either one blend cut by ``--split`` (``--data-path``, or ``--data-args-path FILE`` holding the
same list), or whole datasets per split (``--train-data-path``/``--valid-data-path``/
``--test-data-path``, or ``--per-split-data-args-path FILE.json`` with ``train``, ``valid`` and
``test`` lists): megatron-core's ``blend`` and ``blend_per_split``. Each list is a prefix, weight
prefix pairs (``0.3 A 0.7 B``: sampled by weight) or prefixes (``A B C``: weights None, so
megatron-core takes one epoch of each dataset, weighed by its size). A list that mixes the two
forms, which Megatron-LM's parser either asserts on or reads as prefixes named like numbers, is
an error naming the flag.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_ext.config.components import ConfigError

Blend = Tuple[List[str], Optional[List[float]]]  # megatron-core's (prefixes, weights or None)
SPLITS = ("train", "valid", "test")
FORMS = "give a weight before every prefix (0.3 A 0.7 B) or none (A B)"


def _is_weight(entry: str) -> bool:
    """A number, unless a shard is named so (Megatron-LM's parser only asks float())."""
    try:
        float(entry)
    except ValueError:
        return False
    return not os.path.isfile(entry + ".bin")


def parse_blend(values: List[str], flag: str = "--data-path") -> Blend:
    """``[A]``, ``[w1, A, w2, B, ...]`` or ``[A, B, ...]`` -> (prefixes, weights or None), the
    weighted form told as megatron-core's ``get_blend_from_list`` tells it (an even count with a
    number before every prefix); ``flag`` names the list in errors."""
    values = [str(v).strip() for v in values]
    if not values:
        raise ConfigError(f"{flag} lists no datasets; give a shard prefix, or {FORMS}")
    weight = [_is_weight(v) for v in values]
    if len(values) % 2 == 0 and all(weight[0::2]) and not any(weight[1::2]):
        weights = [float(w) for w in values[0::2]]
        bad = next((w for w in weights if not (math.isfinite(w) and w > 0)), None)
        if bad is not None:  # megatron-core's BlendedDataset asserts every weight > 0
            raise ConfigError(f"{flag}: weight {bad:g} must be a positive number")
        return values[1::2], weights
    if not any(weight):
        return values, None
    first = next(i for i, w in enumerate(weight) if w)
    listed = f"{flag} {' '.join(values)}"
    if len(values) % 2 == 0 and all(weight[1::2]) and not any(weight[0::2]):
        raise ConfigError(f"{listed}: the weights follow their prefixes; put each weight "
                          f"before its prefix (0.3 A 0.7 B)")
    if len(values) % 2 == 0 and not any(weight[1::2]):  # pairs, one of them without a number
        bad = next(i for i in range(0, len(values), 2) if not weight[i])
        raise ConfigError(f"{listed}: {values[bad]!r} (entry {bad + 1}) is not a weight, but "
                          f"{values[first]!r} (entry {first + 1}) is; {FORMS}")
    raise ConfigError(f"{listed}: {values[first]!r} (entry {first + 1}) is a weight, but the "
                      f"list is not weight/prefix pairs; {FORMS}")


@dataclass
class Blends:
    """The datasets to build: ``blend`` (cut by --split) or ``per_split`` (train, valid, test;
    None where a split has none), and the flag each came from, for messages."""

    blend: Optional[Blend] = None
    per_split: Optional[List[Optional[Blend]]] = None
    flags: Tuple[str, ...] = ()  # per blend: ("--data-path",) or one per split

    def prefixes(self) -> List[Tuple[str, str]]:
        """(prefix, flag) of every dataset, each prefix once, in order."""
        blends = [self.blend] if self.blend else self.per_split or []
        seen, out = set(), []
        for blend, flag in zip(blends, self.flags):
            for prefix in (blend[0] if blend else []):
                if prefix not in seen:
                    seen.add(prefix)
                    out.append((prefix, flag))
        return out


def _read(path: str, flag: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as error:
        raise ConfigError(f"{flag} {path}: cannot read it ({error.strerror})") from None


def _per_split_file(path: str) -> List[Optional[Blend]]:
    flag = "--per-split-data-args-path"
    try:
        lists = json.loads(_read(path, flag))
    except ValueError as error:
        raise ConfigError(f"{flag} {path}: not JSON ({error})") from None
    missing = [s for s in SPLITS if not isinstance(lists, dict) or s not in lists]
    if missing:
        raise ConfigError(f"{flag} {path}: a JSON object with the keys train, valid and test "
                          f"(a list, a string or null each) is expected; {', '.join(missing)} "
                          f"missing")
    blends = []
    for split in SPLITS:
        value = lists[split]
        if isinstance(value, str):  # Megatron-LM splits a string at whitespace
            value = value.split()
        if value is not None and not isinstance(value, list):
            raise ConfigError(f"{flag} {path}: {split} is {json.dumps(value)}; give a list of "
                              f"datasets (as --{split}-data-path), a string or null")
        blends.append(None if value is None else parse_blend(value, f"{flag} {path} ({split})"))
    return blends


def resolve(d) -> Blends:
    """The datasets of a ``DataConfig`` (validate checks that one form is given)."""
    if d.data_args_path:
        flag = f"--data-args-path {d.data_args_path}"
        return Blends(blend=parse_blend(_read(d.data_args_path, "--data-args-path").split(),
                                        flag), flags=(flag,))
    if d.data_path:
        return Blends(blend=parse_blend(d.data_path), flags=("--data-path",))
    if d.per_split_data_args_path:
        flag = f"--per-split-data-args-path {d.per_split_data_args_path}"
        return Blends(per_split=_per_split_file(d.per_split_data_args_path),
                      flags=tuple(f"{flag} ({split})" for split in SPLITS))
    lists = [getattr(d, f"{split}_data_path") for split in SPLITS]
    if any(v is not None for v in lists):
        flags = tuple(f"--{split}-data-path" for split in SPLITS)
        return Blends(per_split=[None if v is None else parse_blend(v, f)
                                 for v, f in zip(lists, flags)], flags=flags)
    return Blends()


def naming(prefix: str, flag: str) -> str:
    """How a message names a dataset: ``--train-data-path P``, or ``P (in --data-args-path F)``."""
    return f"{prefix} (in {flag})" if " " in flag else f"{flag} {prefix}"


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


def _near(prefix: str, flag: str) -> str:
    """The prefix meant, where a file name, the --output-prefix or instruction shards were
    given: a hint or ''."""
    hint = _instruction_hint(prefix)
    if hint:
        return hint
    candidates = [prefix[:-len(end)] for end in (".bin", ".idx", ".") if prefix.endswith(end)]
    candidates += [prefix + "_text_document"]
    for candidate in candidates:
        if _shards_exist(candidate):
            # A list read from a file (its flag names the file) is fixed there.
            where = "" if " " in flag else f"{flag} "
            return f"; did you mean {where}{candidate}?"
    return ""


def check_prefixes(prefixes: List[Tuple[str, str]]) -> None:
    """Every (prefix, flag)'s .bin and .idx exist, else an error naming the flag."""
    for prefix, flag in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ConfigError(
                    f"{flag}: {prefix + suffix} does not exist; give the prefix written by "
                    f"preprocess_data.py (e.g. PREFIX_text_document, without .bin/.idx)"
                    + _near(prefix, flag))
