"""PREFIX.meta.json beside every pair preprocess_data.py writes, checked against what
megatron-core's IndexedDataset reads back and against each tokenizer's own backend."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import megatron_ext
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.data.merge import merge_datasets
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.readers import InputError
from megatron_ext.data.shard_meta import read_meta
from tests.shard_reference import assert_meta_matches

TOOL = f"megatron-ext {megatron_ext.__version__} preprocess_data.py"


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _made_with(kind, model):
    """(vocab size, EOD) from the backend itself, not from megatron_ext.tokenizer."""
    if kind == "NullTokenizer":
        return 70001, 70000
    if kind == "GPTSentencePieceTokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=model)
        return sp.vocab_size(), sp.eos_id()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(model)
    return tok.get_vocab_size(with_added_tokens=True), tok.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("name,append_eod", [("NullTokenizer", True),
                                             ("GPTSentencePieceTokenizer", True),
                                             ("HuggingFaceTokenizer-json", False)])
def test_every_key_gets_metadata_that_megatron_core_confirms(tmp_path, tokenizer_configs, docs,
                                                              name, append_eod):
    kind, model, vocab = tokenizer_configs[name]
    texts = ["1 2 3", "", "69999 0 17", "42"] if kind == "NullTokenizer" else docs
    records = [{"text": t, "other": " ".join(t.split()[::-1])} for t in texts]
    prefix = str(tmp_path / "out" / "data")
    preprocess([_jsonl(tmp_path / "in.jsonl", records)], prefix, kind, model, vocab,
               json_keys=["text", "other"], append_eod=append_eod, log=io.StringIO())
    vocab_size, eod = _made_with(kind, model)
    for key in ("text", "other"):
        meta = assert_meta_matches(f"{prefix}_{key}_document")
        assert (meta.tokenizer_type, meta.tokenizer_model, meta.vocab_size, meta.eod,
                meta.eod_appended, meta.tool) == (kind, model, vocab_size, eod, append_eod, TOOL)
        assert meta.num_documents == len(texts)


def _shard(tmp_path, name, texts, config, append_eod=True):
    kind, model, vocab = config
    prefix = str(tmp_path / name)
    preprocess([_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in texts])], prefix, kind,
               model, vocab, append_eod=append_eod, log=io.StringIO())
    return prefix + "_text_document"


def test_merge_keeps_the_tokenizer_its_inputs_agree_on(tmp_path, tokenizer_configs, docs):
    sp = tokenizer_configs["GPTSentencePieceTokenizer"]
    a, b = _shard(tmp_path, "a", docs[:5], sp), _shard(tmp_path, "b", docs[5:], sp)
    log = io.StringIO()
    merge_datasets([a, b], str(tmp_path / "m"), log=log)
    merged, first = assert_meta_matches(str(tmp_path / "m")), read_meta(a)
    assert (merged.tokenizer_type, merged.tokenizer_model, merged.vocab_size, merged.eod,
            merged.eod_appended) == (first.tokenizer_type, first.tokenizer_model,
                                     first.vocab_size, first.eod, True)
    assert merged.num_documents == read_meta(a).num_documents + read_meta(b).num_documents
    assert merged.tool == TOOL + " --merge" and "note" not in log.getvalue()

    # A ByteTokenizer shard is uint16 too, so it merges; but the tokenizers differ.
    byte = _shard(tmp_path, "c", docs[:3], tokenizer_configs["ByteTokenizer"], append_eod=False)
    log = io.StringIO()
    merge_datasets([a, byte], str(tmp_path / "mixed"), log=log)
    mixed = assert_meta_matches(str(tmp_path / "mixed"))
    assert (mixed.tokenizer_type, mixed.tokenizer_model, mixed.vocab_size, mixed.eod,
            mixed.eod_appended) == (None,) * 5
    assert "the inputs differ in tokenizer_type, tokenizer_model, vocab_size, eod" in log.getvalue()

    # An input without metadata (Megatron-LM's tool), or with metadata of another pair.
    os.remove(b + ".meta.json")
    log = io.StringIO()
    merge_datasets([a, b], str(tmp_path / "m"), log=log)
    assert assert_meta_matches(str(tmp_path / "m")).tokenizer_type is None
    assert f"{b}: no metadata, so the merged one names no tokenizer" in log.getvalue()
    os.replace(a + ".meta.json", b + ".meta.json")
    _shard(tmp_path, "a", docs[:5], sp)
    log = io.StringIO()
    merge_datasets([a, b], str(tmp_path / "m"), log=log)
    assert assert_meta_matches(str(tmp_path / "m")).tokenizer_type is None
    assert f"{b}.meta.json describes another pair (its sizes differ)" in log.getvalue()


def test_metadata_never_describes_another_pair(tmp_path, tokenizer_configs, docs):
    config = tokenizer_configs["ByteTokenizer"]
    prefix = _shard(tmp_path, "d", docs, config)
    before = assert_meta_matches(prefix)
    # A failed run on the same prefix leaves the old pair and its metadata as they were.
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(InputError, match="no key 'text'"):
        preprocess([bad], str(tmp_path / "d"), *config, log=io.StringIO())
    assert assert_meta_matches(prefix) == before
    # A new pair replaces the old one: the old metadata goes with it, before the new pair
    # appears, and only the caller that wrote the pair writes new metadata.
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
    assert read_meta(prefix) is None
    writer.write_meta(tool="test")
    assert assert_meta_matches(prefix).num_tokens == 3
    unfinished = IndexedDatasetWriter(prefix, np.uint16)
    with pytest.raises(RuntimeError, match="before the pair is finalized"):
        unfinished.write_meta()
    unfinished.abort()


def test_cli_writes_metadata_for_preprocess_and_merge(tmp_path, repo_root, sp_model, docs):
    path = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docs])

    def cli(*args):
        result = subprocess.run([sys.executable, "preprocess_data.py", *args], cwd=repo_root,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stderr

    for name in ("x", "y"):
        err = cli("--input", path, "--output-prefix", str(tmp_path / name), "--tokenizer-type",
                  "Llama2Tokenizer", "--tokenizer-model", sp_model, "--append-eod")
        assert f"wrote {tmp_path / name}_text_document.bin/.idx/.meta.json" in err
        meta = assert_meta_matches(str(tmp_path / f"{name}_text_document"))
        assert (meta.tokenizer_type, meta.eod_appended) == ("Llama2Tokenizer", True)
    cli("--merge", "--input-prefixes", str(tmp_path / "x_text_document"),
        str(tmp_path / "y_text_document"), "--output-prefix", str(tmp_path / "xy"))
    merged = assert_meta_matches(str(tmp_path / "xy"))
    assert merged.num_documents == 2 * len(docs) and merged.tokenizer_type == "Llama2Tokenizer"
