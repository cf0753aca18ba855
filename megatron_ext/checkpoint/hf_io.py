"""Hugging Face safetensors checkpoints on disk: lazy reading, sharded writing, tokenizer files.

Reading is lazy (``safe_open``: one tensor at a time); writing buffers one output shard. Names
and tensors are mapped to Megatron's by ``hf``.
"""

import json
import os
from pathlib import Path

import torch

from megatron_ext.checkpoint.hf import ConversionError

INDEX_FILENAME = "model.safetensors.index.json"
SINGLE_FILENAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tiktoken.model",
)


def check_finite(tensor: torch.Tensor, name: str, file) -> torch.Tensor:
    """``tensor``, or an error naming it and its file when it holds NaN or Inf: a file damaged
    in place has no checksum, and a converted checkpoint would carry the values on silently.
    One pass per tensor as it streams through (no second read)."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ConversionError(
            f"{file}: tensor {name} holds {bad} NaN/Inf value(s) of {tensor.numel()}; the file "
            "is damaged or the model diverged: re-download or re-save it (nothing converted)")
    return tensor


class HfReader:
    """Lazy access to the tensors of a safetensors checkpoint (sharded with an index or not);
    a tensor holding NaN or Inf is an error."""

    def __init__(self, load_dir):
        from safetensors import safe_open  # noqa: F401  (fail early if missing)

        self.load_dir = Path(load_dir)
        index = self.load_dir / INDEX_FILENAME
        single = self.load_dir / SINGLE_FILENAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index} is not a safetensors index: {exc}") from exc
            self.weight_map = {name: self.load_dir / file for name, file in weight_map.items()}
        elif single.is_file():
            self.weight_map = None
        else:
            bins = sorted(p.name for p in self.load_dir.glob("pytorch_model*.bin"))
            hint = (f" ({bins[0]} found: re-save it with save_pretrained(..., safe_serialization=True))"
                    if bins else "")
            raise ConversionError(f"--load-dir {self.load_dir}: no {SINGLE_FILENAME} or "
                                  f"{INDEX_FILENAME}{hint}")
        files = sorted(set(self.weight_map.values())) if self.weight_map else [single]
        for file in files:
            if not file.is_file():
                raise ConversionError(f"{file} is missing (listed in {index})")
        self._handles = {}
        if self.weight_map is None:
            self.weight_map = {name: single for name in self._open(single).keys()}

    def _open(self, file: Path):
        from safetensors import safe_open

        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise ConversionError(f"{file} is not a readable safetensors file: {exc}") from exc
            self._handles[file] = handle
        return handle

    def names(self):
        return set(self.weight_map)

    def shape(self, name: str) -> tuple:
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name} is missing from {self.load_dir}")
        try:
            # A copy: a tensor served from the memory map pins the whole file's mapping (and
            # every page read from it stays resident) for as long as the tensor lives.
            tensor = self._open(self.weight_map[name]).get_tensor(name).clone()
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"cannot read {name} from {self.weight_map[name]}: {exc}") from exc
        return check_finite(tensor, name, self.weight_map[name])

    def close(self):
        self._handles.clear()


class HfWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` (one buffered),
    named as ``save_pretrained`` does, with ``model.safetensors.index.json`` when sharded."""

    def __init__(self, out_dir, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buffer, self._buffer_bytes = {}, 0
        self._shards = []  # (temp path, names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous().clone() if tensor.untyped_storage().size() \
            != size else tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> None:
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self._shards[0][0], self.out_dir / SINGLE_FILENAME)
            return
        weight_map = {}
        for number, (path, names) in enumerate(self._shards, 1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILENAME).write_text(json.dumps(index, indent=2) + "\n")


def tokenizer_files(path) -> list:
    """The tokenizer files to copy for ``--tokenizer-model PATH``: the known tokenizer files in
    PATH (a directory), or PATH (a file) and the known tokenizer files next to it."""
    path = Path(path)
    if path.is_dir():
        files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not files:
            raise ConversionError(f"--tokenizer-model {path}: no tokenizer files "
                                  f"({', '.join(TOKENIZER_FILES)}) in this directory")
        return files
    if path.is_file():
        return [path] + [path.parent / name for name in TOKENIZER_FILES
                         if name != path.name and (path.parent / name).is_file()]
    raise ConversionError(f"--tokenizer-model {path} does not exist")
