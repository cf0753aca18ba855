"""pretrain_gpt.py's tokenizer flags for GPT2BPETokenizer and TikTokenizer: Megatron-LM's names
and value syntax, checked before any process group exists."""

import pytest

from megatron_ext.config import ConfigError, parse_args

MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--micro-batch-size 2 --mock-data").split()


def test_gpt2_bpe_needs_both_files():
    with pytest.raises(ConfigError, match="GPT2BPETokenizer needs --vocab-file and --merge-file"):
        parse_args(MODEL + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json"],
                   world_size=1)
    config = parse_args(MODEL + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                                 "v.json", "--merge-file", "m.txt"], world_size=1)
    assert (config.data.vocab_file, config.data.merge_file) == ("v.json", "m.txt")


def test_gpt2_files_without_a_tokenizer_type_say_which_type_reads_them():
    """Megatron-LM's GPT-3 example passes --vocab-file/--merge-file and no --tokenizer-type
    (Megatron-LM has no default either): the error names the type that reads them."""
    with pytest.raises(ConfigError, match=r"^--tokenizer-type is required; with --vocab-file "
                                          r".*pass --tokenizer-type GPT2BPETokenizer$"):
        parse_args(MODEL + ["--vocab-file", "v.json", "--merge-file", "m.txt"], world_size=1)
    with pytest.raises(ConfigError, match=r"^--tokenizer-type is required$"):
        parse_args(MODEL, world_size=1)


def test_tiktoken_flags_take_megatron_syntax():
    special = ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>", "<|im_start|>"]
    base = MODEL + ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "t.json",
                    "--tiktoken-pattern", "v1", "--tiktoken-num-special-tokens", "16"]
    for flag in ("--tokenizer-special-tokens", "--tiktoken-special-tokens"):  # 0.16's alias
        d = parse_args(base + [flag, *special], world_size=1).data
        assert (d.tiktoken_pattern, d.tiktoken_num_special_tokens) == ("v1", 16)
        assert d.tokenizer_special_tokens == special
    assert parse_args(base[:-4], world_size=1).data.tiktoken_num_special_tokens == 1000
    with pytest.raises(SystemExit):
        parse_args(base[:-4] + ["--tiktoken-pattern", "v3"], world_size=1)


def test_a_tokenizer_that_does_not_load_stops_in_one_line(tmp_path):
    """A missing or damaged --tokenizer-model: pretrain() stops with the tokenizer's message
    (naming the flag and the file), not a traceback, before any process group exists."""
    import torch.distributed as dist

    import pretrain_gpt
    from megatron_ext.training import pretrain

    damaged = tmp_path / "tokenizer.model"
    damaged.write_bytes(b"\x0a\x05not a model")
    for model, expected in ((tmp_path / "missing.model", "no such file or directory"),
                            (damaged, "is not a SentencePiece model")):
        with pytest.raises(SystemExit) as stopped:
            pretrain(pretrain_gpt.forward_step, MODEL + [
                "--global-batch-size", "2", "--tokenizer-type", "GPTSentencePieceTokenizer",
                "--tokenizer-model", str(model)])
        assert str(stopped.value.code).startswith(
            f"[rank 0] invalid data: --tokenizer-model {model}"), stopped.value.code
        assert expected in str(stopped.value.code) and not dist.is_initialized()
