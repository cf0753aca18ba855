"""preprocess_data.py --handler-name ...: shards read back with megatron-core's IndexedDataset,
packing, overlong conversations, workers, bad records and flag errors."""

import json
import os
import re

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data import readers
from megatron_ext.data.instruct.handlers import build_handler
from megatron_ext.data.instruct.pipeline import (ConversationEncoder, output_prefixes,
                                           preprocess_instructions)
from megatron_ext.data.cli import main
from megatron_ext.data.preprocess import SKIP_HINT
from megatron_ext.data.instruct.packing import Packer
from megatron_ext.data.instruct.tasks import task_ids_prefix
from megatron_ext.tokenizer import build_tokenizer

from .conftest import PAD

SEQ = 40  # a packed sample holds SEQ + 1 tokens
OPENAI = "OpenAIStyleInstructionHandler"


def _conversation(i):
    """Conversations of 22 .. 86 tokens with the chatml template and the char tokenizer."""
    messages = [{"role": "user", "content": "q" * (1 + i % 5)},
                {"role": "assistant", "content": "a" * (1 + (3 * i) % 7)}]
    if i % 4 == 3:
        messages += [{"role": "user", "content": "u" * (i % 3 + 1)},
                     {"role": "assistant", "content": "b" * (i % 9 + 1)}]
    return {"messages": messages}


RECORDS = [_conversation(i) for i in range(30)]


@pytest.fixture(scope="module")
def tokenizer(char_tokenizer_dir):
    return build_tokenizer("HuggingFaceTokenizer", char_tokenizer_dir)


@pytest.fixture(scope="module")
def encoded(tokenizer):
    """Each record's (ids, mask) straight from the encoder, the reference for the shards."""
    encoder, handler = ConversationEncoder(tokenizer, "chatml"), build_handler(OPENAI)
    return [tuple(x.tolist() for x in encoder.encode(handler.turns(r))) for r in RECORDS]


def _write(directory, records, name="chats.jsonl"):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def _run(tmp_path, tokenizer_dir, records, *flags, name="out"):
    path = _write(tmp_path, records)
    prefix = str(tmp_path / name)
    main(["--input", path, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
          "--tokenizer-model", tokenizer_dir, "--handler-name", OPENAI, "--prompt-type", "chatml",
          "--log-interval", "0", *flags])
    return prefix


def _read(prefix):
    """[(ids, mask, [sequence (ids, mask), ...]) per document] via megatron-core."""
    ids, mask = (IndexedDataset(p) for p in output_prefixes(prefix))
    assert mask.index.dtype == np.uint8
    assert list(ids.document_indices) == list(mask.document_indices)
    docs = []
    for d in range(len(ids.document_indices) - 1):
        first, last = ids.document_indices[d], ids.document_indices[d + 1]
        sequences = [(ids[i].tolist(), mask[i].tolist()) for i in range(first, last)]
        docs.append(sequences)
    return docs


def test_packed_samples_keep_conversations_whole_and_mask_padding(tmp_path, char_tokenizer_dir,
                                                                   encoded, capsys):
    prefix = _run(tmp_path, char_tokenizer_dir, RECORDS, "--pack", "--seq-length", str(SEQ))
    fits = [c for c in encoded if len(c[0]) <= SEQ + 1]
    dropped = len(encoded) - len(fits)
    assert 0 < dropped < len(encoded)
    docs = _read(prefix)
    conversations, padding = [], 0
    for sequences in docs:
        assert sum(len(ids) for ids, _ in sequences) == SEQ + 1
        for ids, mask in sequences:
            if mask and not any(mask) and set(ids) == {PAD}:  # the padding, last
                assert (ids, mask) == sequences[-1]
                padding += len(ids)
            else:
                conversations.append((ids, mask))
    # Every conversation that fits is there exactly once, whole, with its own mask.
    assert sorted(conversations) == sorted(fits)
    report = capsys.readouterr().err
    assert (f"{len(RECORDS)} records read, 0 skipped, {len(fits)} conversations written; as "
            f"{len(docs)} packed samples of {SEQ + 1} tokens ({padding} padding tokens") in report
    assert f"overlong (> {SEQ + 1} tokens = --seq-length + 1): {dropped} dropped, 0 truncated" \
        in report


def test_truncate_keeps_the_start_and_drops_what_has_nothing_left(tmp_path, char_tokenizer_dir,
                                                                  encoded):
    prefix = _run(tmp_path, char_tokenizer_dir, RECORDS, "--seq-length", str(SEQ),
                  "--overlong", "truncate")
    expected = []
    for ids, mask in encoded:
        if len(ids) > SEQ + 1:
            ids, mask = ids[:SEQ + 1], mask[:SEQ + 1]
            if not any(mask[1:]):
                continue
        expected.append((ids, mask))
    assert [seqs for seqs in _read(prefix)] == [[c] for c in expected]


def test_unpacked_one_document_per_conversation_in_input_order(tmp_path, char_tokenizer_dir,
                                                                encoded):
    prefix = _run(tmp_path, char_tokenizer_dir, RECORDS)
    assert _read(prefix) == [[c] for c in encoded]


def test_output_does_not_depend_on_workers(tmp_path, char_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_RECORDS", 7)  # several chunks in flight
    outputs = []
    for workers in ("1", "2"):
        prefix = _run(tmp_path, char_tokenizer_dir, RECORDS * 3, "--pack", "--seq-length",
                      str(SEQ), "--workers", workers, name=f"w{workers}")
        outputs.append([open(p + ext, "rb").read() for p in output_prefixes(prefix)
                        for ext in (".bin", ".idx")])
    assert outputs[0] == outputs[1]


GOOD = json.dumps(RECORDS[0])
BAD = {
    "malformed JSON": ('{"messages": [', "malformed JSON"),
    "missing roles": (json.dumps({"messages": [{"content": "q"}]}), "no key 'role'"),
    "empty assistant": (json.dumps({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": ""}]}),
                        r"messages\[1\]: empty assistant turn"),
    "wrong type": (json.dumps({"messages": {"role": "user"}}), "is dict, not a list"),
    "unknown role": (json.dumps({"messages": [{"role": "human", "content": "q"}]}),
                     "unknown role 'human'"),
    # valid JSON, but `tokenizers` raises TypeError on it: the reader refuses it first
    "lone surrogate": ('{"messages": [{"role": "user", "content": "q \\ud800"}, '
                       '{"role": "assistant", "content": "a"}]}',
                       r"not valid UTF-8 \(lone surrogate\)"),
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_record_error_names_file_and_line(tmp_path, char_tokenizer_dir, kind, capsys):
    line, problem = BAD[kind]
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, char_tokenizer_dir, [GOOD, GOOD, "", line, GOOD], "--pack", "--seq-length",
             str(SEQ))
    message = str(exit_info.value.code)
    path = os.path.join(str(tmp_path), "chats.jsonl")
    assert message.startswith(f"error: {path}, line 4: ")
    assert re.search(problem, message)
    assert message.endswith(SKIP_HINT)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]  # nothing half-written


def test_skip_invalid_counts_and_names_the_first_skips(tmp_path, char_tokenizer_dir, capsys):
    lines = [GOOD] + [line for line, _ in BAD.values()] + [GOOD]
    prefix = _run(tmp_path, char_tokenizer_dir, lines, "--skip-invalid")
    err = capsys.readouterr().err
    path = os.path.join(str(tmp_path), "chats.jsonl")
    for number in range(2, 2 + len(BAD)):
        assert f"skipped {path}, line {number}: " in err
    assert f"{len(lines)} records read, {len(BAD)} skipped, 2 conversations written" in err
    assert len(_read(prefix)) == 2


def test_text_input_is_refused(tmp_path, char_tokenizer_dir):
    path = tmp_path / "chats.txt"
    path.write_text("hello\n")
    with pytest.raises(readers.InputError,
                       match="instruction data is read from .jsonl, .ndjson or .json"):
        preprocess_instructions([str(path)], str(tmp_path / "x"), "HuggingFaceTokenizer",
                                char_tokenizer_dir, handler_name=OPENAI, prompt_type="chatml")


def test_json_array_errors_name_the_element(tmp_path, tokenizer, char_tokenizer_dir):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([RECORDS[0], {"messages": []}]))
    with pytest.raises(readers.InputError, match=rf"{path}, element 2: empty conversation"):
        preprocess_instructions([str(path)], str(tmp_path / "x"), "HuggingFaceTokenizer",
                                char_tokenizer_dir, handler_name=OPENAI, prompt_type="chatml")


@pytest.mark.parametrize("flags, message", [
    (["--handler-name", OPENAI], "--handler-name needs --prompt-type"),
    (["--handler-name", OPENAI, "--prompt-type", "chatml", "--pack"], "--pack needs --seq-length"),
    (["--prompt-type", "chatml", "--pack"], "--prompt-type, --pack: only with --handler-name"),
    (["--handler-name", OPENAI, "--prompt-type", "chatml", "--neat-pack"],
     "--neat-pack needs --pack"),
    (["--handler-name", OPENAI, "--prompt-type", "chatml", "--append-eod"],
     "takes no --merge, --append-eod or --json-keys"),
])
def test_flag_errors(tmp_path, char_tokenizer_dir, flags, message, capsys):
    path = _write(tmp_path, [GOOD])
    with pytest.raises(SystemExit):
        main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
              "HuggingFaceTokenizer", "--tokenizer-model", char_tokenizer_dir, *flags])
    assert message in capsys.readouterr().err


def test_short_handler_name_writes_what_the_full_name_writes(tmp_path, char_tokenizer_dir):
    records = RECORDS[:6]
    full = _run(tmp_path, char_tokenizer_dir, records, name="full")
    path = _write(tmp_path, records)
    short = str(tmp_path / "short")
    main(["--input", path, "--output-prefix", short, "--tokenizer-type", "HuggingFaceTokenizer",
          "--tokenizer-model", char_tokenizer_dir, "--handler-name", "openai", "--prompt-type",
          "chatml", "--log-interval", "0"])
    for a, b in zip(output_prefixes(full), output_prefixes(short)):
        for suffix in (".bin", ".idx"):
            with open(a + suffix, "rb") as fa, open(b + suffix, "rb") as fb:
                assert fa.read() == fb.read()


def test_neat_pack_writes_what_pack_writes(tmp_path, char_tokenizer_dir, capsys):
    """MindSpeed-LLM's --pack --neat-pack (packing with a per-conversation attention mask):
    what --pack writes here (each conversation a sequence, isolated in training), said once."""
    pack = _run(tmp_path, char_tokenizer_dir, RECORDS, "--pack", "--seq-length", str(SEQ),
                name="pack")
    capsys.readouterr()
    neat = _run(tmp_path, char_tokenizer_dir, RECORDS, "--pack", "--neat-pack", "--seq-length",
                str(SEQ), name="neat")
    assert capsys.readouterr().err.count("--neat-pack (MindSpeed-LLM's) is what --pack") == 1
    for a, b in zip((*output_prefixes(pack), task_ids_prefix(pack)),
                    (*output_prefixes(neat), task_ids_prefix(neat))):
        for suffix in (".bin", ".idx"):
            with open(a + suffix, "rb") as fa, open(b + suffix, "rb") as fb:
                assert fa.read() == fb.read(), a + suffix


def test_unknown_handler_name_is_refused_with_the_real_names(tmp_path, capsys):
    path = _write(tmp_path, [GOOD])
    with pytest.raises(SystemExit):
        main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
              "ByteTokenizer", "--handler-name", "Sharegpt4", "--prompt-type", "chatml"])
    err = capsys.readouterr().err
    assert "--handler-name: unknown name 'Sharegpt4'" in err, err
    assert "SharegptStyleInstructionHandler" in err, err
    assert sorted(os.listdir(tmp_path)) == ["chats.jsonl"]


def test_configuration_errors_before_any_file(tmp_path, char_tokenizer_dir):
    path = _write(tmp_path, [GOOD])
    base = ["--input", path, "--output-prefix", str(tmp_path / "o"), "--handler-name", OPENAI]
    for flags, message in [
        (["--tokenizer-type", "ByteTokenizer", "--prompt-type", "llama3x"],
         "unknown --prompt-type 'llama3x'"),
        (["--tokenizer-type", "ByteTokenizer", "--prompt-type", "llama2"],
         "--prompt-type llama2 uses {bos}, but ByteTokenizer has no BOS token"),
        (["--tokenizer-type", "ByteTokenizer", "--prompt-type", "chatml", "--map-keys", "{"],
         "--map-keys is not valid JSON"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(base + flags)
        assert message in str(exit_info.value.code)
    assert sorted(os.listdir(tmp_path)) == ["chats.jsonl"]


def test_packer_is_first_fit_and_deterministic():
    def conv(n):
        return np.arange(n, dtype=np.int64), np.ones(n, np.uint8), np.full(n, n, np.uint16)

    packer = Packer(capacity=10, pad_id=99, window=2)
    closed = []
    for n in (6, 5, 4, 3, 2, 7):
        closed += packer.add(*conv(n))
    closed += packer.flush()
    # 6 -> A; 5 -> B; 4 -> A (full: closed); 3 -> B; 2 -> B (full: closed); 7 -> C
    assert [lengths for _, _, _, lengths, _ in closed] == [[6, 4], [5, 3, 2], [7, 3]]
    ids, mask, task, _, padding = closed[-1]
    assert padding == 3 and ids[-3:].tolist() == [99] * 3 and mask[-3:].tolist() == [0] * 3
    # Each token keeps its conversation's task id; the padding gets 0.
    assert task.tolist() == [7] * 7 + [0] * 3
    # A full window closes its fullest sample to open a new one.
    packer = Packer(capacity=10, pad_id=0, window=2)
    assert packer.add(*conv(8)) == [] and packer.add(*conv(7)) == []
    [fullest] = packer.add(*conv(5))
    assert fullest[3] == [8, 2]


def test_both_shards_get_metadata_that_megatron_core_confirms(tmp_path, char_tokenizer_dir,
                                                              tokenizer):
    from tests.shard_reference import assert_meta_matches

    prefix = _run(tmp_path, char_tokenizer_dir, RECORDS, "--pack", "--seq-length", str(SEQ))
    ids_prefix, mask_prefix = output_prefixes(prefix)
    ids, mask = assert_meta_matches(ids_prefix), assert_meta_matches(mask_prefix)
    assert (ids.tokenizer_type, ids.tokenizer_model, ids.vocab_size, ids.eod,
            ids.eod_appended) == ("HuggingFaceTokenizer", char_tokenizer_dir,
                                  tokenizer.hf_tokenizer.backend_tokenizer.get_vocab_size(),
                                  tokenizer.hf_tokenizer.eos_token_id, False)
    # The mask is aligned with the ids and is no token shard: values 0/1, no tokenizer.
    assert (mask.num_documents, mask.num_tokens) == (ids.num_documents, ids.num_tokens)
    assert (mask.max_id, mask.tokenizer_type, mask.vocab_size, mask.eod) == (1, None, None, None)


def test_nothing_to_write_is_an_error_and_writes_nothing(tmp_path, char_tokenizer_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:  # every conversation is longer than 10 + 1
        _run(tmp_path, char_tokenizer_dir, RECORDS, "--seq-length", "10", name="o/out")
    assert exit_info.value.code == (
        f"error: --input {tmp_path / 'chats.jsonl'}: nothing to write ({len(RECORDS)} records "
        f"read, 0 skipped, {len(RECORDS)} dropped as overlong); a shard without tokens cannot be "
        "read by megatron-core, so none is written")
    assert os.listdir(tmp_path / "o") == []
