"""Flag validation: every bad value or combination is a ``ConfigError`` naming the flag to change,
raised by ``parse_args`` before any process group exists; derived defaults follow Megatron-LM.

References are written out by hand here (Megatron-LM's rules and worked numbers), not computed
with the library's own helpers.
"""

import pytest

from megatron_ext.config import ConfigError, UnknownFlagsError, parse_args

BASE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 8 --seq-length 32 "
        "--micro-batch-size 2 --tokenizer-type NullTokenizer --vocab-size 255").split()
MOCK = BASE + ["--mock-data"]


def _parse(extra, world_size=1, base=MOCK):
    return parse_args(base + extra.split(), world_size=world_size)


def test_minimal_flags_are_valid():
    config = _parse("", world_size=1)
    assert config.parallel.tensor_model_parallel_size == 1
    assert config.data.mock_data


# (extra flags, world size, strings the message must contain: the flag(s) to change)
INVALID_TOPOLOGY = {
    "world-not-divisible-by-tp-x-pp": (
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2", 6,
        ["world size 6", "--tensor-model-parallel-size 2", "--pipeline-model-parallel-size 2"]),
    "world-smaller-than-tp": ("--tensor-model-parallel-size 4", 2,
                              ["world size 2", "--tensor-model-parallel-size 4"]),
    "heads-not-divisible-by-tp": ("--num-attention-heads 6 --hidden-size 48 "
                                  "--tensor-model-parallel-size 4", 4,
                                  ["--num-attention-heads 6", "--tensor-model-parallel-size 4"]),
    "query-groups-not-divisible-by-tp": (
        "--group-query-attention --num-query-groups 2 --tensor-model-parallel-size 4", 4,
        ["--num-query-groups 2", "--tensor-model-parallel-size 4"]),
    "heads-not-divisible-by-query-groups": (
        "--group-query-attention --num-query-groups 3", 1,
        ["--num-attention-heads 8", "--num-query-groups 3"]),
    "layers-not-divisible-by-pp": ("--num-layers 3 --pipeline-model-parallel-size 2", 2,
                                   ["--num-layers 3", "--pipeline-model-parallel-size 2"]),
    "sp-sequence-not-divisible-by-tp": (
        "--sequence-parallel --tensor-model-parallel-size 2 --seq-length 33 "
        "--max-position-embeddings 64", 2, ["--seq-length 33", "--tensor-model-parallel-size 2"]),
    "sp-packed-tokens-not-divisible-by-tp": (
        "--sequence-parallel --tensor-model-parallel-size 2 --seq-length 33 "
        "--max-position-embeddings 64 --micro-batch-size 1 --global-batch-size 1 "
        "--reset-position-ids", 2,
        ["--micro-batch-size 1 x --seq-length 33", "--tensor-model-parallel-size 2"]),
    "world-not-divisible-by-tp-x-pp-x-cp": (
        "--tensor-model-parallel-size 2 --context-parallel-size 2", 6,
        ["world size 6", "--tensor-model-parallel-size 2", "--context-parallel-size 2"]),
    "cp-sequence-not-divisible-by-2cp": (  # 4 chunks of 34 / 4 tokens do not exist
        "--context-parallel-size 2 --seq-length 34 --max-position-embeddings 64", 2,
        ["--seq-length 34", "2 x --context-parallel-size 2"]),
    "cp-sp-sequence-not-divisible-by-2cp-x-tp": (  # 36 / 4 chunks = 9, not split over TP 2
        "--context-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel "
        "--seq-length 36 --max-position-embeddings 64", 4,
        ["--sequence-parallel", "--seq-length 36", "2 x 2 x 2 = 8"]),
    "cp-eval-prompts": ("--context-parallel-size 2 --eval-prompts README.md --eval-interval 5",
                        2, ["--eval-prompts", "--context-parallel-size 2", "generate_gpt.py"]),
    "global-batch-not-divisible-with-cp": (  # CP ranks share micro-batches: DP 2, not 4
        "--context-parallel-size 2 --global-batch-size 6", 4,
        ["--global-batch-size 6", "data-parallel size 2"]),
    "global-batch-not-divisible-by-mbs-x-dp": (
        "--global-batch-size 6", 2,  # DP 2 x micro-batch 2 = 4 does not divide 6
        ["--global-batch-size 6", "--micro-batch-size 2", "data-parallel size 2"]),
    "global-batch-not-divisible-with-tp": (
        "--global-batch-size 6 --tensor-model-parallel-size 2", 8,  # DP 4 x 2 = 8
        ["--global-batch-size 6", "data-parallel size 4"]),
    "hidden-not-divisible-by-heads": ("--hidden-size 60", 1,
                                      ["--hidden-size 60", "--num-attention-heads 8",
                                       "--kv-channels"]),
}


@pytest.mark.parametrize("name", INVALID_TOPOLOGY)
def test_invalid_topology_names_the_flag(name):
    extra, world_size, expected = INVALID_TOPOLOGY[name]
    with pytest.raises(ConfigError) as info:
        _parse(extra, world_size)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))


def test_the_same_topology_is_valid_with_a_matching_world_size():
    """The topology cases above fail because of the one thing they change, not the rest."""
    config = _parse("--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                    "--sequence-parallel --group-query-attention --num-query-groups 2 "
                    "--global-batch-size 12", world_size=12)
    assert config.training.global_batch_size == 12  # DP 3 x micro-batch 2 x 2 micro-batches
    config = _parse("--context-parallel-size 2 --tensor-model-parallel-size 2 "
                    "--sequence-parallel --seq-length 32 --cp-comm-type allgather", world_size=8)
    assert config.training.global_batch_size == 4  # DP 8 / (TP 2 x CP 2) = 2 x micro-batch 2


INVALID_FLAGS = {
    "bf16-and-fp16": ("--bf16 --fp16", MOCK, ["--bf16", "--fp16"]),
    "no-train-iters": ("--train-iters 0", MOCK, ["--train-iters 0"]),
    "no-log-interval": ("--log-interval 0", MOCK, ["--log-interval 0"]),
    "negative-eval-interval": ("--eval-interval=-1", MOCK, ["--eval-interval"]),
    "warmup-not-shorter-than-decay": ("--train-iters 10 --lr-warmup-iters 10", MOCK,
                                      ["--lr-warmup-iters", "--lr-decay-iters 10"]),
    "nccl-without-cuda": ("--distributed-backend nccl", MOCK, ["--distributed-backend nccl"]),
    "warmup-fraction-and-iters": ("--lr-warmup-fraction 0.1 --lr-warmup-iters 5", MOCK,
                                  ["--lr-warmup-fraction", "--lr-warmup-iters"]),
    "query-groups-without-gqa": ("--num-query-groups 2", MOCK,
                                 ["--num-query-groups", "--group-query-attention"]),
    "gqa-without-query-groups": ("--group-query-attention", MOCK,
                                 ["--group-query-attention", "--num-query-groups"]),
    "data-path-and-mock-data": ("--data-path A", MOCK, ["--data-path", "--mock-data"]),
    "neither-data-path-nor-mock-data": ("", BASE, ["--data-path", "--mock-data"]),
    "split-not-numbers": ("--split a,b,c", MOCK, ["--split 'a,b,c'"]),
    "split-four-parts": ("--split 90,5,3,2", MOCK, ["--split '90,5,3,2'"]),
    "split-negative": ("--split=-1,1,0", MOCK, ["--split '-1,1,0'"]),
    "split-all-zero": ("--split 0,0,0", MOCK, ["--split '0,0,0'"]),
    "split-empty-train": ("--split 0,50,50", MOCK, ["--split '0,50,50'"]),
    "blend-odd-count": ("--data-path 0.3 A 0.7", BASE, ["--data-path", "0.3 A 0.7 B"]),
    "blend-zero-weight": ("--data-path 0 A 1 B", BASE, ["--data-path", "weight 0"]),
    "blend-prefix-where-weight-goes": ("--data-path A 0.3 B 0.7", BASE,
                                       ["--data-path", "before its prefix"]),
    "blend-mixes-forms": ("--data-path 0.3 A B C", BASE, ["--data-path", "'0.3'", "A B"]),
    "blend-weight-not-a-number": ("--data-path 0.3 A x B", BASE, ["--data-path", "'x'"]),
    "recompute-full-without-method": ("--recompute-granularity full", MOCK,
                                      ["--recompute-granularity", "--recompute-method"]),
    "min-lr-above-lr": ("--lr 1e-4 --min-lr 1e-3", MOCK, ["--min-lr", "--lr"]),
    "save-interval-without-save": ("--save-interval 10", MOCK, ["--save-interval", "--save"]),
    "async-save-with-torch-format": ("--ckpt-format torch --async-save", MOCK,
                                     ["--async-save", "--ckpt-format torch_dist"]),
    "profile-rank-outside-the-world": ("--profile --profile-ranks 0 1", MOCK,
                                       ["--profile-ranks 1", "world of 1"]),
    "null-tokenizer-without-vocab-size": (
        "--mock-data --tokenizer-type NullTokenizer",
        [f for f in BASE if f not in ("--vocab-size", "255")], ["--vocab-size"]),
}


@pytest.mark.parametrize("name", INVALID_FLAGS)
def test_contradictory_or_malformed_flags_name_the_flag(name):
    extra, base, expected = INVALID_FLAGS[name]
    with pytest.raises(ConfigError) as info:
        _parse(extra, 1, base=base)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))


@pytest.mark.parametrize("extra, closest", [
    ("--warmup-fraction 0.1", "--lr-warmup-fraction"),  # not a Megatron-LM flag
    # An abbreviation of --tensor-model-parallel-size: no prefix matching.
    ("--tensor-parallel 2", "--tensor-model-parallel-size"),
])
def test_unknown_flags_name_the_closest_known_flag(extra, closest):
    with pytest.raises(UnknownFlagsError) as info:
        _parse(extra)
    message = str(info.value)
    assert "\n" not in message
    assert f"{extra.split()[0]} (did you mean {closest}?)" in message


@pytest.mark.parametrize("extra", [
    "--tensor-model-parallel-size two",  # not an int
    "--lr-decay-style exponential",  # not a choice
])
def test_unknown_or_malformed_flags_exit_from_argparse(extra, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(extra)
    assert info.value.code == 2
    assert extra.split()[0] in capsys.readouterr().err


def test_valid_blends_and_splits():
    config = _parse("--data-path 0.3 A 0.7 B --split 80/20", base=BASE)
    assert config.data.data_path == ["0.3", "A", "0.7", "B"]
    config = _parse("--data-path A --split 100,0,0", base=BASE)
    assert config.data.data_path == ["A"]


# Megatron-LM: ffn_hidden_size = int((4 * h * 2 / 3) / 64) * 64 with SwiGLU, else 4h. Worked by
# hand: 4*64*2/3 = 170.7 -> 2*64 = 128; 4*2048*2/3 = 5461.3 -> 85*64 = 5440;
# 4*4096*2/3 = 10922.7 -> 170*64 = 10880; 4*96*2/3 = 256 exactly -> 4*64 = 256.
@pytest.mark.parametrize("hidden, heads, swiglu, ffn", [
    (64, 8, True, 128), (2048, 16, True, 5440), (4096, 32, True, 10880), (96, 8, True, 256),
    (64, 8, False, 256), (2048, 16, False, 8192),
])
def test_default_ffn_hidden_size(hidden, heads, swiglu, ffn):
    config = _parse(f"--hidden-size {hidden} --num-attention-heads {heads}"
                    + (" --swiglu" if swiglu else ""))
    assert config.model.ffn_hidden_size == ffn


def test_explicit_ffn_hidden_size_is_kept():
    assert _parse("--swiglu --ffn-hidden-size 200").model.ffn_hidden_size == 200


def test_derived_defaults():
    config = _parse("--hidden-size 96 --num-attention-heads 6 --train-iters 50 "
                    "--tensor-model-parallel-size 2", world_size=8)  # DP 4
    m, t = config.model, config.training
    assert m.kv_channels == 16  # 96 / 6
    assert m.num_query_groups == 6  # MHA: one group per head
    assert m.max_position_embeddings == 32  # = --seq-length
    assert t.global_batch_size == 8  # micro-batch 2 x DP 4, one micro-batch per step
    assert t.lr_decay_iters == 50  # = --train-iters


def test_explicit_values_override_derived_defaults():
    config = _parse("--kv-channels 4 --global-batch-size 16 --train-iters 50 "
                    "--lr-decay-iters 40 --max-position-embeddings 64", world_size=2)
    assert config.model.kv_channels == 4
    assert config.training.global_batch_size == 16
    assert config.training.lr_decay_iters == 40
    assert config.model.max_position_embeddings == 64


def test_recompute_full_defaults_to_one_layer():
    config = _parse("--recompute-granularity full --recompute-method uniform")
    assert config.model.recompute_num_layers == 1


def test_world_size_comes_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3"):
        parse_args(MOCK + ["--tensor-model-parallel-size", "2"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_args(MOCK + ["--tensor-model-parallel-size", "2"]).training.global_batch_size == 4
