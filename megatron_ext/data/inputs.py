"""Which files ``--input`` names, and how to open them.

A file's format is its suffix, in any case: ``.jsonl`` or ``.ndjson`` (JSON lines), ``.json``
(JSON lines, or one JSON array), ``.txt`` (one document per line), each optionally compressed
(``.gz``, ``.bz2``, ``.xz``, or ``.zst`` with the ``zstandard`` package), and ``.parquet``.
Directories are walked and globs expanded, each sorted; what they hold that is not read is
reported (``InputFiles.ignored``), and a file reached twice is an error.
"""

import bz2
import glob
import gzip
import io
import lzma
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

try:  # optional: only .zst inputs need it
    import zstandard
except ImportError:
    zstandard = None

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".txt": "txt",
           ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
DESCRIPTION = ".jsonl, .ndjson, .json, .txt (each optionally .gz, .bz2, .xz or .zst), .parquet"
ZSTD_HINT = "reading .zst files needs the zstandard package: pip install zstandard"


class InputError(ValueError):
    """Bad input data; the message names the file and record."""


def _split(path: str):
    name = path.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if compression:
        name = name[:-len(compression)]
    return os.path.splitext(name)[1], compression


def file_format(path: str) -> Optional[str]:
    """"jsonl", "json", "txt" or "parquet" for a supported file name, else None."""
    suffix, compression = _split(path)
    fmt = FORMATS.get(suffix)
    return None if fmt == "parquet" and compression else fmt


# What reading a damaged or truncated file raises (gzip.BadGzipFile and bz2's errors are
# OSErrors; a truncated stream is an EOFError).
READ_ERRORS = (OSError, EOFError, lzma.LZMAError) + ((zstandard.ZstdError,) if zstandard else ())


class _ZstdReader(io.RawIOBase):
    """A .zst file's content across all its frames. zstandard's own ``stream_reader`` stops
    silently at a truncated frame (a cut download would lose its tail without a word); this
    raises EOFError there, as gzip, bz2 and lzma do."""

    def __init__(self, path: str):
        self._file = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._in_frame = False
        self._pending, self._offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset >= len(self._pending):
            block = self._file.read(1 << 20)
            if not block:
                if self._in_frame:
                    raise EOFError("compressed file ended before the end of its zstd frame")
                return 0
            self._pending, self._offset = self._decompress(block), 0
        count = min(len(buffer), len(self._pending) - self._offset)
        buffer[:count] = self._pending[self._offset:self._offset + count]
        self._offset += count
        return count

    def _decompress(self, block: bytes) -> bytes:
        out = []
        while block:
            self._in_frame = True
            out.append(self._frame.decompress(block))
            block = b""
            if self._frame.eof:  # the next frame starts in what this one did not use
                block = self._frame.unused_data
                self._frame, self._in_frame = self._dctx.decompressobj(), False
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def open_input(path: str):
    """``path`` opened for binary reading, decompressed by its suffix."""
    compression = _split(path)[1]
    if compression == ".zst":
        if zstandard is None:
            raise InputError(f"{path}: {ZSTD_HINT}")
        return io.BufferedReader(_ZstdReader(path), 1 << 16)
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(compression, open)
    return opener(path, "rb")


@dataclass
class InputFiles:
    files: List[str]  # to read, in order
    ignored: List[str] = field(default_factory=list)  # in directories and globs, not read
    unwalked: List[str] = field(default_factory=list)  # directories globs matched, not read

    def ignored_report(self) -> str:
        """The summary's line about what was not read ("" when nothing)."""
        parts = []
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} file(s) of unsupported type in --input "
                         f"directories/globs: {', '.join(self.ignored)}")
        if self.unwalked:
            parts.append(f"ignored {len(self.unwalked)} director(y/ies) matched by --input "
                         "globs, whose files no --input reads (name a directory without a "
                         f"glob to read it): {', '.join(self.unwalked)}")
        return "\n".join(parts)


def expand_inputs(inputs: Sequence[str]) -> InputFiles:
    """Files for ``--input`` values: files, directories (recursive) and globs, in the order
    given, each directory or glob sorted. An unsupported file named outright, a directory or
    glob with nothing to read, and a file reached twice (compared by real path) are errors."""
    files, ignored, given_as, glob_dirs = [], [], {}, []
    for pattern in inputs:
        if os.path.isfile(pattern):
            if file_format(pattern) is None:
                raise InputError(f"--input {pattern}: unsupported file type; expected "
                                 f"{DESCRIPTION}")
            found = [pattern]
        else:
            if os.path.isdir(pattern):
                dirs = []
                found = sorted(os.path.join(d, f) for d, _, names in os.walk(pattern)
                               for f in names)
            else:
                matches = glob.glob(pattern, recursive=True)
                dirs = [p for p in matches if os.path.isdir(p)]
                found = sorted(p for p in matches if os.path.isfile(p))
            skipped = [p for p in found if file_format(p) is None]
            found = [p for p in found if file_format(p) is not None]
            if not found:
                what = (f" ({len(skipped)} other file(s) and {len(dirs)} director(y/ies) "
                        "there; a glob does not walk the directories it matches)")
                raise InputError(f"--input {pattern}: no {DESCRIPTION} files found{what}")
            ignored.extend(skipped)
            glob_dirs.extend(dirs)
        for path in found:
            real = os.path.realpath(path)
            if real in given_as:
                raise InputError(
                    f"--input {pattern}: {path} is also reached by --input {given_as[real]}; "
                    "the same file would be read twice: name each file once")
            given_as[real] = pattern
            files.append(path)
    # A directory a glob matches is not walked (``**`` reaches into it already, and the files
    # would be read twice); it is reported when no file below it is read.
    read_dirs = set()
    for real in given_as:
        while real not in ("", os.sep) and os.path.dirname(real) not in read_dirs:
            real = os.path.dirname(real)
            read_dirs.add(real)
    unwalked = [d for d in sorted(set(glob_dirs)) if os.path.realpath(d) not in read_dirs]
    if zstandard is None:
        zst = next((p for p in files if _split(p)[1] == ".zst"), None)
        if zst is not None:
            raise InputError(f"--input {zst}: {ZSTD_HINT}")
    return InputFiles(files, ignored, unwalked)


def check_keys_fit(files: Sequence[str], keys: Sequence[str]) -> None:
    if len(keys) > 1 and any(file_format(p) == "txt" for p in files):
        raise InputError("--json-keys: .txt input has one text per line, give a single key")
