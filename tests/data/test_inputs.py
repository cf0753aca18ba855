"""preprocess_data.py on what users feed it: compressed and oddly named corpora, directories
with other files, a file given twice, nothing to write, stale temporaries of a killed run, a
full disk and an output path through a file. Shards are read back with megatron-core."""

import bz2
import gzip
import io
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_ext.data import indexed, inputs
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.data.merge import merge_datasets
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.readers import InputError

zstandard = pytest.importorskip("zstandard")  # in the dev extra (setup.py)
indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")

BYTE = ("ByteTokenizer", None, None)


def _lines(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def _zstd_frames(data: bytes) -> bytes:
    """Two frames, as parallel compressors (pzstd, zstd -T) write them."""
    half = len(data) // 2
    compressor = zstandard.ZstdCompressor()
    return compressor.compress(data[:half]) + compressor.compress(data[half:])


COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "zst": _zstd_frames}


def _run(tmp_path, given, **kwargs):
    prefix = str(tmp_path / "out" / "data")
    kwargs.setdefault("log", io.StringIO())
    summary = preprocess(given, prefix, *BYTE, append_eod=True, **kwargs)
    return prefix + "_text_document", summary


def _read(prefix):
    dataset = indexed_dataset.IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _cli(repo_root, *args):
    return subprocess.run([sys.executable, "preprocess_data.py", *args], cwd=repo_root,
                          capture_output=True, text=True)


def test_compressed_ndjson_and_any_case_suffixes_are_read_and_the_rest_reported(
        tmp_path, docs, repo_root):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    files = {"A.JSONL": _lines(docs[:2]), "b.ndjson": _lines(docs[2:4]),
             "c.jsonl.bz2": bz2.compress(_lines(docs[4:6])),
             "d.json.xz": lzma.compress(json.dumps([{"text": t} for t in docs[6:8]]).encode()),
             "sub/e.Txt.zst": _zstd_frames("".join(f"{i} line\n" for i in range(50)).encode()),
             "sub/f.JSONL.GZ": gzip.compress(_lines(docs[8:]))}
    ignored = {"README.md": b"about", "sub/notes.csv": b"a,b", "sub/g.parquet.gz": b"",
               ".hidden": b""}
    for name, content in {**files, **ignored}.items():
        (data / name).write_bytes(content)
    prefix, summary = _run(tmp_path, [str(data)])
    texts = docs[:8] + [f"{i} line" for i in range(50)] + docs[8:]
    assert _read(prefix) == [list(t.encode()) + [256] for t in texts]
    listed = ", ".join(sorted(str(data / n) for n in ignored))
    assert summary.ignored == (f"ignored 4 file(s) of unsupported type in --input "
                               f"directories/globs: {listed}")
    assert summary.report().endswith("\n" + summary.ignored)
    # A glob does not walk the directories it matches: sub/ is reported, unless ** reads it.
    _, summary = _run(tmp_path, [str(data / "*")])
    assert summary.ignored.splitlines()[1] == (
        f"ignored 1 director(y/ies) matched by --input globs, whose files no --input reads "
        f"(name a directory without a glob to read it): {data / 'sub'}")
    _, summary = _run(tmp_path, [str(data / "**")])
    assert len(summary.ignored.splitlines()) == 1
    assert "matched by --input globs" not in summary.ignored
    with pytest.raises(InputError, match=r"no .* files found \(0 other file\(s\) and 1 "
                       r"director\(y/ies\) there; a glob does not walk"):
        _run(tmp_path, [str(tmp_path / "d*")])
    # the same from the command line, where the user reads it
    result = _cli(repo_root, "--input", str(data / "sub" / "*"), "--output-prefix",
                  str(tmp_path / "cli"), "--tokenizer-type", "ByteTokenizer")
    assert result.returncode == 0, result.stderr
    assert (f"ignored 2 file(s) of unsupported type in --input directories/globs: "
            f"{data / 'sub' / 'g.parquet.gz'}, {data / 'sub' / 'notes.csv'}") in result.stderr
    assert len(_read(str(tmp_path / "cli_text_document"))) == 50 + len(docs[8:])


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_truncated_compressed_file_is_an_error_naming_it(tmp_path, kind):
    texts = [f"document {i} " + "x" * (i % 97) for i in range(3000)]
    whole = COMPRESS[kind](_lines(texts))
    path = tmp_path / f"cut.jsonl.{kind}"
    path.write_bytes(whole[:len(whole) * 2 // 3])
    with pytest.raises(InputError, match=rf"{path}: unreadable( after line \d+)?: .*ended before"
                       ".*; the file is damaged or truncated: fix it or fetch it again"):
        _run(tmp_path, [str(path)])
    assert os.listdir(tmp_path / "out") == []


def test_zst_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(_zstd_frames(_lines(["a"])))
    monkeypatch.setattr(inputs, "zstandard", None)
    with pytest.raises(InputError, match=rf"--input {path}: reading .zst files needs the "
                       "zstandard package: pip install zstandard"):
        _run(tmp_path, [str(tmp_path)])
    assert not (tmp_path / "out").exists()


def test_a_file_given_twice_is_an_error_naming_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    a, b = data / "a.jsonl", data / "b.jsonl"
    a.write_bytes(_lines(["one"]))
    b.write_bytes(_lines(["two"]))
    os.symlink(a, tmp_path / "link.jsonl")
    for given, named, first in [
            ([str(a), str(a)], a, a),  # directly
            ([str(data), str(b)], b, data),  # a directory and a file in it
            ([str(data / "*.jsonl"), str(data / "[ab].jsonl")], a, data / "*.jsonl"),  # globs
            ([str(a), str(tmp_path / "link.jsonl")], tmp_path / "link.jsonl", a)]:  # a link
        with pytest.raises(InputError, match=rf"{named} is also reached by --input "
                           rf"{str(first).replace('[', '.').replace('*', '.')}; the same file "
                           "would be read twice"):
            _run(tmp_path, given)
    assert not (tmp_path / "out").exists()


# megatron-core's IndexedDataset.__del__ trips over its own failed __init__.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_nothing_to_write_is_an_error_and_writes_nothing(tmp_path):
    # Why not write it: megatron-core cannot open a shard without tokens.
    with IndexedDatasetWriter(str(tmp_path / "empty"), np.uint16) as writer:
        writer.add_document([])
    with pytest.raises(ValueError, match="cannot mmap an empty file"):
        indexed_dataset.IndexedDataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="the datasets hold no tokens"):
        merge_datasets([str(tmp_path / "empty")], str(tmp_path / "merged"))

    cases = {"empty.jsonl": (b"", "0 documents read, 0 skipped, 0 written"),
             "blank.jsonl": (b"\n  \n\n", "0 documents read, 0 skipped, 0 written"),
             "bad.jsonl": (b'{"x": 1}\n[]\n', "2 documents read, 2 skipped, 0 written")}
    for name, (content, counts) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=rf"--input {tmp_path / name}: nothing to write "
                           rf"\({counts}\); a shard without tokens cannot be read"):
            _run(tmp_path, [str(tmp_path / name)], skip_invalid=True)
    (tmp_path / "void.jsonl").write_bytes(_lines(["", ""]))
    with pytest.raises(InputError, match=r"2 written, all empty \(--append-eod would give"):
        preprocess([str(tmp_path / "void.jsonl")], str(tmp_path / "out" / "v"), *BYTE,
                   log=io.StringIO())
    assert os.listdir(tmp_path / "out") == []


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, repo_root):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead = finished.pid
    out = tmp_path / "out"
    out.mkdir()
    prefix = out / "data_text_document"
    stale = [f"{prefix}.bin.tmp-{dead}-0123abcd", f"{prefix}.idx.tmp-{dead}-0123abcd",
             f"{prefix}.meta.json.tmp-{dead}"]
    kept = [f"{prefix}.bin.tmp-1-0123abcd",  # pid 1 is alive: a run writing right now
            f"{out}/other_text_document.bin.tmp-{dead}-0123abcd"]  # another prefix
    for path in stale + kept:
        open(path, "wb").close()
    (tmp_path / "in.jsonl").write_bytes(_lines(["a", "b"]))
    result = _cli(repo_root, "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                  str(out / "data"), "--tokenizer-type", "ByteTokenizer")
    assert result.returncode == 0, result.stderr
    for path in stale:
        assert not os.path.exists(path)
        assert (f"removed {path}: a temporary file of an earlier run (pid {dead}) that did "
                "not finish") in result.stderr
    assert all(os.path.exists(path) for path in kept)
    assert _read(str(prefix)) == [[97], [98]]


@pytest.mark.parametrize("suffix,docs", [
    ("bin", 200),  # while writing tokens
    ("bin", 1),  # with the last buffered bytes, at finalize
    ("idx", 200)])  # while writing the index
def test_a_full_disk_names_the_file_and_the_way_out(tmp_path, monkeypatch, suffix, docs):
    """ENOSPC from the kernel: one of the writer's temporary files is a link to /dev/full."""
    class FixedHex:
        hex = "0123abcd" * 4

    monkeypatch.setattr(indexed.uuid, "uuid4", lambda: FixedHex)
    (tmp_path / "out").mkdir()
    full = f"{tmp_path}/out/data_text_document.{suffix}.tmp-{os.getpid()}-0123abcd"
    os.symlink("/dev/full", full)
    (tmp_path / "in.jsonl").write_bytes(_lines(["a" * 100] * docs))
    with pytest.raises(OSError, match=rf"^{full}: No space left on device; free space there "
                       "or give an --output-prefix on another file system$"):
        _run(tmp_path, [str(tmp_path / "in.jsonl")])
    assert os.listdir(tmp_path / "out") == []


def test_a_full_file_system_from_the_command_line(tmp_path, repo_root):
    """The same on a real 64 KiB tmpfs (needs root and mount rights; skipped without)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root or no mount rights)")
    try:
        (tmp_path / "in.jsonl").write_bytes(_lines(["b" * 1000] * 100))
        result = _cli(repo_root, "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                      str(mount / "data"), "--tokenizer-type", "ByteTokenizer")
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: {mount}/data_text_document.bin.tmp-")
        assert result.stderr.endswith(": No space left on device; free space there or give an "
                                      "--output-prefix on another file system\n")
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_an_output_prefix_through_a_file_names_it(tmp_path, repo_root):
    (tmp_path / "in.jsonl").write_bytes(_lines(["a"]))
    (tmp_path / "corpus.txt").write_text("a file")
    result = _cli(repo_root, "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                  str(tmp_path / "corpus.txt" / "sub" / "data"), "--tokenizer-type",
                  "ByteTokenizer")
    assert result.returncode == 1
    assert result.stderr == (f"error: --output-prefix {tmp_path}/corpus.txt/sub/data: "
                             f"{tmp_path}/corpus.txt is a file, not a directory; move it away "
                             "or give another --output-prefix\n")
