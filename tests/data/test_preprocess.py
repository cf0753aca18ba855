"""preprocess_data.py end to end, read back with megatron-core's IndexedDataset."""

import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from megatron_ext.data import readers
from megatron_ext.data import preprocess as preprocess_module
from megatron_ext.data.preprocess import WorkerError, preprocess

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

NULL_DOCS = ["1 2 3", "", "69999 0 17", "42", " 5  6 "]


def read_back(prefix):
    """Every document of a dataset, as lists, through megatron-core's reader."""
    dataset = indexed_dataset.IndexedDataset(prefix)
    docs = [dataset[i].tolist() for i in range(len(dataset))]
    assert list(dataset.document_indices) == list(range(len(docs) + 1))
    return docs, dataset.index.dtype


@pytest.fixture(scope="session")
def reference(tokenizer_configs):
    """Token ids straight from each backend, independent of megatron_ext.tokenizer."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    def make(name):
        kind, model, _ = tokenizer_configs[name]
        if kind == "NullTokenizer":
            return lambda text: [int(t) for t in text.split()], 70000
        if kind == "ByteTokenizer":
            return lambda text: list(text.encode("utf-8")), 256
        if kind == "Llama2Tokenizer":  # Megatron's tokenize(text): bos=True, eos=False
            sp = spm.SentencePieceProcessor(model_file=model)
            return (lambda text: [sp.bos_id()] + sp.encode(text)), sp.eos_id()
        if "SentencePiece" in kind:
            sp = spm.SentencePieceProcessor(model_file=model)
            eod = sp.vocab_size() + 2 if kind == "SentencePieceTokenizer" else sp.eos_id()
            return sp.encode, eod
        path = model if model.endswith(".json") else os.path.join(model, "tokenizer.json")
        tok = Tokenizer.from_file(path)
        return (lambda text: tok.encode(text).ids), tok.token_to_id("<|endoftext|>")

    return {name: make(name) for name in tokenizer_configs}


def write_input(directory, fmt, texts, key="text", name="input"):
    records = [{key: t, "id": i} for i, t in enumerate(texts)]
    if fmt == "parquet":
        path = os.path.join(directory, f"{name}.parquet")
        pq.write_table(pa.table({key: texts, "id": list(range(len(texts)))}), path)
        return path
    path = os.path.join(directory, f"{name}.{fmt}")
    if fmt == "txt":
        assert not any("\n" in t or "\r" in t for t in texts)
        content = "".join(t + "\n" for t in texts)
    elif fmt == "json-array":
        path = os.path.join(directory, f"{name}.json")
        content = json.dumps(records, ensure_ascii=False, indent=1)
    else:
        content = "".join(json.dumps(r, ensure_ascii=fmt == "json") + "\n" for r in records)
    opener = gzip.open if fmt.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(content)
    return path


def run(tmp_path, inputs, config, **kwargs):
    kind, model, vocab = config
    prefix = str(tmp_path / "out" / "data")
    kwargs.setdefault("append_eod", True)
    kwargs.setdefault("log", io.StringIO())
    summary = preprocess(inputs if isinstance(inputs, list) else [inputs], prefix, kind, model,
                         vocab, **kwargs)
    return prefix, summary


@pytest.mark.parametrize("name", ["NullTokenizer", "ByteTokenizer", "SentencePieceTokenizer",
                                  "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                                  "HuggingFaceTokenizer-json", "PretrainedFromHF-dir"])
def test_every_tokenizer_round_trips(tmp_path, name, docs, tokenizer_configs, reference):
    texts = NULL_DOCS if name == "NullTokenizer" else docs
    encode, eod = reference[name]
    prefix, summary = run(tmp_path, write_input(str(tmp_path), "jsonl", texts),
                          tokenizer_configs[name])
    got, dtype = read_back(prefix + "_text_document")
    assert got == [encode(t) + [eod] for t in texts]
    assert dtype == (np.int32 if name == "NullTokenizer" else np.uint16)
    assert summary.read == summary.written == len(texts) and summary.skipped == 0
    assert summary.tokens["text"] == sum(map(len, got))
    assert summary.empty["text"] == sum(1 for t in texts if not encode(t))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json-array", "jsonl.gz", "parquet", "txt"])
def test_every_format_round_trips(tmp_path, fmt, docs, tokenizer_configs, reference):
    texts = [t for t in docs if "\n" not in t and "\r" not in t] if fmt == "txt" else docs
    encode, eod = reference["GPTSentencePieceTokenizer"]
    prefix, _ = run(tmp_path, write_input(str(tmp_path), fmt, texts),
                    tokenizer_configs["GPTSentencePieceTokenizer"])
    assert read_back(prefix + "_text_document")[0] == [encode(t) + [eod] for t in texts]


def test_directory_and_glob_read_files_in_sorted_order(tmp_path, docs, tokenizer_configs):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_input(str(data), "jsonl", docs[:4], name="b")
    write_input(str(data), "parquet", docs[4:7], name="a")
    write_input(str(data / "sub"), "jsonl.gz", docs[7:], name="c")
    (data / "README.md").write_text("not data")
    config = tokenizer_configs["ByteTokenizer"]
    expected = [list(t.encode()) + [256] for t in docs[4:7] + docs[:4] + docs[7:]]
    prefix, _ = run(tmp_path, str(data), config)
    assert read_back(prefix + "_text_document")[0] == expected
    prefix, _ = run(tmp_path, str(data / "**" / "*.json*"), config)
    assert read_back(prefix + "_text_document")[0] == [list(t.encode()) + [256]
                                                      for t in docs[:4] + docs[7:]]


def test_without_append_eod_empty_documents_stay_empty(tmp_path, tokenizer_configs):
    prefix, summary = run(tmp_path, write_input(str(tmp_path), "jsonl", ["ab", "", "c"]),
                          tokenizer_configs["ByteTokenizer"], append_eod=False)
    assert read_back(prefix + "_text_document")[0] == [[97, 98], [], [99]]
    assert summary.empty["text"] == 1 and summary.tokens["text"] == 3


def test_several_keys_write_aligned_datasets(tmp_path, tokenizer_configs):
    path = tmp_path / "in.jsonl"
    rows = [{"q": "a", "a": "bc"}, {"q": "d"}, {"q": "", "a": "e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix, summary = run(tmp_path, str(path), tokenizer_configs["ByteTokenizer"],
                          json_keys=["q", "a"], skip_invalid=True)
    assert read_back(prefix + "_q_document")[0] == [[97, 256], [256]]
    assert read_back(prefix + "_a_document")[0] == [[98, 99, 256], [101, 256]]
    assert (summary.read, summary.written, summary.skipped) == (3, 2, 1)


def test_workers_keep_input_order(tmp_path, monkeypatch, tokenizer_configs):
    monkeypatch.setattr(readers, "CHUNK_RECORDS", 7)  # many chunks, finishing out of order
    texts = [" ".join(str((i * 31 + j) % 70000) for j in range(i % 50)) for i in range(500)]
    path = write_input(str(tmp_path), "jsonl", texts)
    config = tokenizer_configs["NullTokenizer"]
    prefix, _ = run(tmp_path, path, config, workers=3)
    assert read_back(prefix + "_text_document")[0] == [
        [int(t) for t in text.split()] + [70000] for text in texts]
    single = str(tmp_path / "single" / "data")
    preprocess([path], single, *config, append_eod=True, workers=1, log=io.StringIO())
    for ext in (".bin", ".idx"):
        with open(prefix + "_text_document" + ext, "rb") as a, \
                open(single + "_text_document" + ext, "rb") as b:
            assert a.read() == b.read()


def test_a_killed_worker_stops_the_run_with_nothing_written(tmp_path, monkeypatch,
                                                            tokenizer_configs):
    """A worker lost mid-way (the kernel's OOM killer, a signal): multiprocessing.Pool replaces
    it and would wait forever for the chunk it held; the run stops naming --workers instead."""
    monkeypatch.setattr(readers, "CHUNK_RECORDS", 7)
    tokenize = preprocess_module._tokenize

    def killed_on_marker(tokenizer, texts, bad):  # forked workers inherit the patched module
        if "999" in texts:
            os.kill(os.getpid(), signal.SIGKILL)
        return tokenize(tokenizer, texts, bad)

    monkeypatch.setattr(preprocess_module, "_tokenize", killed_on_marker)
    texts = [str(i) for i in range(200)] + ["999"] + [str(i) for i in range(50)]
    path = write_input(str(tmp_path), "jsonl", texts)
    with pytest.raises(WorkerError, match="a --workers process died"):
        run(tmp_path, path, tokenizer_configs["NullTokenizer"], workers=2)
    assert os.listdir(tmp_path / "out") == []
    # The same input with no worker killed goes through.
    monkeypatch.setattr(preprocess_module, "_tokenize", tokenize)
    prefix, _ = run(tmp_path, path, tokenizer_configs["NullTokenizer"], workers=2)
    assert read_back(prefix + "_text_document")[0] == [[int(t), 70000] for t in texts]


LONE_SURROGATE = "not valid UTF-8 (lone surrogate)"
BAD_CASES = {
    # name: (file name, content, the message after the path, skippable)
    "malformed-json": ("in.jsonl", '{"text": "ok"}\n{"text": "broken\n{"text": "x"}\n',
                       ", line 2: malformed JSON", True),
    "missing-key": ("in.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', ", line 3: no key 'text'",
                    True),
    "non-string": ("in.jsonl", '{"text": "ok"}\n{"text": 12}\n', ", line 2: key 'text' is int",
                   True),
    "not-an-object": ("in.json", '{"text": "ok"}\n["text"]\n',
                      ", line 2: expected a JSON object", True),
    "array-element": ("in.json", '[{"text": "ok"}, {"text": null}]',
                      ", element 2: key 'text' is NoneType", True),
    "bad-utf8-txt": ("in.txt", b"ok\n\xff\xfe bad\n", ", line 2: not valid UTF-8", True),
    # Valid JSON, but no text: an escaped lone surrogate, or its raw (CESU-8) bytes.
    "lone-surrogate": ("in.jsonl", '{"text": "ok"}\n{"text": "bad \\ud800"}\n',
                       f", line 2: {LONE_SURROGATE}", True),
    "lone-surrogate-bytes": ("in.jsonl", b'{"text": "ok"}\n{"text": "\xed\xa0\x80"}\n',
                             f", line 2: {LONE_SURROGATE}", True),
    "lone-surrogate-key": ("in.jsonl", '{"text": "ok"}\n{"text": "x", "\\udfff": 1}\n',
                           f", line 2: {LONE_SURROGATE}", True),
    "lone-surrogate-array": ("in.json", '[{"text": "ok"}, {"text": "\\udc00"}]',
                             f", element 2: {LONE_SURROGATE}", True),
    "null-ids": ("in.jsonl", '{"text": "5"}\n{"text": "1 x 2"}\n',
                 ", line 2: 'x' is not an integer token id", True),
    "truncated-gzip": ("in.jsonl.gz", gzip.compress(b'{"text": "ok"}\n' * 100)[:-20],
                       ": unreadable after line", False),
    "truncated-gzip-array": ("in.json.gz",
                             gzip.compress(b"[" + b'{"text": "ok"},\n' * 100 + b"{}]")[:-20],
                             ": unreadable: Compressed file ended", False),
    "not-gzip": ("in.json.gz", '[{"text": "ok"}]', ": unreadable: Not a gzipped file", False),
    "not-gzip-lines": ("in.jsonl.gz", '{"text": "ok"}\n', ": unreadable: Not a gzipped file",
                       False),
    "broken-array": ("in.json", '[{"text": "ok"},\n {"text": ]', ", line 2: invalid JSON array",
                     False),
    "bad-utf8-array": ("in.json", b'[{"text": "ok"},\n {"text": "\xff"}]',
                       ": not valid UTF-8 (invalid start byte at byte 28)", False),
    "bad-parquet": ("in.parquet", b"PAR1 this is not parquet PAR1",
                    ", row 1: unreadable Parquet", False),
}


def _write_bad(tmp_path, case):
    name, content, _, _ = BAD_CASES[case]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_stops_naming_file_and_record(tmp_path, case):
    path = _write_bad(tmp_path, case)
    _, _, where, skippable = BAD_CASES[case]
    kind = "NullTokenizer" if case == "null-ids" else "ByteTokenizer"
    with pytest.raises(readers.InputError) as error:
        run(tmp_path, path, (kind, None, 1000))
    assert str(error.value).startswith(f"{path}{where}")
    assert ("--skip-invalid to skip" in str(error.value)) == skippable
    assert os.listdir(tmp_path / "out") == []  # no output, not even temporary files


@pytest.mark.parametrize("case", [c for c in BAD_CASES if BAD_CASES[c][3]])
def test_skip_invalid_skips_and_counts(tmp_path, case):
    path = _write_bad(tmp_path, case)
    kind = "NullTokenizer" if case == "null-ids" else "ByteTokenizer"
    log = io.StringIO()
    prefix, summary = run(tmp_path, path, (kind, None, 1000), skip_invalid=True, log=log)
    assert log.getvalue().startswith(f"skipped {path}{BAD_CASES[case][2]}")
    docs = read_back(prefix + "_text_document")[0]
    assert summary.skipped == 1
    assert summary.read == summary.written + summary.skipped == len(docs) + 1
    assert docs[0] == ([5, 1000] if kind == "NullTokenizer" else [111, 107, 256])


@pytest.mark.parametrize("name", ["HuggingFaceTokenizer-json", "GPTSentencePieceTokenizer"])
def test_lone_surrogate_is_a_skippable_record_error_for_every_backend(tmp_path, name,
                                                                      tokenizer_configs,
                                                                      reference):
    """`tokenizers` raises TypeError on a lone surrogate: the reader must stop it first."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "bad \\ud800"}\n{"text": "fine"}\n')
    with pytest.raises(readers.InputError,
                       match=rf"in.jsonl, line 2: {re.escape(LONE_SURROGATE)}"):
        run(tmp_path, str(path), tokenizer_configs[name])
    prefix, summary = run(tmp_path, str(path), tokenizer_configs[name], skip_invalid=True)
    encode, eod = reference[name]
    assert read_back(prefix + "_text_document")[0] == [encode("ok") + [eod],
                                                      encode("fine") + [eod]]
    assert (summary.read, summary.skipped) == (3, 1)


def test_parquet_rows_and_columns(tmp_path, tokenizer_configs):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"text": ["a", None, "b"], "n": [1, 2, 3]}), path)
    with pytest.raises(readers.InputError, match=r"in.parquet, row 2: key 'text' is null"):
        run(tmp_path, path, tokenizer_configs["ByteTokenizer"])
    prefix, summary = run(tmp_path, path, tokenizer_configs["ByteTokenizer"], skip_invalid=True)
    assert read_back(prefix + "_text_document")[0] == [[97, 256], [98, 256]]
    with pytest.raises(readers.InputError, match=r"row 1: key 'n' is int"):
        run(tmp_path, path, tokenizer_configs["ByteTokenizer"], json_keys=["n"])
    with pytest.raises(readers.InputError, match=r"no column 'body'.*columns: text, n"):
        run(tmp_path, path, tokenizer_configs["ByteTokenizer"], json_keys=["body"])


def test_configuration_errors_come_before_any_file(tmp_path, tokenizer_configs):
    good = write_input(str(tmp_path), "jsonl", ["a"])
    with pytest.raises(ValueError, match="--tokenizer-model"):
        run(tmp_path, good, ("GPTSentencePieceTokenizer", str(tmp_path / "none.model"), None))
    with pytest.raises(ValueError, match="--input .*no .*files found"):
        run(tmp_path, str(tmp_path / "missing*.jsonl"), tokenizer_configs["ByteTokenizer"])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="--input .*unsupported file type"):
        run(tmp_path, str(tmp_path / "x.csv"), tokenizer_configs["ByteTokenizer"])
    with pytest.raises(ValueError, match="--json-keys: .txt input"):
        run(tmp_path, write_input(str(tmp_path), "txt", ["a"]),
            tokenizer_configs["ByteTokenizer"], json_keys=["a", "b"])
    assert not (tmp_path / "out").exists()


def _cli(repo_root, *args):
    return subprocess.run([sys.executable, os.path.join(repo_root, "preprocess_data.py"), *args],
                          capture_output=True, text=True, cwd=repo_root)


def test_cli_workers_progress_summary_and_no_torch(tmp_path, repo_root, sp_model, small_corpus):
    out = str(tmp_path / "cli")
    code = ("import runpy, sys; sys.argv = sys.argv[1:];"
            "runpy.run_path(sys.argv[0], run_name='__main__');"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', "
            "'transformers')]; print('HEAVY', heavy)")
    result = subprocess.run(
        [sys.executable, "-c", code, "preprocess_data.py", "--input", small_corpus,
         "--output-prefix", out, "--tokenizer-type", "GPTSentencePieceTokenizer",
         "--tokenizer-name-or-path", sp_model, "--append-eod", "--workers", "2",
         "--log-interval", "10"], capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    progress = [line for line in result.stderr.splitlines() if line.startswith("processed")]
    assert progress and all("docs/s" in p and "MB/s" in p and "tokens/s" in p for p in progress)
    assert "done:" in result.stderr and "0 skipped" in result.stderr
    with open(small_corpus) as f:
        texts = [json.loads(line)["text"] for line in f]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert read_back(out + "_text_document")[0] == [sp.encode(t) + [sp.eos_id()] for t in texts]


def test_cli_errors(tmp_path, repo_root):
    result = _cli(repo_root, "--input", "x.jsonl", "--output-prefix", "o",
                  "--tokenizer-type", "ByteTokenizer", "--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in result.stderr
    result = _cli(repo_root, "--input", str(tmp_path), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer-type", "NullTokenizer")
    assert result.returncode == 1 and "--vocab-size" in result.stderr
    assert os.listdir(tmp_path) == []


def test_first_bad_record_is_reported_whatever_found_it(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "1"}\n{"text": "2 x"}\n{"text": \n')
    with pytest.raises(readers.InputError, match=r"in.jsonl, line 2: 'x' is not an integer"):
        run(tmp_path, str(path), ("NullTokenizer", None, 10))
