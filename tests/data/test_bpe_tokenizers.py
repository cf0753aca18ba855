"""GPT2BPETokenizer and TikTokenizer against independent references, and through
preprocess_data.py into shards read by megatron-core's IndexedDataset."""

import base64
import json
import subprocess
import sys

import pytest

from megatron_ext.tokenizer import TokenizerOptions, build_tokenizer

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
regex = pytest.importorskip("regex")


def _byte_decoder():
    """GPT-2's printable-unicode alphabet back to bytes (written out here, not imported)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@pytest.fixture(scope="session")
def gpt2_files(hf_tokenizer_json, tmp_path_factory):
    """GPT-2-format vocab.json + merges.txt of the session's byte-level BPE."""
    from tokenizers import Tokenizer

    directory = tmp_path_factory.mktemp("gpt2")
    Tokenizer.from_file(hf_tokenizer_json).model.save(str(directory))
    return str(directory / "vocab.json"), str(directory / "merges.txt")


@pytest.fixture(scope="session")
def bpe_ranks(gpt2_files):
    """Byte-level BPE ranks: the 256 bytes, then the session BPE's longer tokens."""
    decoder = _byte_decoder()
    with open(gpt2_files[0], encoding="utf-8") as f:
        vocab = json.load(f)
    longer = [bytes(decoder[c] for c in token)
              for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])
              if token != "<|endoftext|>" and len(token) > 1]
    return [bytes([i]) for i in range(256)] + longer


@pytest.fixture(scope="session")
def tiktoken_files(bpe_ranks, tmp_path_factory):
    """The same ranks in Megatron-LM's JSON and in tiktoken's own format."""
    directory = tmp_path_factory.mktemp("tiktoken")
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                "token_str": t.decode("utf-8", errors="replace")}
               for i, t in enumerate(bpe_ranks)]
    json_path = directory / "tokenizer.json"
    json_path.write_text(json.dumps(entries))
    text_path = directory / "tok.tiktoken"
    text_path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                 for i, t in enumerate(bpe_ranks)))
    return str(json_path), str(text_path)


def reference_bpe(ranks, pattern):
    """tiktoken's algorithm, written out: split by the regex, then repeatedly merge the
    adjacent pair whose concatenation has the lowest rank."""
    rank = {t: i for i, t in enumerate(ranks)}

    def encode(text):
        ids = []
        for piece in regex.findall(pattern, text):
            parts = [bytes([b]) for b in piece.encode("utf-8")]
            while len(parts) > 1:
                pairs = [(rank.get(parts[i] + parts[i + 1], len(rank)), i)
                         for i in range(len(parts) - 1)]
                best, i = min(pairs)
                if best == len(rank):
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(rank[p] for p in parts)
        return ids

    return encode


def test_gpt2_bpe_matches_transformers(gpt2_files, docs):
    from transformers import GPT2Tokenizer

    vocab, merges = gpt2_files
    reference = GPT2Tokenizer(vocab, merges)  # the slow, pure-Python GPT-2 BPE
    tok = build_tokenizer("GPT2BPETokenizer", options=TokenizerOptions(vocab, merges))
    with open(vocab, encoding="utf-8") as f:
        entries = json.load(f)
    assert tok.vocab_size == len(entries)
    assert tok.eod == entries["<|endoftext|>"] == reference.eos_token_id
    for text in docs:
        ids = tok.tokenize(text)
        assert ids == reference.encode(text), text
        assert tok.detokenize(ids) == text
    # Megatron-LM's GPT-2 tokenizer has no special tokens: the EOD text is plain text.
    ids = tok.tokenize("a <|endoftext|> b")
    assert tok.eod not in ids and tok.detokenize(ids) == "a <|endoftext|> b"


def test_gpt2_bpe_errors_name_the_flag(gpt2_files, tmp_path):
    vocab, merges = gpt2_files
    with pytest.raises(ValueError, match="--vocab-file .* and --merge-file"):
        build_tokenizer("GPT2BPETokenizer", options=TokenizerOptions(vocab_file=vocab))
    with pytest.raises(ValueError, match="--merge-file .*nope.txt: no such file"):
        build_tokenizer("GPT2BPETokenizer",
                        options=TokenizerOptions(vocab, str(tmp_path / "nope.txt")))
    no_eod = tmp_path / "vocab.json"
    with open(vocab, encoding="utf-8") as f:
        entries = json.load(f)
    del entries["<|endoftext|>"]
    no_eod.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> entry"):
        build_tokenizer("GPT2BPETokenizer", options=TokenizerOptions(str(no_eod), merges))


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_tiktokenizer_layout_and_ids(tiktoken_files, bpe_ranks, docs, pattern):
    from megatron_ext.tokenizer.tiktoken_bpe import PATTERNS

    n = 16
    vocab_size = n + len(bpe_ranks)
    special = ("<s>", "<unk>", "</s>", "<|im_start|>", "<mask>", "<pad>", "<cls>", "<sep>")
    options = TokenizerOptions(tiktoken_pattern=pattern, tiktoken_num_special_tokens=n,
                               special_tokens=special)
    reference = reference_bpe(bpe_ranks, PATTERNS[pattern])
    toks = [build_tokenizer("TikTokenizer", path, vocab_size, options) for path in tiktoken_files]
    for tok in toks:
        assert tok.vocab_size == vocab_size
        assert (tok.bos, tok.eod, tok.pad) == (0, 2, 5)  # positions in the given list
        assert tok.special_tokens[8:] == [f"<SPECIAL_{i}>" for i in range(8, n)]
        for text in docs:
            ids = tok.tokenize(text)
            assert ids == [n + i for i in reference(text)], text
            assert tok.detokenize(ids) == text
        assert tok.tokenize("</s>") == [n + i for i in reference("</s>")]  # plain text


def test_tiktokenizer_defaults_and_truncation(tiktoken_files, bpe_ranks):
    from megatron_ext.tokenizer.tiktoken_bpe import PATTERNS

    path = tiktoken_files[0]
    with pytest.raises(ValueError, match=f"has only {len(bpe_ranks)}; pass --vocab-size "
                                         f"{len(bpe_ranks) + 1000}"):
        build_tokenizer("TikTokenizer", path)  # Megatron-LM's default of 131072 ids
    # A smaller --vocab-size keeps the first ranks only; the default special tokens and v2.
    tok = build_tokenizer("TikTokenizer", path, 1000 + 300)
    assert (tok.bos, tok.eod, tok.pad) == (1, 2, 4)
    reference = reference_bpe(bpe_ranks[:300], PATTERNS["v2"])
    text = "The quick brown fox jumps over the lazy dog."
    assert tok.tokenize(text) == [1000 + i for i in reference(text)]
    with pytest.raises(ValueError, match="--tokenizer-special-tokens must list .*missing: "
                                         "<mask>"):
        build_tokenizer("TikTokenizer", path, 1300, TokenizerOptions(
            special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<cls>", "<sep>")))
    with pytest.raises(ValueError, match="--tiktoken-num-special-tokens 5 must be at least"):
        build_tokenizer("TikTokenizer", path, 1300,
                        TokenizerOptions(tiktoken_num_special_tokens=5))


def test_tiktokenizer_bad_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64 1\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2: expected 'base64 rank'"):
        build_tokenizer("TikTokenizer", str(bad), 1002,
                        TokenizerOptions(tiktoken_num_special_tokens=1000))


def _cli(repo_root, *args):
    return subprocess.run([sys.executable, "preprocess_data.py", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)


def test_preprocess_cli_with_bpe_tokenizers(repo_root, tmp_path, docs, gpt2_files,
                                            tiktoken_files, bpe_ranks):
    from transformers import GPT2Tokenizer

    from megatron_ext.tokenizer.tiktoken_bpe import PATTERNS

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    vocab, merges = gpt2_files
    gpt2 = GPT2Tokenizer(vocab, merges)
    run = _cli(repo_root, "--input", str(source), "--output-prefix", str(tmp_path / "gpt2"),
               "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
               "--merge-file", merges, "--append-eod")
    assert run.returncode == 0, run.stderr
    dataset = indexed_dataset.IndexedDataset(str(tmp_path / "gpt2_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        gpt2.encode(t) + [gpt2.eos_token_id] for t in docs]

    n = 10
    reference = reference_bpe(bpe_ranks, PATTERNS["v1"])
    run = _cli(repo_root, "--input", str(source), "--output-prefix", str(tmp_path / "tik"),
               "--tokenizer-type", "TikTokenizer", "--tokenizer-model", tiktoken_files[1],
               "--tiktoken-pattern", "v1", "--tiktoken-num-special-tokens", str(n),
               "--vocab-size", str(n + len(bpe_ranks)), "--append-eod", "--workers", "2")
    assert run.returncode == 0, run.stderr
    dataset = indexed_dataset.IndexedDataset(str(tmp_path / "tik_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        [n + i for i in reference(t)] + [2] for t in docs]  # EOD: </s>, id 2

    run = _cli(repo_root, "--input", str(source), "--output-prefix", str(tmp_path / "x"),
               "--tokenizer-type", "TikTokenizer", "--tokenizer-model", tiktoken_files[0])
    assert run.returncode != 0 and "pass --vocab-size" in run.stderr
