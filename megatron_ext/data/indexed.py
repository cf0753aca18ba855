"""Megatron's indexed dataset format (`PREFIX.bin` + `PREFIX.idx`), without torch.

`.idx` layout, little-endian: magic `MMIDIDX\\x00\\x00`, u64 version (1), u8 dtype code,
u64 sequence count S, u64 document count D+1, int32[S] sequence lengths, int64[S] byte offsets
into `.bin`, int64[D+1] document boundaries as sequence indices (leading 0). `.bin` is the
tokens back to back. megatron-core's `IndexedDataset` reads what this module writes.
"""

import os
import struct
import uuid
from array import array

import numpy as np

from megatron_ext.data import shard_meta
from megatron_ext.data.outputs import output_error, remove_stale_temporaries
from megatron_ext.data.shard_meta import ShardMeta, meta_path

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents + 1
_CODE_TO_DTYPE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                  6: np.float64, 7: np.float32, 8: np.uint16}
_DTYPE_TO_CODE = {np.dtype(t): code for code, t in _CODE_TO_DTYPE.items()}


def best_dtype(vocab_size: int):
    """Megatron's choice: uint16 while every id fits with margin, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def bin_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def idx_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def as_token_array(tokens, dtype, where: str = "") -> np.ndarray:
    """`tokens` as a flat array of `dtype`; an id that does not fit is an error, where
    `astype` would silently wrap it (70000 becomes 4464 in uint16)."""
    dtype = np.dtype(dtype)
    values = np.asarray(tokens)
    if values.dtype == dtype:
        return values.ravel()
    if values.size and values.dtype.kind in "iub" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise ValueError(f"token id {high if high > info.max else low} does not fit "
                             f"{dtype}{' in ' + where if where else ''}")
    return values.astype(dtype).ravel()


class IndexedDatasetWriter:
    """Writes one indexed dataset; the files appear only when it is complete.

    Data goes to temporary files beside the targets; `finalize()` renames `.bin` then `.idx`
    (after removing any old `.idx`), so an `.idx` never sits next to an incomplete `.bin`.
    Leaving the `with` block through an exception deletes the temporary files instead; those
    of a killed run are deleted by the next writer of the same prefix. Any `PREFIX.meta.json`
    is removed with the old pair, so it never describes another pair (see `meta`).
    Generic over dtype so that aligned datasets (token ids, loss masks) use the same writer.
    """

    def __init__(self, path_prefix: str, dtype, log=None):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_TO_CODE:
            raise ValueError(f"dtype {self.dtype} has no code in Megatron's index format")
        self.path_prefix = path_prefix
        remove_stale_temporaries(path_prefix, log)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp_bin = bin_path(path_prefix) + tag
        self._tmp_idx = idx_path(path_prefix) + tag
        self._lengths = array("i")  # int32, as the format stores them
        self._doc_ends = array("q", [0])
        self.num_tokens = 0
        self.max_id = -1  # the largest value written, counted as it is written
        self._done = False
        self.finalized = False
        try:
            self._bin = open(self._tmp_bin, "wb")
        except OSError as e:
            raise output_error(e, self._tmp_bin) from None

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            try:
                self.finalize()
            except BaseException:  # e.g. the disk filled up with the last bytes
                self.abort()
                raise

    def add_document(self, tokens, sequence_lengths=None) -> None:
        """Append one document: one sequence (may be empty), or with `sequence_lengths` as many
        sequences as it has entries (they add up to the token count), as Megatron's index
        allows (e.g. the conversations of a packed fine-tuning sample)."""
        values = as_token_array(tokens, self.dtype, self.path_prefix)
        self._append(values, [values.size] if sequence_lengths is None else sequence_lengths,
                     one_document=True)

    def add_documents(self, tokens, lengths, sequences_per_document=None) -> None:
        """Append many documents at once: `tokens` concatenated, `lengths[i]` tokens each; one
        sequence per document, or document j of `sequences_per_document[j]` of the sequences."""
        counts = None
        if sequences_per_document is not None:
            counts = np.asarray(sequences_per_document, np.int64)
            if (counts < 1).any() or int(counts.sum()) != np.size(lengths):
                raise ValueError(f"{np.size(lengths)} sequences are not split by "
                                 f"{counts.size} documents' sequence counts")
        self._append(as_token_array(tokens, self.dtype, self.path_prefix), lengths,
                     one_document=False)
        if counts is not None:
            # Replace the one-per-sequence boundaries _append just wrote.
            del self._doc_ends[len(self._doc_ends) - int(counts.sum()):]
            self._doc_ends.frombytes((self._doc_ends[-1] + np.cumsum(counts)).tobytes())

    def _append(self, values: np.ndarray, lengths, one_document: bool) -> None:
        """Write `values` as sequences of `lengths` tokens: one document of them all, or one
        document per sequence. Lengths that do not split `values` would leave an index that
        points past its `.bin` or skips tokens, so they are refused before anything is written."""
        lengths = np.asarray(lengths, dtype=np.int64).ravel()
        if ((one_document and lengths.size == 0) or (lengths < 0).any()
                or int(lengths.sum()) != values.size):
            shown = np.array2string(lengths, separator=", ", threshold=10)
            raise ValueError(f"sequence lengths {shown} do not split "
                             f"{'a document of ' if one_document else ''}{values.size} tokens")
        self._write(values.tobytes())
        if values.size:
            self.max_id = max(self.max_id, int(values.max()))
            self.num_tokens += values.size
        start = len(self._lengths)
        self._lengths.frombytes(lengths.astype(np.int32).tobytes())
        if one_document:
            self._doc_ends.append(len(self._lengths))
        else:
            self._doc_ends.frombytes(np.arange(start + 1, start + 1 + lengths.size,
                                               dtype=np.int64).tobytes())

    def append_dataset(self, path_prefix: str) -> None:
        """Append every document of an existing dataset of the same dtype (for merging)."""
        other = IndexedDatasetReader(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{path_prefix} holds {other.dtype}, not {self.dtype}: datasets "
                             "of different dtypes cannot be merged (same tokenizer needed)")
        offset = len(self._lengths)
        self._lengths.frombytes(np.asarray(other.sequence_lengths, np.int32).tobytes())
        self._doc_ends.frombytes((np.asarray(other.document_indices[1:]) + offset).tobytes())
        # Copied in blocks of whole tokens, the largest id taken on the way (no second read).
        block_bytes = (16 << 20) // self.dtype.itemsize * self.dtype.itemsize
        with open(bin_path(path_prefix), "rb") as f:
            while block := f.read(block_bytes):
                self._write(block)
                self.max_id = max(self.max_id, int(np.frombuffer(block, self.dtype).max()))
        self.num_tokens += other.num_tokens

    def _write(self, data: bytes) -> None:
        try:
            self._bin.write(data)
        except OSError as e:
            raise output_error(e, self._tmp_bin) from None

    def finalize(self) -> None:
        try:
            self._bin.close()  # the last buffered bytes: a full disk may show only here
        except OSError as e:
            raise output_error(e, self._tmp_bin) from None
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        try:
            with open(self._tmp_idx, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, _VERSION, _DTYPE_TO_CODE[self.dtype],
                                     lengths.size, len(self._doc_ends)))
                f.write(lengths.tobytes())
                f.write(pointers.tobytes())
                f.write(np.frombuffer(self._doc_ends, dtype=np.int64).tobytes())
        except OSError as e:
            raise output_error(e, self._tmp_idx) from None
        for old in (meta_path(self.path_prefix), idx_path(self.path_prefix)):
            if os.path.exists(old):
                os.remove(old)
        os.replace(self._tmp_bin, bin_path(self.path_prefix))
        os.replace(self._tmp_idx, idx_path(self.path_prefix))
        self._done = self.finalized = True

    def write_meta(self, **made_with) -> ShardMeta:
        """Write `PREFIX.meta.json` for the finalized pair: what it holds, counted while it was
        written, and `made_with` (the ShardMeta fields on the tokenizer and the tool)."""
        if not self.finalized:
            raise RuntimeError(f"{self.path_prefix}: metadata before the pair is finalized")
        meta = ShardMeta(num_documents=len(self._doc_ends) - 1, num_tokens=self.num_tokens,
                         max_id=self.max_id,
                         bin_bytes=os.path.getsize(bin_path(self.path_prefix)),
                         idx_bytes=os.path.getsize(idx_path(self.path_prefix)), **made_with)
        try:
            shard_meta.write_meta(self.path_prefix, meta)
        except OSError as e:
            raise output_error(e, meta_path(self.path_prefix)) from None
        return meta

    def abort(self) -> None:
        try:
            self._bin.close()
        except OSError:
            pass  # the error that brought us here is the one to report
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True


class IndexedDatasetReader:
    """A small memory-mapped reader for inspection and merging (training uses
    megatron-core's `IndexedDataset`). Checks that `.idx` and `.bin` sizes agree."""

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        path = idx_path(path_prefix)
        if not os.path.isfile(path) or not os.path.isfile(bin_path(path_prefix)):
            raise FileNotFoundError(f"{path_prefix}: needs both {path} and {bin_path(path_prefix)}")
        with open(path, "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:9] != _MAGIC:
            raise ValueError(f"{path} is not a Megatron index file (bad magic)")
        _, version, code, sequences, documents = _HEADER.unpack(header)
        if version != _VERSION or code not in _CODE_TO_DTYPE:
            raise ValueError(f"{path}: unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(_CODE_TO_DTYPE[code])
        expected = _HEADER.size + sequences * 12 + documents * 8
        if os.path.getsize(path) < expected:
            raise ValueError(f"{path} is truncated ({os.path.getsize(path)} < {expected} bytes)")
        offset = _HEADER.size
        self.sequence_lengths = np.memmap(path, np.int32, "r", offset, (sequences,))
        offset += sequences * 4
        self.sequence_pointers = np.memmap(path, np.int64, "r", offset, (sequences,))
        offset += sequences * 8
        self.document_indices = np.memmap(path, np.int64, "r", offset, (documents,))

        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        size = os.path.getsize(bin_path(path_prefix))
        if size != self.num_tokens * self.dtype.itemsize:
            raise ValueError(f"{bin_path(path_prefix)} has {size} bytes, the index describes "
                             f"{self.num_tokens * self.dtype.itemsize}")
        # numpy cannot map an empty file.
        self._tokens = (np.memmap(bin_path(path_prefix), self.dtype, "r") if size
                        else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return self.sequence_lengths.size

    @property
    def num_documents(self) -> int:
        return self.document_indices.size - 1

    def get(self, index: int) -> np.ndarray:
        """Sequence `index` as an array."""
        start = self.sequence_pointers[index] // self.dtype.itemsize
        return np.asarray(self._tokens[start:start + self.sequence_lengths[index]])

    def document(self, index: int) -> np.ndarray:
        """Document `index`: its sequences concatenated."""
        first, last = self.document_indices[index], self.document_indices[index + 1]
        return np.concatenate([self.get(i) for i in range(first, last)] or
                              [np.zeros(0, self.dtype)])
