"""Megatron checkpoint layout: names, tracker, atomic rank files, self-describing args."""

import argparse
import re

import pytest
import torch

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.args import padding_hint, check_compatible, model_args_namespace
from megatron_ext.checkpoint.format import CheckpointError
from megatron_ext.config import parse_args


def test_paths(tmp_path):
    assert fmt.iteration_dir(tmp_path, 100) == tmp_path / "iter_0000100"
    assert fmt.iteration_dir(tmp_path, "release") == tmp_path / "release"
    assert fmt.rank_file(tmp_path, 7, 1, 0, 1) == tmp_path / "iter_0000007/mp_rank_01/model_optim_rng.pt"
    assert fmt.rank_file(tmp_path, 7, 3, 2, 4) == tmp_path / "iter_0000007/mp_rank_03_002/model_optim_rng.pt"


def test_tracker(tmp_path):
    assert fmt.read_tracker(tmp_path) is None
    fmt.write_tracker(tmp_path, 42)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "42\n"
    assert fmt.read_tracker(tmp_path) == 42
    fmt.write_tracker(tmp_path, "release")
    assert fmt.read_tracker(tmp_path) == fmt.RELEASE
    assert [p.name for p in tmp_path.iterdir()] == ["latest_checkpointed_iteration.txt"]
    for bad in ("", "abc", "-3", "1.5"):
        (tmp_path / "latest_checkpointed_iteration.txt").write_text(bad)
        with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration.txt is corrupt"):
            fmt.read_tracker(tmp_path)


def test_rank_file_round_trip_and_errors(tmp_path):
    path = fmt.rank_file(tmp_path, 3, 0, 1, 2)
    payload = {"args": argparse.Namespace(hidden_size=8, params_dtype=torch.bfloat16),
               "checkpoint_version": 3.0, "iteration": 3, "model": {"w": torch.arange(6.0)}}
    fmt.save_rank_file(path, payload)
    assert [p.name for p in path.parent.iterdir()] == ["model_optim_rng.pt"]  # no temp left
    loaded = fmt.load_rank_file(path)
    assert loaded["args"] == payload["args"] and torch.equal(loaded["model"]["w"], torch.arange(6.0))

    with pytest.raises(CheckpointError, match=r"checkpoint file .*mp_rank_00_000/model_optim_rng.pt is missing"):
        fmt.load_rank_file(fmt.rank_file(tmp_path, 3, 0, 0, 2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"mp_rank_00_001/model_optim_rng.pt is truncated or unreadable"):
        fmt.load_rank_file(path)

    # a failing save leaves the previous file and no temp file
    fmt.save_rank_file(path, payload)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        fmt.save_rank_file(path, {"x": Boom()})
    assert [p.name for p in path.parent.iterdir()] == ["model_optim_rng.pt"]
    assert fmt.load_rank_file(path)["iteration"] == 3


def _config(extra=""):
    argv = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
            "--num-query-groups 2 --seq-length 16 --position-embedding-type rope "
            "--normalization RMSNorm --swiglu --disable-bias-linear "
            "--untie-embeddings-and-output-weights --mock-data --tokenizer-type NullTokenizer "
            "--vocab-size 250 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 " + extra)
    return parse_args(argv.split(), world_size=4)


def test_model_args_namespace():
    args = model_args_namespace(_config(), 250)
    expected = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    group_query_attention=True, num_query_groups=2, kv_channels=16, seq_length=16,
                    max_position_embeddings=16, position_embedding_type="rope", rotary_base=10000,
                    normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
                    untie_embeddings_and_output_weights=True, add_bias_linear=False,
                    disable_bias_linear=True, make_vocab_size_divisible_by=128,
                    tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                    padded_vocab_size=256, vocab_size=250, params_dtype=torch.float32,
                    bf16=False, fp16=False)
    assert {k: getattr(args, k) for k in expected} == expected
    check_compatible(args, _config(), 250, "ckpt/x.pt")  # the run itself fits


def test_check_compatible_names_file_and_flags():
    saved = model_args_namespace(_config(), 250)
    with pytest.raises(CheckpointError) as err:
        check_compatible(saved, _config("--hidden-size 128 --num-query-groups 4"), 250, "ck/mp_rank_00_000/x.pt")
    msg = str(err.value)
    assert "ck/mp_rank_00_000/x.pt" in msg
    assert "other hidden size: --hidden-size 64 in the checkpoint, --hidden-size 128 in this run" in msg
    assert "other number of query groups (GQA): --num-query-groups 2" in msg
    with pytest.raises(CheckpointError) as err:
        check_compatible(saved, _config("--num-layers 2"), 250, "x.pt")
    assert "other number of layers: --num-layers 4 in the checkpoint, --num-layers 2" in str(err.value)
    assert "TP/PP" not in str(err.value) and "reshard" not in str(err.value)

    other = parse_args(("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
                        "--num-query-groups 2 --seq-length 16 --position-embedding-type rope "
                        "--normalization RMSNorm --swiglu --disable-bias-linear "
                        "--untie-embeddings-and-output-weights --mock-data --tokenizer-type NullTokenizer "
                        "--vocab-size 250 --tensor-model-parallel-size 1 --pipeline-model-parallel-size 4"
                        ).split(), world_size=4)
    with pytest.raises(CheckpointError, match=r"other TP/PP: --tensor-model-parallel-size 2 in the "
                       r"checkpoint, --tensor-model-parallel-size 1.*reshard it with convert_ckpt.py"):
        check_compatible(saved, other, 250, "x.pt")
    with pytest.raises(CheckpointError, match=r"other embedding tying.*other RoPE base.*other vocabulary"):
        cfg = _config("--rotary-base 500000")
        cfg.model.untie_embeddings_and_output_weights = False
        check_compatible(saved, cfg, 300, "x.pt")
    # A reshardable load (torch_dist) at TP=1 pads 300 to 384 rows; the TP=2 checkpoint has 512.
    wide = model_args_namespace(_config(), 300)
    narrow = _config("--tensor-model-parallel-size 1")
    with pytest.raises(CheckpointError, match=r"other vocabulary.*this run pads 300 to 384 "
                       r".*pass --make-vocab-size-divisible-by 256 to pad as the checkpoint does"):
        check_compatible(wide, narrow, 300, "x.pt", reshardable=True)
    narrow.model.make_vocab_size_divisible_by = 256
    check_compatible(wide, narrow, 300, "x.pt", reshardable=True)
    # No divisor pads 250 to 256 rows at TP=3 (256 is no multiple of 3): re-pad the checkpoint.
    assert "convert_ckpt.py --load-model-type mg --save-model-type mg " \
        "--target-tensor-parallel-size 3" in padding_hint(250, 256, 3)
    with pytest.raises(CheckpointError, match=r"other norm epsilon: --norm-epsilon 1e-05"):
        check_compatible(saved, _config("--norm-epsilon 1e-6"), 250, "x.pt")
    with pytest.raises(CheckpointError, match=r"x.pt has no 'args'"):
        check_compatible(None, _config(), 250, "x.pt")


def test_check_compatible_reads_megatron_lm_args():
    """Megatron-LM's own args: no GQA flag means query groups = heads; add_bias_linear only."""
    saved = argparse.Namespace(num_layers=4, hidden_size=64, ffn_hidden_size=None, num_attention_heads=4,
                               group_query_attention=False, num_query_groups=1, kv_channels=None,
                               position_embedding_type="rope", rotary_base=10000, normalization="RMSNorm",
                               norm_epsilon=1e-5, swiglu=True, untie_embeddings_and_output_weights=True,
                               add_bias_linear=False, tensor_model_parallel_size=2,
                               pipeline_model_parallel_size=2, padded_vocab_size=256)
    cfg = parse_args(("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 16 "
                      "--position-embedding-type rope --normalization RMSNorm --swiglu "
                      "--disable-bias-linear --untie-embeddings-and-output-weights --mock-data "
                      "--tokenizer-type NullTokenizer --vocab-size 250 --tensor-model-parallel-size 2 "
                      "--pipeline-model-parallel-size 2").split(), world_size=4)
    check_compatible(saved, cfg, 250, "x.pt")


def test_another_tokenizer_padding_alike_loads_with_a_warning(caplog):
    """Megatron-LM compares no tokenizer: a checkpoint of another tokenizer whose vocabulary
    pads to the same rows loads, and here the log says its ids now name other text."""
    saved = model_args_namespace(_config(), 250)
    check_compatible(saved, _config(), 250, "ck/x.pt")
    assert "token ids now stand for other text" not in caplog.text
    check_compatible(saved, _config(), 251, "ck/x.pt")  # 251 pads to 256 rows too
    assert re.search(r"checkpoint ck/x\.pt was trained with --tokenizer-type NullTokenizer "
                     r"\(vocabulary 250\), this run has --tokenizer-type NullTokenizer "
                     r"\(vocabulary 251\)", caplog.text), caplog.text
    caplog.clear()
    saved.tokenizer_type = "GPTSentencePieceTokenizer"
    check_compatible(saved, _config(), 250, "ck/x.pt")
    assert "--tokenizer-type GPTSentencePieceTokenizer (vocabulary 250)" in caplog.text
