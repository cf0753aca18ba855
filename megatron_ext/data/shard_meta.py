"""What a shard holds and how it was made: ``PREFIX.meta.json`` beside ``PREFIX.bin/.idx``.

``preprocess_data.py`` writes it with the shard, so training can check the shard against the
run's tokenizer (largest id vs the vocabulary, EOD id) without reading the tokens. Megatron-LM's
tool writes none; training then scans the shard once and caches the result (see
``megatron_ext/training/shard_checks.py``). The file is torch-free JSON so that any tool can
read it; megatron-core ignores it.
"""

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

from megatron_ext import __version__

META_SUFFIX = ".meta.json"
FORMAT = "megatron-ext-shard"
VERSION = 1
TOOL = f"megatron-ext {__version__} preprocess_data.py"


class ShardMetaError(ValueError):
    """A metadata file that cannot be read; the message names it."""


@dataclass
class ShardMeta:
    num_documents: int
    num_tokens: int
    max_id: int  # -1 for a shard without tokens
    bin_bytes: int  # sizes of the pair when it was written: a pair from two runs differs
    idx_bytes: int
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None  # as given to the tool
    vocab_size: Optional[int] = None  # the tokenizer's, without Megatron's padding
    eod: Optional[int] = None
    tokenizer_fingerprint: Optional[str] = None  # megatron_ext.tokenizer.fingerprint
    eod_appended: Optional[bool] = None  # --append-eod (None: unknown, e.g. a scanned shard)
    tool: str = ""  # "megatron-ext X.Y.Z preprocess_data.py", or "scan" for a scanned shard


def meta_path(prefix: str) -> str:
    return prefix + META_SUFFIX


def write_json_atomically(path: str, payload: dict) -> None:
    """A reader sees the old file or the new one, never a part (a killed run leaves at most
    a ``.tmp-PID`` file beside it)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_versioned_json(path: str, file_format: str, version: int) -> dict:
    """The JSON object in ``path`` written as ``file_format`` ``version``; ValueError else."""
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or raw.get("format") != file_format or (
            raw.get("version") != version):
        found = raw if not isinstance(raw, dict) else (raw.get("format"), raw.get("version"))
        raise ValueError(f"found {found!r}, expected format {file_format!r} version {version}")
    return raw


def write_meta(prefix: str, meta: ShardMeta) -> None:
    write_json_atomically(meta_path(prefix), {"format": FORMAT, "version": VERSION,
                                              **asdict(meta)})


def read_meta(prefix: str) -> Optional[ShardMeta]:
    """The shard's metadata, or None when it has none (a shard made by Megatron-LM's tool)."""
    path = meta_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        raw = read_versioned_json(path, FORMAT, VERSION)
        names = {f.name for f in fields(ShardMeta)}
        return ShardMeta(**{k: v for k, v in raw.items() if k in names})
    except (OSError, ValueError, TypeError) as error:
        raise ShardMetaError(
            f"{path}: unreadable shard metadata ({error}); delete it to have the shard scanned "
            f"again, or rewrite the shard with preprocess_data.py") from None
