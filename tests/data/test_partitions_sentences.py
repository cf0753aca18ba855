"""preprocess_data.py --partitions and --split-sentences / --keep-newlines, from the command
line, read back with megatron-core's IndexedDataset."""

import json
import os
import re
import subprocess
import sys

import pytest

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")

DOCS = [f"document {i} " + "word " * (i % 7) for i in range(23)]


def _cli(repo_root, *args, env=None):
    return subprocess.run([sys.executable, "preprocess_data.py", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def _documents(prefix):
    """Each document as the list of its sequences (lists of ids)."""
    dataset = indexed_dataset.IndexedDataset(prefix)
    bounds = dataset.document_indices
    return [[dataset[s].tolist() for s in range(bounds[d], bounds[d + 1])]
            for d in range(len(bounds) - 1)]


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.mark.parametrize("partitions", [3, 30])  # more partitions than documents, too
def test_partitions_megatron_order_and_names(repo_root, tmp_path, partitions):
    source = _write(tmp_path / "in.jsonl", DOCS)
    out = tmp_path / "out"
    out.mkdir()
    common = ["--input", source, "--tokenizer-type", "ByteTokenizer", "--append-eod"]
    run = _cli(repo_root, *common, "--output-prefix", str(out / "part"),
               "--partitions", str(partitions), "--workers", "2")
    assert run.returncode == 0, run.stderr
    # Megatron-LM's final names only: no partition inputs or datasets are left behind.
    assert sorted(os.listdir(out)) == ["part_text_document.bin", "part_text_document.idx",
                                       "part_text_document.meta.json"]
    # Its round robin: line i went to partition i mod N, merged in partition order.
    expected = [DOCS[i] for p in range(partitions) for i in range(p, len(DOCS), partitions)]
    assert _documents(str(out / "part_text_document")) == [
        [list(t.encode()) + [256]] for t in expected]

    run = _cli(repo_root, *common, "--output-prefix", str(out / "seq"),
               "--partitions", str(partitions), "--keep-sequential-samples")
    assert run.returncode == 0, run.stderr
    assert _documents(str(out / "seq_text_document")) == [
        [list(t.encode()) + [256]] for t in DOCS]


def test_partitions_leave_nothing_on_failure(repo_root, tmp_path):
    source = _write(tmp_path / "in.jsonl", DOCS)
    with open(source, "a") as f:
        f.write("{broken\n")
    out = tmp_path / "out"
    run = _cli(repo_root, "--input", source, "--tokenizer-type", "ByteTokenizer",
               "--output-prefix", str(out / "part"), "--partitions", "4")
    assert run.returncode != 0 and re.search(r"in.jsonl\D+24\b", run.stderr)
    assert os.listdir(out) == []


@pytest.fixture(scope="session")
def nltk_data(tmp_path_factory):
    """A punkt model trained here and installed where NLTK looks (no download)."""
    punkt = pytest.importorskip("nltk.tokenize.punkt")
    root = tmp_path_factory.mktemp("nltk_data")
    text = " ".join(["Dr. Smith met Mr. Jones at 5 p.m. on Monday. They talked. It rained!"] * 40)
    directory = root / "tokenizers" / "punkt_tab" / "english"
    directory.mkdir(parents=True)
    import nltk

    nltk.data.path.insert(0, str(root))  # NLTK writes only under its data path
    try:
        punkt.save_punkt_params(punkt.PunktTrainer(text).get_params(), dir=str(directory))
    finally:
        nltk.data.path.remove(str(root))
    return str(root)


SENTENCE_DOCS = ["Dr. Smith went home. He slept.\nThen it rained!  Really?\n\nYes.",
                 "One sentence only", "", "Mr. Jones left. ?!"]


def test_split_sentences_against_nltk(repo_root, tmp_path, nltk_data, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer

    monkeypatch.setattr(nltk.data, "path", [nltk_data, *nltk.data.path])  # as NLTK_DATA does
    splitter = PunktTokenizer("english")
    source = _write(tmp_path / "in.jsonl", SENTENCE_DOCS)
    common = ["--input", source, "--tokenizer-type", "ByteTokenizer", "--append-eod",
              "--split-sentences"]
    run = _cli(repo_root, *common, "--output-prefix", str(tmp_path / "s"), "--workers", "2",
               env={"NLTK_DATA": nltk_data})
    assert run.returncode == 0, run.stderr
    assert not os.path.exists(tmp_path / "s_text_document.idx")

    def expected(sentences):
        ids = [list(s.encode()) for s in sentences if s]
        ids = ids or [[]]  # an empty document keeps its place
        ids[-1].append(256)  # EOD ends the document's last sentence
        return ids

    got = _documents(str(tmp_path / "s_text_sentence"))
    assert got == [expected(splitter.tokenize(t)) for t in SENTENCE_DOCS]
    assert len(got[0]) == 5

    # --keep-newlines: the whitespace between sentences stays, so they add up to the text.
    run = _cli(repo_root, *common, "--keep-newlines", "--partitions", "2",
               "--output-prefix", str(tmp_path / "k"), env={"NLTK_DATA": nltk_data})
    assert run.returncode == 0, run.stderr
    docs = _documents(str(tmp_path / "k_text_sentence"))
    order = [0, 2, 1, 3]  # two partitions
    for doc, i in zip(docs, order):
        assert bytes(sum(doc, [])[:-1]).decode() == SENTENCE_DOCS[i]
    assert [len(d) for d in docs][0] == 5


def test_split_sentences_without_punkt_data_is_a_clear_error(repo_root, tmp_path):
    pytest.importorskip("nltk")
    source = _write(tmp_path / "in.jsonl", SENTENCE_DOCS)
    empty = tmp_path / "no_nltk_data"
    empty.mkdir()
    run = _cli(repo_root, "--input", source, "--tokenizer-type", "ByteTokenizer",
               "--split-sentences", "--output-prefix", str(tmp_path / "s"),
               env={"NLTK_DATA": str(empty), "HOME": str(empty)})
    assert run.returncode != 0
    assert "--split-sentences --lang english: no punkt model" in run.stderr
    assert "python -m nltk.downloader punkt_tab" in run.stderr
    assert not [n for n in os.listdir(tmp_path) if n.startswith("s_")]
