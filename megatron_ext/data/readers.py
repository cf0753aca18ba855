"""Input files to chunks of records, and chunks to per-record texts.

The main process only splits files into chunks (cheap: raw lines, no JSON parsing); the
workers parse them with `chunk_texts`, so parsing is parallel too. Every record carries its
position ("FILE, line N"; "element N" for a JSON array, "row N" for Parquet) for errors.

Which files are read and how they are opened: ``megatron_ext.data.inputs``. Blank lines in
JSON-lines files are not records.
"""

import json
from dataclasses import dataclass
from typing import Iterator, Sequence, Tuple, Union

from megatron_ext.data.inputs import READ_ERRORS, InputError, file_format, open_input

# Small enough that progress is smooth and workers stay busy, large enough that a chunk's
# pickling and hand-off cost little next to tokenizing it.
CHUNK_RECORDS = 2048
CHUNK_BYTES = 1 << 20


@dataclass
class Chunk:
    path: str
    unit: str  # "line", "element" or "row": what `first` counts
    first: int  # 1-based number of items[0]
    kind: str  # "jsonl" and "txt": raw lines; "objects": parsed JSON; "rows": value tuples
    items: list
    nbytes: int  # input bytes the chunk stands for, for MB/s


def _unreadable(path: str, error: Exception, where: str = "") -> InputError:
    # A decoder's complaint (no errno) means the bytes are bad, not the file system.
    damaged = "" if getattr(error, "errno", None) else (
        "; the file is damaged or truncated: fix it or fetch it again")
    return InputError(f"{path}: unreadable{where}: {error}{damaged}")


def _lines(path: str) -> Iterator[Chunk]:
    kind = "txt" if file_format(path) == "txt" else "jsonl"
    items, nbytes, first = [], 0, 1
    line_no = 0
    try:
        with open_input(path) as f:
            for line in f:
                line_no += 1
                items.append(line)
                nbytes += len(line)
                if len(items) >= CHUNK_RECORDS or nbytes >= CHUNK_BYTES:
                    yield Chunk(path, "line", first, kind, items, nbytes)
                    items, nbytes, first = [], 0, line_no + 1
    except READ_ERRORS as e:
        raise _unreadable(path, e, f" after line {line_no}" if line_no else "") from None
    if items:
        yield Chunk(path, "line", first, kind, items, nbytes)


def _json_array(path: str) -> Iterator[Chunk]:
    try:
        with open_input(path) as f:
            elements = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}, line {e.lineno}: invalid JSON array ({e.msg}, column "
                         f"{e.colno}); an array cannot be read in part, so fix the file")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); an array "
                         "cannot be read in part, so fix the file") from None
    except READ_ERRORS as e:
        raise _unreadable(path, e) from None
    if not isinstance(elements, list):
        raise InputError(f"{path}: expected JSON lines or one JSON array")
    for start in range(0, len(elements), CHUNK_RECORDS):
        items = elements[start:start + CHUNK_RECORDS]
        # Approximate: the text's size, not the JSON syntax around it.
        nbytes = sum(len(str(x)) for x in items)
        yield Chunk(path, "element", start + 1, "objects", items, nbytes)


def _starts_with_bracket(path: str) -> bool:
    try:
        with open_input(path) as f:
            while True:
                block = f.read(4096)
                if not block:
                    return False
                stripped = block.lstrip()
                if stripped:
                    return stripped.startswith(b"[")
    except READ_ERRORS as e:
        raise _unreadable(path, e) from None


def _parquet(path: str, keys: Sequence[str]) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        missing = [k for k in keys if k not in parquet.schema_arrow.names]
        if missing:
            raise InputError(f"{path}: no column {', '.join(map(repr, missing))} for --json-keys "
                             f"(columns: {', '.join(parquet.schema_arrow.names)})")
        for batch in parquet.iter_batches(batch_size=CHUNK_RECORDS, columns=list(keys)):
            columns = [batch.column(k).to_pylist() for k in keys]
            items = list(zip(*columns))
            nbytes = sum(len(v) for v in columns[0] if isinstance(v, (str, bytes)))
            yield Chunk(path, "row", row + 1, "rows", items, nbytes)
            row += len(items)
    except InputError:
        raise
    except Exception as e:  # pyarrow raises several types for damaged files
        raise InputError(f"{path}, row {row + 1}: unreadable Parquet data ({e}); "
                         "--skip-invalid cannot skip a damaged file")


def read_chunks(path: str, keys: Sequence[str]) -> Iterator[Chunk]:
    fmt = file_format(path)
    if fmt == "parquet":
        return _parquet(path, keys)
    if fmt == "json" and _starts_with_bracket(path):
        return _json_array(path)
    return _lines(path)


def _strip_newline(line: str) -> str:
    if line.endswith("\n"):
        line = line[:-1]
    return line[:-1] if line.endswith("\r") else line


def _value(record, key: str) -> str:
    """The text of `key`, or raise a ValueError that says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"no key {key!r} (keys: {', '.join(map(str, record)) or 'none'})")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"key {key!r} is {type(value).__name__}, not a string")
    return value


def _has_lone_surrogate(value) -> bool:
    """Whether a parsed JSON value holds a lone surrogate: valid JSON (an escape such as
    "\\ud800", or raw surrogate bytes, which json's decoding lets through), but no text a
    tokenizer can take (`tokenizers` raises TypeError on it, beyond --skip-invalid's reach)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_has_lone_surrogate, value))
    return False


def json_records(chunk: Chunk) -> Iterator[Tuple[str, object]]:
    """Yield (location, record) per record of a "jsonl" or "objects" chunk, or (location,
    ValueError) for a line that is not JSON or not text. Blank lines are not records."""
    for i, item in enumerate(chunk.items):
        where = f"{chunk.path}, {chunk.unit} {chunk.first + i}"
        if chunk.kind == "objects":
            record = item
        elif not item.strip():
            continue
        else:
            try:
                record = json.loads(item)
            except json.JSONDecodeError as e:
                record = ValueError(f"malformed JSON ({e.msg}, column {e.colno})")
            except UnicodeDecodeError:
                record = ValueError("not valid UTF-8")
        if _has_lone_surrogate(record):
            record = ValueError("not valid UTF-8 (lone surrogate)")
        yield where, record


def chunk_texts(chunk: Chunk, keys: Sequence[str]) -> Iterator[Tuple[str, Union[list, str]]]:
    """Yield (location, [text per key]) per record, or (location, problem) for a bad one."""
    if chunk.kind in ("jsonl", "objects"):
        for where, record in json_records(chunk):
            try:
                if isinstance(record, ValueError):
                    raise record
                texts = [_value(record, k) for k in keys]
            except ValueError as e:
                yield where, str(e)
                continue
            yield where, texts
        return
    for i, item in enumerate(chunk.items):
        where = f"{chunk.path}, {chunk.unit} {chunk.first + i}"
        try:
            if chunk.kind == "txt":
                try:
                    texts = [_strip_newline(item.decode("utf-8"))]
                except UnicodeDecodeError as e:
                    raise ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})")
            else:
                texts = []
                for key, value in zip(keys, item):
                    if not isinstance(value, str):
                        kind = "null" if value is None else f"{type(value).__name__}"
                        raise ValueError(f"key {key!r} is {kind}, not a string")
                    texts.append(value)
        except ValueError as e:
            yield where, str(e)
            continue
        yield where, texts
